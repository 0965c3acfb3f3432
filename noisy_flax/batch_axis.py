"""Sums over and copies along the batch axis, written as matrix products.

XLA:CPU hands a sum over a short leading axis of long rows to YNNPACK, which
ran it 50x slower than the same sum as a product with a ones vector (8.4
against 0.15 ms for 32 x 197 x 192 floats; BENCHMARKS.md). Such sums are the
optimal-Q noise's batch sum and the gradient of anything copied along the
batch, the ViT's position embedding for one. A copy is written as a product
too, because the gradient of a product is a product, where a broadcast's is
that sum. On other backends the products cost what the sums do.
"""
from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp

# Full float32 products: by default TPUs multiply float32 in bfloat16 pieces
# and GPUs in TF32, which would round every summand.
_HIGHEST = jax.lax.Precision.HIGHEST


def sum_over_batch(x: jax.Array, dtype: Optional[Any] = None) -> jax.Array:
    """``jnp.sum(x, axis=0, keepdims=True)``, accumulated and returned in
    ``dtype`` (default: x's)."""
    k = x.shape[0]
    ones = jnp.ones((1, k), x.dtype)
    total = jnp.matmul(ones, x.reshape(k, -1), precision=_HIGHEST,
                       preferred_element_type=dtype or x.dtype)
    return total.reshape((1,) + x.shape[1:])


def repeat_over_batch(row: jax.Array, k: int) -> jax.Array:
    """``jnp.broadcast_to(row, (k,) + row.shape[1:])`` for a row of shape (1, ...)."""
    if row.shape[:1] != (1,):
        raise ValueError(f"repeat_over_batch takes one row, shape (1, ...), got {row.shape}")
    ones = jnp.ones((k, 1), row.dtype)
    copies = jnp.matmul(ones, row.reshape(1, -1), precision=_HIGHEST)
    return copies.reshape((k,) + row.shape[1:])
