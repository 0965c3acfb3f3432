#!/usr/bin/env bash
# ViT-B/16 bf16 training on one NVIDIA H100 / H200: MFU at the best batch, and
# images/s against PyTorch (timm, AMP bf16, eager and torch.compile) in one run.
#
#   bash benchmarks/gpu_vit_b16.sh [out_dir]      # from the repository root
#   DEADLINE_S=420 bash benchmarks/gpu_vit_b16.sh out/   # a machine lent for minutes
#
# Needs: jax with CUDA, flax, optax, orbax-checkpoint, ml-collections and, for stages 2-3, torch,
# timm and torchvision (pip install -e '.[cuda,torch]'). Runs from a checkout
# without installing it. Synthetic data on the device; TensorFlow is never imported.
#
# Stages, most important first; each writes its results before the next starts:
#   0. checks.jsonl        every attention implementation compiles? cuDNN reached? bf16 error
#   1. sweep.jsonl         JAX alone at each of BATCHES (256, 512): the one with the highest MFU
#   2. vs_torch.txt        that batch against PyTorch eager (and the all-token and
#                          XLA-attention steps, and both forward passes), interleaved
#   3. vs_torch_compile.txt  the same against torch.compile
#   4. noise.txt           every noise type's overhead at that batch
# With DEADLINE_S set, a stage that cannot finish in the time left is skipped
# (log.txt says so) and a running one is stopped at the deadline. STAGES picks
# stages (e.g. STAGES="compile noise" BEST=256 finishes an earlier, cut-off run).
# Other settings: MODEL (vit_base_patch16_224), STEPS (30 timed steps per case, at
# least 20 for a median and spread worth reporting), WARMUP (5 untimed steps), PYTHON.
set -uo pipefail
OUT=${1:-benchmarks/results/gpu_$(date +%Y%m%d_%H%M%S)}
MODEL=${MODEL:-vit_base_patch16_224}
BATCHES=${BATCHES:-"256 512"}
STEPS=${STEPS:-30}
WARMUP=${WARMUP:-5}
PYTHON=${PYTHON:-python3}
DEADLINE_S=${DEADLINE_S:-0}          # 0: no deadline
STAGES=${STAGES:-"checks sweep vs_torch compile noise"}
BEST=${BEST:-}                       # set: skip the sweep, use this batch
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
# Later stages compile the same steps again: the persistent cache answers them.
# One cache per output folder, so the sweep's compile times are cold ones
# (a resumed run reuses its folder's cache; later stages' times are loads).
# Kept outside the folder: the results must stay small enough to copy back.
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-/tmp/noisy_flax_jax_cache/$(cd "$OUT" && pwd | cksum | cut -d' ' -f1)}
export JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0
LOG="$OUT/log.txt"
say() { echo "[gpu_vit_b16 +${SECONDS}s] $*" | tee -a "$LOG" >&2; }

# stage NAME MIN_SECONDS FILE CMD...: appends CMD's output to FILE, unless NAME
# is not in STAGES or fewer than MIN_SECONDS are left before the deadline;
# stops CMD at the deadline.
stage() {
  local name=$1 need=$2 file=$3; shift 3
  local limit=0
  case " $STAGES " in *" $name "*) ;; *) return 0 ;; esac
  if [ "$DEADLINE_S" -gt 0 ]; then
    limit=$((DEADLINE_S - SECONDS))
    if [ "$limit" -lt "$need" ]; then
      say "skip $name: ${limit}s left, it needs about ${need}s"
      return 1
    fi
  fi
  say "start $name: $*"
  timeout "$limit" "$@" >>"$file" 2>>"$LOG"
  local rc=$?
  [ "$rc" -eq 124 ] && say "$name stopped at the deadline"
  [ "$rc" -ne 0 ] && say "$name failed (exit $rc; see above in this log)"
  return "$rc"
}

# Appended, with the date: a resumed run (STAGES=..., BEST=...) may run on
# another machine, and the record of the first one must stay.
{ echo "== $(date -u +%FT%TZ) STAGES=$STAGES"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 || true; } \
  | tee -a "$OUT/gpu.txt"
# Every package a stage imports, before any stage runs: a missing one would
# otherwise fail every stage in turn and leave nothing measured.
# noisy_flax.benchmark last: it imports whatever else the steps need.
needs=(jax flax optax orbax.checkpoint ml_collections)
case " $STAGES " in *" vs_torch "* | *" compile "*) needs+=(torch timm torchvision) ;; esac
needs+=(noisy_flax.benchmark)
if ! "$PYTHON" - "${needs[@]}" <<'PY' 2>&1 | tee -a "$OUT/gpu.txt"; then
import importlib, sys
missing = []
for name in sys.argv[1:]:
    try:
        module = importlib.import_module(name)
        print(name, getattr(module, "__version__", "?"))
    except ImportError as error:
        if (error.name or name) not in missing:
            missing.append(error.name or name)
if missing:
    print(f"missing Python packages: {' '.join(missing)}; install them (offline: pip install "
          f"--no-index --target DIR <wheels> and PYTHONPATH=DIR) and run again")
    sys.exit(1)
import jax
print(jax.devices())
PY
  say "stopped before measuring: a package is missing (see $OUT/gpu.txt)"
  exit 1
fi

stage checks 45 "$OUT/checks.jsonl" "$PYTHON" benchmarks/gpu_checks.py --model "$MODEL"

for b in $([ -z "$BEST" ] && echo "$BATCHES"); do
  # One process per batch: JAX takes most of the GPU's memory for itself.
  stage sweep 60 "$OUT/sweep.jsonl" "$PYTHON" -m noisy_flax.benchmark --model "$MODEL" \
      --dtype bfloat16 --batch "$b" --steps "$STEPS" --warmup "$WARMUP" --json \
    || say "batch $b gave no result (see the lines above in this log: out of memory, the deadline, or an error)"
done
[ -n "$BEST" ] || BEST=$(touch "$OUT/sweep.jsonl"; "$PYTHON" - "$OUT/sweep.jsonl" 2>>"$LOG" <<'PY'
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1]) if line.startswith("{")]
train = [r for r in rows if r["name"] == "jax train noise=none"]
for r in sorted(train, key=lambda r: r["batch"]):
    print(f"batch {r['batch']:4d}: {r['images_per_s']:8.1f} img/s  "
          f"MFU {100 * (r.get('utilisation') or 0):5.1f}%", file=sys.stderr)
if train:
    print(max(train, key=lambda r: r.get("utilisation") or r["images_per_s"])["batch"])
PY
)
if [ -z "$BEST" ]; then say "no batch of the sweep ran; see $LOG"; exit 1; fi
say "best batch: $BEST"

# 2-3. PyTorch shares the GPU, so JAX must not preallocate most of its memory.
# The all-token case does the work timm does (the default skips the last
# block's other tokens); the XLA-attention case times cuDNN's against XLA's.
stage vs_torch 120 "$OUT/vs_torch.txt" env XLA_PYTHON_CLIENT_PREALLOCATE=false "$PYTHON" -m noisy_flax.benchmark \
    --model "$MODEL" --dtype bfloat16 --batch "$BEST" --steps "$STEPS" --warmup "$WARMUP" --eval \
    --compare-model-kwarg last_block_all_tokens=true \
    --compare-model-kwarg attention_implementation=xla \
    --vs-torch
stage compile 180 "$OUT/vs_torch_compile.txt" env XLA_PYTHON_CLIENT_PREALLOCATE=false \
    "$PYTHON" -m noisy_flax.benchmark --model "$MODEL" --dtype bfloat16 --batch "$BEST" \
    --steps "$STEPS" --warmup "$WARMUP" --vs-torch --torch-compile

# 4. Noise overhead at the same batch (every noise type, same run).
stage noise 150 "$OUT/noise.txt" "$PYTHON" -m noisy_flax.benchmark --model "$MODEL" \
    --dtype bfloat16 --batch "$BEST" --steps "$STEPS" --warmup "$WARMUP" --noise all
say "done; results in $OUT"
