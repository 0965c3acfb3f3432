#!/usr/bin/env bash
# ViT-B/16 bf16 training on one NVIDIA H100 / H200: MFU at the best batch, and
# images/s against PyTorch (timm, AMP bf16, eager and torch.compile) in one run.
#
#   bash benchmarks/gpu_vit_b16.sh [out_dir]      # from the repository root
#
# Needs: jax[cuda], flax, optax, and the torch extra (pip install -e '.[torch]').
# Synthetic data on the device; TensorFlow is never imported.
set -euo pipefail
OUT=${1:-benchmarks/results/gpu_$(date +%Y%m%d_%H%M%S)}
MODEL=${MODEL:-vit_base_patch16_224}
BATCHES=${BATCHES:-"64 128 256 384 512"}
STEPS=${STEPS:-30}
PYTHON=${PYTHON:-python}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"

# 1. JAX alone, one process per batch (JAX may take the whole GPU): the batch
#    with the highest MFU. A batch that does not fit fails alone and is skipped.
for b in $BATCHES; do
  echo "== $MODEL bf16 batch $b" >&2
  "$PYTHON" -m noisy_flax.benchmark --model "$MODEL" --dtype bfloat16 --batch "$b" \
      --steps "$STEPS" --warmup 5 --eval --json > "$OUT/sweep_b$b.jsonl" \
      || { echo "batch $b failed (out of memory?)" >&2; rm -f "$OUT/sweep_b$b.jsonl"; }
done
BEST=$("$PYTHON" - "$OUT" <<'PY'
import glob, json, sys
rows = [json.loads(l) for f in glob.glob(f"{sys.argv[1]}/sweep_b*.jsonl") for l in open(f)]
train = [r for r in rows if r["name"] == "jax train noise=none"]
best = max(train, key=lambda r: r.get("utilisation") or r["images_per_s"])
print(best["batch"])
for r in sorted(train, key=lambda r: r["batch"]):
    print(f"batch {r['batch']:4d}: {r['images_per_s']:8.1f} img/s  MFU {100 * (r.get('utilisation') or 0):5.1f}%",
          file=sys.stderr)
PY
)
echo "best batch: $BEST" | tee "$OUT/best_batch.txt"

# 2. The same batch against PyTorch, interleaved in one process. Both share
#    the GPU, so JAX must not preallocate most of its memory. The all-token
#    case does the work timm does (the default skips the last block's other
#    tokens); the XLA-attention case times the default's cuDNN attention against XLA's.
XLA_PYTHON_CLIENT_PREALLOCATE=false "$PYTHON" -m noisy_flax.benchmark --model "$MODEL" \
    --dtype bfloat16 --batch "$BEST" --steps "$STEPS" --warmup 5 \
    --compare-model-kwarg last_block_all_tokens=true \
    --compare-model-kwarg attention_implementation=xla \
    --vs-torch --torch-compile | tee "$OUT/vs_torch_b$BEST.txt"

# 3. Noise overhead at the same batch (every noise type, same run).
"$PYTHON" -m noisy_flax.benchmark --model "$MODEL" --dtype bfloat16 --batch "$BEST" \
    --steps "$STEPS" --warmup 5 --noise all | tee "$OUT/noise_b$BEST.txt"
echo "results in $OUT" >&2
