"""The GPU measurement scripts, run here on the CPU: their logic, not their figures.

``benchmarks/gpu_checks.py`` runs for real on a tiny ViT; ``gpu_vit_b16.sh``
runs with a stand-in Python whose benchmark answers are fixed, so the batch
it must pick, the stage it must skip and the files it must leave are known.
"""
import json
import os
import pathlib
import shutil
import stat
import subprocess
import sys

import jax
import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import gpu_checks  # noqa: E402


def _rows(capsys):
    return [json.loads(line) for line in capsys.readouterr().out.splitlines()]


def test_gpu_checks_on_the_cpu_reports_every_implementation(capsys):
    assert gpu_checks.main(["--model", "vit_nano_patch4_28", "--batch", "2"]) == 0
    header, *rows = _rows(capsys)
    assert header["backend"] == "cpu"
    by_name = {row["implementation"]: row for row in rows}
    assert set(by_name) == {"auto", "cudnn", "xla", "softmax"}
    assert not by_name["cudnn"]["compiled"] and "cuDNN" in by_name["cudnn"]["error"]
    for name in ("auto", "xla", "softmax"):
        row = by_name[name]
        assert row["compiled"] and not row["calls_cudnn_attention"] and row["layers"] == 2
        # bfloat16 against float32: rounding, well inside the script's tolerance, never exact.
        assert 0 < row["logits_gap"] < gpu_checks.BF16_TOLERANCE / 3
        assert 0 < row["grads_gap"] < gpu_checks.BF16_TOLERANCE / 3


def test_gpu_checks_fails_an_implementation_that_computes_something_else(
        monkeypatch, capsys):
    real = jax.nn.dot_product_attention

    def off_by_a_scale(q, k, v, *args, implementation=None, **kwargs):
        out = real(q, k, v, *args, implementation=implementation, **kwargs)
        return out * 1.5 if implementation == "xla" else out

    monkeypatch.setattr(jax.nn, "dot_product_attention", off_by_a_scale)
    assert gpu_checks.main(["--model", "vit_nano_patch4_28", "--batch", "2"]) == 1
    by_name = {row["implementation"]: row for row in _rows(capsys)[1:]}
    assert by_name["xla"]["logits_gap"] > gpu_checks.BF16_TOLERANCE
    assert by_name["softmax"]["logits_gap"] < gpu_checks.BF16_TOLERANCE


# A stand-in for the Python the script runs: the benchmark prints a fixed
# train row per batch (MFU peaking at 256), batch 512 runs out of memory;
# other stages print their arguments; the script's own helper runs for real.
FAKE_PYTHON = """#!/usr/bin/env bash
if [ "$1" = "-" ] && [ "$2" = "jax" ]; then  # the package check: $FAKE_MISSING fails it
  [ -n "$FAKE_MISSING" ] && {{ echo "missing Python packages: $FAKE_MISSING"; exit 1; }}
  echo "packages: ${{*:2}}"; exit 0
fi
if [ "$1" = "-" ]; then exec {python} "$@"; fi
if [ "$1" = "-c" ]; then echo "jax fake"; exit 0; fi
echo "$@" >> "$FAKE_CALLS"
echo "$JAX_COMPILATION_CACHE_DIR" >> "$FAKE_CALLS.cache"
echo "${{XLA_PYTHON_CLIENT_PREALLOCATE:-unset}}" >> "$FAKE_CALLS.prealloc"
batch=0; prev=""
for a in "$@"; do [ "$prev" = "--batch" ] && batch=$a; prev=$a; done
case " $* " in
  *" --json "*)
    [ "$batch" = 512 ] && {{ echo "out of memory" >&2; exit 1; }}
    util=$([ "$batch" = 256 ] && echo 0.45 || echo 0.30)
    echo "{{\\"name\\": \\"jax train noise=none\\", \\"batch\\": $batch, \\"images_per_s\\": $batch, \\"utilisation\\": $util}}" ;;
  *) echo "ran: $*" ;;
esac
"""


needs_timeout = pytest.mark.skipif(shutil.which("timeout") is None, reason="needs coreutils' timeout")


def _write_executable(path, text):
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return path


@pytest.fixture
def fake_python(tmp_path):
    return _write_executable(tmp_path / "python", FAKE_PYTHON.format(python=sys.executable))


def _run_script(tmp_path, fake_python, out, **env):
    calls = tmp_path / "calls.txt"
    full_env = {**os.environ, "PYTHON": str(fake_python), "FAKE_CALLS": str(calls), **env}
    result = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_vit_b16.sh"), str(out)],
                            cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=120)
    lines = calls.read_text().splitlines() if calls.exists() else []
    return result, lines


@needs_timeout
def test_gpu_script_takes_the_best_batch_through_every_stage(tmp_path, fake_python):
    out = tmp_path / "out"
    result, calls = _run_script(tmp_path, fake_python, out, BATCHES="128 256 512")
    assert result.returncode == 0, result.stderr
    assert "best batch: 256" in result.stderr
    assert "batch 512 gave no result" in result.stderr
    later = [c for c in calls if "--json" not in c and "gpu_checks" not in c]
    assert len(later) == 3 and all("--batch 256" in c for c in later)
    assert "--vs-torch" in later[0] and "--torch-compile" in later[1] and "--noise all" in later[2]
    assert sorted(p.name for p in out.iterdir()) == [
        "checks.jsonl", "gpu.txt", "log.txt", "noise.txt", "sweep.jsonl", "vs_torch.txt",
        "vs_torch_compile.txt"]
    assert len((out / "sweep.jsonl").read_text().splitlines()) == 2  # 128 and 256
    # Every timing: at least 20 timed steps after a warm-up, the benchmark's own rule.
    timed = [c for c in calls if "gpu_checks" not in c]
    assert len(timed) == 6
    for call in timed:
        words = call.split()
        steps, warmup = (int(words[words.index(flag) + 1]) for flag in ("--steps", "--warmup"))
        assert steps >= 20 and warmup >= 1, call


# A stand-in Python that hands every benchmark command of the script to the
# real argument parser (which also builds the model from its name): a flag or
# value the benchmark no longer takes fails the stage, as it would on the GPU.
PARSING_PYTHON = """#!/usr/bin/env bash
if [ "$1" = "-" ] && [ "$2" = "jax" ]; then echo "packages: ${{*:2}}"; exit 0; fi
if [ "$1" = "-" ]; then exec {python} "$@"; fi
if [ "$1" = "-m" ] && [ "$2" = "noisy_flax.benchmark" ]; then
  shift 2
  echo "$*" >> "$FAKE_CALLS"
  exec {python} -c '
import json, sys
from noisy_flax import benchmark
args = benchmark.parse_args(sys.argv[1:])
print(json.dumps({{"name": "jax train noise=none", "batch": args.batch, "images_per_s": 1.0,
                  "utilisation": 0.4}}))' "$@"
fi
echo "not run here: $*"
"""


@needs_timeout
def test_gpu_script_passes_only_arguments_the_benchmark_takes(tmp_path):
    python = _write_executable(tmp_path / "python", PARSING_PYTHON.format(python=sys.executable))
    result, calls = _run_script(tmp_path, python, tmp_path / "out", BATCHES="256 512")
    assert result.returncode == 0, result.stderr
    assert "failed" not in result.stderr and "gave no result" not in result.stderr
    # Both sweep batches, then vs_torch, compile and noise at the best one (the first of a tie).
    assert len(calls) == 5
    assert all("--model vit_base_patch16_224" in c for c in calls)
    assert "--vs-torch" in calls[2] and "--torch-compile" in calls[3] and "--noise all" in calls[4]
    assert all("--batch 256" in c for c in calls[2:])


@needs_timeout
def test_gpu_script_keeps_one_compilation_cache_per_output_folder_outside_it(tmp_path, fake_python):
    """The sweep's compile times must be cold ones, and the results folder
    must stay small: a cache per folder, under /tmp, reused only on resume."""
    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    caches = []
    for out in ("a", "b", "a"):
        cache_log = tmp_path / "calls.txt.cache"
        cache_log.unlink(missing_ok=True)
        subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_vit_b16.sh"), str(tmp_path / out)],
                       cwd=ROOT, env={**env, "PYTHON": str(fake_python), "STAGES": "sweep",
                                      "FAKE_CALLS": str(tmp_path / "calls.txt")},
                       capture_output=True, text=True, timeout=120, check=True)
        used = set(cache_log.read_text().split())
        assert len(used) == 1
        caches.append(used.pop())
    assert caches[0] == caches[2] != caches[1]
    assert all(c.startswith("/tmp/noisy_flax_jax_cache/") for c in caches)


@needs_timeout
def test_gpu_script_skips_what_the_deadline_leaves_no_time_for(tmp_path, fake_python):
    result, calls = _run_script(tmp_path, fake_python, tmp_path / "out", DEADLINE_S="30")
    assert result.returncode == 1  # every stage needs more than 30 s: no batch measured
    assert "skip checks" in result.stderr and "no batch of the sweep ran" in result.stderr
    assert calls == []


@needs_timeout
def test_gpu_script_finishes_a_cut_off_run_without_touching_its_results(tmp_path, fake_python):
    out = tmp_path / "out"
    out.mkdir()
    (out / "vs_torch.txt").write_text("earlier result\n")
    result, calls = _run_script(tmp_path, fake_python, out, STAGES="compile noise", BEST="128")
    assert result.returncode == 0, result.stderr
    assert len(calls) == 2 and all("--batch 128" in c for c in calls)
    assert (out / "vs_torch.txt").read_text() == "earlier result\n"


@needs_timeout
def test_gpu_script_checks_every_package_before_measuring(tmp_path, fake_python):
    """A package the stages import but the machine lacks (ml_collections on a
    bare GPU image) stops the run at once, with its name, and keeps the
    record of an earlier run's machine."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "gpu.txt").write_text("earlier machine\n")
    result, calls = _run_script(tmp_path, fake_python, out, FAKE_MISSING="ml_collections")
    assert result.returncode == 1 and calls == []
    assert "stopped before measuring: a package is missing" in result.stderr
    record = (out / "gpu.txt").read_text()
    assert record.startswith("earlier machine\n") and "missing Python packages: ml_collections" in record
    result, _ = _run_script(tmp_path, fake_python, tmp_path / "out2")
    assert ("packages: jax flax optax orbax.checkpoint ml_collections torch timm torchvision "
            "noisy_flax.benchmark") in (tmp_path / "out2" / "gpu.txt").read_text()
    result, _ = _run_script(tmp_path, fake_python, tmp_path / "out3", STAGES="noise", BEST="64")
    assert "packages: jax flax optax orbax.checkpoint ml_collections noisy_flax.benchmark\n" in \
        (tmp_path / "out3" / "gpu.txt").read_text()


def _blocking(tmp_path, modules):
    """A PYTHONPATH entry under which importing each of ``modules`` fails."""
    root = tmp_path / "blocked"
    for name in modules:
        (root / name).mkdir(parents=True)
        (root / name / "__init__.py").write_text("raise ImportError(name=__name__)\n")
    return str(root)


@needs_timeout
@pytest.mark.parametrize("blocked, missing", [
    (("matplotlib", "tensorflow", "tensorflow_datasets", "scipy", "clu"), None),
    (("orbax",), "orbax")])
def test_gpu_script_package_check_imports_the_benchmark_for_real(tmp_path, blocked, missing):
    """With the real Python: what the benchmark does not need may be absent;
    what it imports (orbax, through the train step) is named before any stage."""
    env = {**os.environ, "PYTHON": sys.executable, "STAGES": "none", "BEST": "8",
           "PYTHONPATH": _blocking(tmp_path, blocked)}
    out = tmp_path / "out"
    result = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_vit_b16.sh"), str(out)],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    record = (out / "gpu.txt").read_text()
    if missing is None:
        assert result.returncode == 0, result.stderr
        assert "noisy_flax.benchmark" in record and "missing" not in record
    else:
        assert result.returncode == 1
        assert f"missing Python packages: {missing};" in record


@needs_timeout
def test_gpu_script_picks_the_highest_mfu_not_the_largest_batch(tmp_path, fake_python):
    # The stand-in's MFU peaks at 256; 384 runs but reaches less.
    result, calls = _run_script(tmp_path, fake_python, tmp_path / "out", BATCHES="128 256 384")
    assert result.returncode == 0, result.stderr
    assert "best batch: 256" in result.stderr
    later = [c for c in calls if "--json" not in c and "gpu_checks" not in c]
    assert later and all("--batch 256" in c for c in later)


@needs_timeout
def test_gpu_script_torch_stages_share_the_gpu_and_time_both_passes(tmp_path, fake_python):
    """PyTorch runs in the JAX process: JAX must not preallocate the GPU there.
    vs_torch also times the eval steps and the all-token and XLA-attention variants."""
    result, calls = _run_script(tmp_path, fake_python, tmp_path / "out", BEST="128",
                                STAGES="sweep vs_torch compile noise")
    assert result.returncode == 0, result.stderr
    assert not [c for c in calls if "--json" in c]  # BEST given: no sweep
    prealloc = (tmp_path / "calls.txt.prealloc").read_text().split()
    by_stage = dict(zip(["vs_torch", "compile", "noise"], zip(calls, prealloc)))
    assert by_stage["vs_torch"][1] == by_stage["compile"][1] == "false"
    assert by_stage["noise"][1] == "unset"
    vs_torch = by_stage["vs_torch"][0]
    for flag in ("--vs-torch", "--eval", "--compare-model-kwarg last_block_all_tokens=true",
                 "--compare-model-kwarg attention_implementation=xla"):
        assert flag in vs_torch


@pytest.fixture
def fake_timeout(tmp_path):
    """coreutils' timeout, recording the limit it was given."""
    bin_dir = tmp_path / "timeout_bin"
    bin_dir.mkdir()
    _write_executable(bin_dir / "timeout",
                      '#!/usr/bin/env bash\necho "$1" >> "$FAKE_CALLS.timeout"\nshift\nexec "$@"\n')
    return bin_dir


def test_gpu_script_gives_each_stage_the_time_left_before_the_deadline(
        tmp_path, fake_python, fake_timeout):
    # bash counts SECONDS on from the value it is started with: here the run
    # starts 1000 s in, with 46 s left: the checks (45 s) fit, the sweep (60 s) does not.
    env = {"PATH": f"{fake_timeout}:{os.environ['PATH']}", "SECONDS": "1000"}
    result, calls = _run_script(tmp_path, fake_python, tmp_path / "out", DEADLINE_S="1046", **env)
    assert result.returncode == 1
    assert len(calls) == 1 and "gpu_checks.py" in calls[0]
    (limit,) = map(int, (tmp_path / "calls.txt.timeout").read_text().split())
    assert 44 <= limit <= 46  # DEADLINE_S - SECONDS, less the second or so the start took
    assert "skip sweep" in result.stderr
    # Without a deadline, timeout gets 0: no limit.
    (tmp_path / "calls.txt.timeout").unlink()
    result, _ = _run_script(tmp_path, fake_python, tmp_path / "out2", STAGES="checks noise",
                            BEST="64", **env)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "calls.txt.timeout").read_text().split() == ["0", "0"]


def test_relative_gap_is_max_abs_difference_over_the_largest_magnitude():
    # Over every leaf of the tree; the scale is the largest |b|, here a negative value.
    a = {"x": np.array([1.0, 2.0]), "y": np.array([[0.0, 7.0]])}
    b = {"x": np.array([1.0, -4.0]), "y": np.array([[0.0, 2.0]])}
    assert gpu_checks.relative_gap(a, b) == pytest.approx(6.0 / 4.0)
    a["x"] = np.array([1.0, -4.0])
    assert gpu_checks.relative_gap(a, b) == pytest.approx(5.0 / 4.0)


def test_gpu_checks_fails_a_wrong_gradient_with_right_logits(monkeypatch, capsys):
    real = jax.nn.dot_product_attention

    def wrong_backward(q, k, v, *args, implementation=None, **kwargs):
        if implementation != "xla":
            return real(q, k, v, *args, implementation=implementation, **kwargs)

        @jax.custom_vjp
        def attend(q, k, v):
            return real(q, k, v, *args, implementation=implementation, **kwargs)

        def forward(q, k, v):
            return attend(q, k, v), (q, k, v)

        def backward(saved, g):
            _, vjp = jax.vjp(lambda *x: real(*x, *args, implementation=implementation, **kwargs),
                             *saved)
            return tuple(3.0 * d for d in vjp(g))

        attend.defvjp(forward, backward)
        return attend(q, k, v)

    monkeypatch.setattr(jax.nn, "dot_product_attention", wrong_backward)
    assert gpu_checks.main(["--model", "vit_nano_patch4_28", "--batch", "2"]) == 1
    xla = {row["implementation"]: row for row in _rows(capsys)[1:]}["xla"]
    assert xla["logits_gap"] < gpu_checks.BF16_TOLERANCE < xla["grads_gap"]


class _GpuBackend:
    """jax as gpu_checks sees it, on a machine whose backend is a GPU."""

    def __getattr__(self, name):
        return getattr(jax, name)

    @staticmethod
    def default_backend():
        return "gpu"


def test_gpu_checks_fails_when_auto_does_not_reach_cudnn_on_a_gpu(monkeypatch, capsys):
    # The models still see the CPU, so "auto" compiles XLA's attention: no cuDNN call.
    monkeypatch.setattr(gpu_checks, "jax", _GpuBackend())
    assert gpu_checks.main(["--model", "vit_nano_patch4_28", "--batch", "2"]) == 1
    assert "FAILED auto: no cuDNN attention" in capsys.readouterr().err


# benchmarks/run_cpu.sh: the CPU figures' logs, by the names BENCHMARKS.md cites.
FAKE_RUN_PY = """#!/usr/bin/env bash
echo "${NOISY_FLAX_NO_TCMALLOC:-}|${NOISY_FLAX_NO_REEXEC:-}|$*|${LD_PRELOAD:-}"
"""
# A stand-in compiler: writes an empty file where -o says and records its arguments.
FAKE_CC = """#!/usr/bin/env bash
echo "$*" >> "$(dirname "$0")/cc_calls"
while [ $# -gt 0 ]; do [ "$1" = -o ] && : > "$2"; shift; done
"""


def _run_cpu(tmp_path, *args, **env):
    py = _write_executable(tmp_path / "py", FAKE_RUN_PY)
    cc = _write_executable(tmp_path / "cc", FAKE_CC)
    full_env = {**os.environ, "PY": str(py), "PY_TORCH": str(py), "LOGS": str(tmp_path / "logs"),
                "CC": str(cc), "BUILD_DIR": str(tmp_path / "build"), "LD_PRELOAD": "", **env}
    return subprocess.run(["bash", str(ROOT / "benchmarks" / "run_cpu.sh"), *args], cwd=ROOT,
                          env=full_env, capture_output=True, text=True, timeout=60)


def test_run_cpu_writes_every_log_once_and_never_over_a_cited_one(tmp_path):
    result = _run_cpu(tmp_path)
    assert result.returncode == 0, result.stderr
    logs = tmp_path / "logs"
    names = sorted(p.name for p in logs.glob("*.txt"))
    # The names of the logs kept in benchmarks/logs (BENCHMARKS.md cites them).
    assert names == sorted([
        "vit_tiny_vs_torch.txt", "resnet18_vs_torch.txt", "vit_tiny_vs_torch_glibc_malloc.txt",
        "resnet18_vs_torch_glibc_malloc.txt", "vit_tiny_vs_torch_mkl_intel_path.txt",
        "resnet18_vs_torch_mkl_intel_path.txt", "vit_tiny_small_pages.txt",
        "vit_tiny_noise_all.txt", "input_mock_imagenet.txt", "input_fashion_mnist.txt"])
    assert all((ROOT / "benchmarks" / "logs" / n).is_file() for n in names)
    assert (logs / "vit_tiny_vs_torch_glibc_malloc.txt").read_text().startswith("1||")
    assert (logs / "vit_tiny_small_pages.txt").read_text().startswith("|1|")
    assert (logs / "vit_tiny_vs_torch.txt").read_text().startswith("||")
    # Only the mkl_intel_path runs preload the library, which was built once from its source.
    library = tmp_path / "build" / "libmkl_intel_path.so"
    for name in names:
        preload = (logs / name).read_text().strip().rsplit("|", 1)[1]
        assert preload == (str(library) if "mkl_intel_path" in name else ""), name
    assert library.is_file()
    calls = (tmp_path / "cc_calls").read_text().splitlines()
    assert calls == [f"-shared -fPIC -O2 -o {library} benchmarks/mkl_intel_path.c"]

    # Run again: the first log is there, so nothing is written, exit 2.
    (logs / "vit_tiny_vs_torch.txt").write_text("cited\n")
    result = _run_cpu(tmp_path, "vs_torch")
    assert result.returncode == 2
    assert (logs / "vit_tiny_vs_torch.txt").read_text() == "cited\n"
    result = _run_cpu(tmp_path, "vs_torch", SUFFIX="_new")
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in logs.glob("*_new.txt")) == [
        "resnet18_vs_torch_new.txt", "vit_tiny_vs_torch_new.txt"]
    assert (logs / "vit_tiny_vs_torch.txt").read_text() == "cited\n"
    result = _run_cpu(tmp_path, "noise")
    assert result.returncode == 2
    assert _run_cpu(tmp_path, "noise", OVERWRITE="1").returncode == 0


def test_run_cpu_keeps_a_preload_already_set_and_stops_when_the_library_cannot_be_built(tmp_path):
    result = _run_cpu(tmp_path, "mkl_intel_path", LD_PRELOAD="libother.so")
    assert result.returncode == 0, result.stderr
    log = (tmp_path / "logs" / "resnet18_vs_torch_mkl_intel_path.txt").read_text()
    assert log.strip().endswith(f"|{tmp_path / 'build' / 'libmkl_intel_path.so'}:libother.so")

    failing = _write_executable(tmp_path / "failing_cc", "#!/usr/bin/env bash\nexit 1\n")
    result = _run_cpu(tmp_path, "mkl_intel_path", CC=str(failing), SUFFIX="_again")
    assert result.returncode == 2
    assert "building benchmarks/mkl_intel_path.c failed; install a C compiler" in result.stderr
    assert not list((tmp_path / "logs").glob("*_again.txt"))  # nothing ran without it


def _build_mkl_intel_path(tmp_path):
    cc = shutil.which(os.environ.get("CC", "cc"))
    if cc is None:
        pytest.skip("needs a C compiler")
    library = tmp_path / "libmkl_intel_path.so"
    subprocess.run([cc, "-shared", "-fPIC", "-o", str(library),
                    str(ROOT / "benchmarks" / "mkl_intel_path.c")], check=True)
    return library


def test_mkl_intel_path_answers_yes_to_both_of_mkl_s_questions(tmp_path):
    import ctypes
    library = ctypes.CDLL(str(_build_mkl_intel_path(tmp_path)))
    assert library.mkl_serv_intel_cpu_true() == 1
    assert library.mkl_serv_intel_cpu() == 1


def test_mkl_generic_path_agrees_with_what_mkl_reports(tmp_path):
    """oneMKL's own banner (MKL_VERBOSE) names the code path it runs; the
    benchmark's flag must say "generic" exactly when the banner does, with and
    without the library preloaded (on an Intel CPU: never)."""
    torch = pytest.importorskip("torch")
    if not torch.backends.mkl.is_available():
        pytest.skip("this PyTorch has no MKL")
    import ctypes
    from noisy_flax import benchmark, benchmark_torch
    libtorch = ctypes.CDLL(str(pathlib.Path(torch.__file__).parent / "lib" / "libtorch_cpu.so"))
    assert libtorch.mkl_serv_intel_cpu_true and libtorch.mkl_serv_intel_cpu  # the names MKL asks
    library = _build_mkl_intel_path(tmp_path)
    for preload in ("", str(library)):
        out = subprocess.run(
            [sys.executable, "-c", "import torch; torch.mm(torch.ones(64, 64), torch.ones(64, 64))"],
            env={**os.environ, "MKL_VERBOSE": "1", "LD_PRELOAD": preload},
            capture_output=True, text=True, check=True, timeout=120).stdout
        banner = next(line for line in out.splitlines() if line.startswith("MKL_VERBOSE oneMKL"))
        generic = "Intel(R) Architecture processors" in banner
        assert generic is benchmark_torch.mkl_generic_path(benchmark.cpu_vendor(), preload, True), \
            banner
