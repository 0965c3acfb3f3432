"""What the GPU benchmark assumes, checked on the GPU in under a minute.

    python benchmarks/gpu_checks.py [--model vit_base_patch16_224] [--layers 2] [--batch 8]

For each ViT attention implementation (``auto``, ``cudnn``, ``xla``,
``softmax``) in bfloat16: whether it compiles, whether the compiled train
step calls cuDNN's fused attention, and how far its logits and gradients lie
from the float32 explicit-softmax model with the same parameters. Exits 1
when an implementation that compiled is further off than bfloat16 rounding
explains, or when ``auto`` on a GPU does not reach cuDNN for a model whose
head dimension cuDNN takes. The model keeps its width, heads and tokens (the
attention's shapes) but only ``--layers`` blocks, so that the five compiles
take seconds. Synthetic data; TensorFlow is never imported.
"""
from __future__ import annotations

import argparse
import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax

from noisy_flax import models

# bfloat16 keeps 8 bits of mantissa: on the CPU it puts ViT-Ti/16's logits and
# gradients 0.6-1.7% (of their largest value) from float32, with 12 blocks or
# the 2-block cut; 10% is far beyond rounding.
BF16_TOLERANCE = 0.1
CUDNN_MARKERS = ("__cudnn$fmha", "cudnn$fmha")


def loss_and_grads(model, params, images, labels):
    def loss_fn(p):
        logits = model.apply({"params": p}, images, train=True)
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), logits
    step = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))
    compiled = step.lower(params).compile()
    (loss, logits), grads = compiled(params)
    return compiled.as_text() or "", np.asarray(logits, np.float32), grads


def relative_gap(a, b) -> float:
    """max |a - b| over the scale of b: one number for logits or a gradient tree."""
    a = np.concatenate([np.ravel(np.asarray(x, np.float32)) for x in jax.tree.leaves(a)])
    b = np.concatenate([np.ravel(np.asarray(x, np.float32)) for x in jax.tree.leaves(b)])
    return float(np.max(np.abs(a - b)) / (np.max(np.abs(b)) + 1e-12))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="vit_base_patch16_224")
    parser.add_argument("--layers", type=int, default=2, help="ViT blocks (0: the model's own)")
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args(argv)

    backend = jax.default_backend()
    print(json.dumps({"backend": backend, "devices": [d.device_kind for d in jax.devices()],
                      "jax": jax.__version__}))
    depth = {"num_layers": args.layers} if args.layers else {}
    reference_model = models.create_model(args.model, num_classes=1000,
                                          attention_implementation="softmax", **depth)
    size = models.input_size(reference_model)
    key_images, key_labels, key_init, key_head = jax.random.split(jax.random.PRNGKey(0), 4)
    images = jax.random.uniform(key_images, (args.batch, size, size, 3), minval=-1, maxval=1)
    labels = jax.random.randint(key_labels, (args.batch,), 0, 1000)
    params = reference_model.init(key_init, images[:1])["params"]
    # The head starts at zero; random weights make the logits and every gradient non-trivial.
    params["head"]["kernel"] = 0.02 * jax.random.normal(key_head, params["head"]["kernel"].shape)
    _, ref_logits, ref_grads = loss_and_grads(reference_model, params, images, labels)
    head_dim = reference_model.hidden_size // reference_model.num_heads

    failures = []
    for implementation in ("auto", "cudnn", "xla", "softmax"):
        model = models.create_model(args.model, num_classes=1000, dtype=jnp.bfloat16,
                                    attention_implementation=implementation, **depth)
        row = {"implementation": implementation, "dtype": "bfloat16", "model": args.model,
               "layers": reference_model.num_layers}
        try:
            hlo, logits, grads = loss_and_grads(model, params, images, labels)
        except Exception as error:  # cuDNN absent or refusing the shapes: report, go on
            row["compiled"] = False
            row["error"] = f"{type(error).__name__}: {str(error).splitlines()[0][:300]}"
            print(json.dumps(row))
            continue
        row.update(compiled=True, calls_cudnn_attention=any(m in hlo for m in CUDNN_MARKERS),
                   logits_gap=relative_gap(logits, ref_logits),
                   grads_gap=relative_gap(grads, ref_grads))
        print(json.dumps(row))
        if max(row["logits_gap"], row["grads_gap"]) > BF16_TOLERANCE:
            failures.append(f"{implementation}: logits / gradients differ from float32 softmax by "
                            f"{row['logits_gap']:.3g} / {row['grads_gap']:.3g} (> {BF16_TOLERANCE})")
        if (implementation == "auto" and backend == "gpu" and head_dim <= 128
                and not row["calls_cudnn_attention"]):
            failures.append("auto: no cuDNN attention in the compiled GPU step "
                            f"(head dim {head_dim}); it fell back to XLA's")
    for failure in failures:
        print(f"FAILED {failure}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
