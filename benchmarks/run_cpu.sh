#!/usr/bin/env bash
# The CPU measurements recorded in BENCHMARKS.md (run from the repository root,
# on an otherwise idle machine: the step times of this 2-core CPU swing by
# 10-30% under other load).
# PY_TORCH: a python with jax, the project and the torch extra (torch, timm, torchvision).
set -euo pipefail
PY=${PY:-.venv/bin/python}
PY_TORCH=${PY_TORCH:-/work/torchvenv/bin/python}
LOGS=${LOGS:-benchmarks/logs}
SUFFIX=${SUFFIX:-}  # appended to every log name: BENCHMARKS.md cites earlier logs by name
mkdir -p "$LOGS"
run() {
  local name=$1$SUFFIX; shift
  if [ -e "$LOGS/$name.txt" ] && [ -z "${OVERWRITE:-}" ]; then
    echo "$LOGS/$name.txt exists and BENCHMARKS.md may cite it; set SUFFIX=_<new name> (or OVERWRITE=1)" >&2
    exit 2
  fi
  echo "== $name: $*" >&2; "$@" > "$LOGS/$name.txt" 2> "$LOGS/$name.err"
}
# vs_torch SUFFIX [PREFIX...]: ViT-Ti and ResNet-18 against PyTorch, each command run under PREFIX.
vs_torch() {
  local suffix=$1; shift
  run "vit_tiny_vs_torch$suffix" "$@" "$PY_TORCH" -m noisy_flax.benchmark --model vit_tiny_patch16_224 --batch 32 --resolution 224 --vs-torch --eval --compare-cpu-ynnpack default --compare-model-kwarg last_block_all_tokens=true --steps 20 --warmup 2 --chunk 2
  run "resnet18_vs_torch$suffix" "$@" "$PY_TORCH" -m noisy_flax.benchmark --model resnet18 --batch 32 --resolution 224 --vs-torch --eval --compare-cpu-ynnpack default --compare-model-kwarg conv_algorithm=direct --steps 20 --warmup 2 --chunk 2
}
# mkl_intel_path_preload: builds benchmarks/mkl_intel_path.c and prints the LD_PRELOAD that adds it.
mkl_intel_path_preload() {
  local build=${BUILD_DIR:-benchmarks/build}
  mkdir -p "$build"
  "${CC:-cc}" -shared -fPIC -O2 -o "$build/libmkl_intel_path.so" benchmarks/mkl_intel_path.c \
    || { echo "building benchmarks/mkl_intel_path.c failed; install a C compiler (apt install gcc) or set CC" >&2; exit 2; }
  echo "$(cd "$build" && pwd)/libmkl_intel_path.so${LD_PRELOAD:+:$LD_PRELOAD}"
}
case "${1:-all}" in
  vs_torch|all)
    # JAX (tuned), JAX with XLA's default YNNPACK use, (ViT) JAX with the last block computing
    # every token as PyTorch does, (ResNet) JAX with direct 3x3 convolutions instead of
    # Winograd's, PyTorch, the matmul peak, and both eval steps, interleaved.
    vs_torch "" ;;&
  malloc|all)
    # The same two runs on glibc's malloc (huge pages) instead of TCMalloc (compare with vs_torch).
    vs_torch _glibc_malloc env NOISY_FLAX_NO_TCMALLOC=1 ;;&
  mkl_intel_path|all)
    # The same two runs with PyTorch's oneMKL on the kernels of the CPU's instruction set
    # (benchmarks/mkl_intel_path.c): off Intel processors it otherwise takes a slow generic path.
    preload=$(mkl_intel_path_preload)
    vs_torch _mkl_intel_path env LD_PRELOAD="$preload" ;;&
  huge_pages|all)
    # The same ViT step without the re-exec: glibc's malloc with 4 KiB pages.
    run vit_tiny_small_pages env NOISY_FLAX_NO_REEXEC=1 "$PY" -m noisy_flax.benchmark --model vit_tiny_patch16_224 --batch 32 --resolution 224 --steps 20 --warmup 2 --chunk 2 ;;&
  noise|all)
    run vit_tiny_noise_all "$PY" -m noisy_flax.benchmark --model vit_tiny_patch16_224 --batch 32 --resolution 224 --noise all --steps 20 --warmup 1 --chunk 2 ;;&
  input|all)
    run input_mock_imagenet "$PY" -m noisy_flax.benchmark --input mock_imagenet --model vit_tiny_patch16_224 --batch 32 --resolution 224 --steps 20 --warmup 2 --input-batches 20
    run input_fashion_mnist "$PY" -m noisy_flax.benchmark --input fashion_mnist --model vit_nano_patch4_28 --batch 128 --resolution 28 --steps 20 --warmup 3 --input-batches 50 ;;
esac
