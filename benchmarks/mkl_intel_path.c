/* For `bash benchmarks/run_cpu.sh mkl_intel_path` only; never part of a train run.
 *
 * PyTorch's x86 wheels link oneMKL, which picks its BLAS kernels by CPU
 * vendor as well as by instruction set: on an AMD processor it runs a generic
 * path (on the AVX-512 AMD EPYC of BENCHMARKS.md, torch.mm at 165-172 GFLOP/s
 * where its AVX-512 path reaches 420-444). A PyTorch reference slowed that way
 * flatters every ratio against it. oneMKL asks these two functions whether it
 * runs on an Intel processor; preloaded (LD_PRELOAD), this library answers yes,
 * so oneMKL takes the kernels of the instructions the CPU has. The second one
 * only changes what MKL_VERBOSE names as the path.
 */
int mkl_serv_intel_cpu_true(void) { return 1; }
int mkl_serv_intel_cpu(void) { return 1; }
