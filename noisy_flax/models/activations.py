"""Activations written for what XLA:CPU does with them.

``relu``: a ReLU whose output XLA:CPU computes once. In a ResNet each
ReLU output feeds a convolution and, in the backward pass, that
convolution's weight gradient, which XLA:CPU runs on a channel-major copy
of it. ``jnp.maximum(x, 0)`` counts as a one-input operation, so XLA
re-computes it, together with the BatchNorm and the residual add before
it, inside every such transposing copy, reading each of those inputs in
transposed order: 0.6 s of kernel time in a 2.9 s ResNet-18 train step at
224 px on the 2-core CPU. Written as a select, the ReLU has two full-size
inputs, so XLA computes it once and the copies read one tensor
(BENCHMARKS.md). Same values, NaNs included, and the same gradient as
``jax.nn.relu`` (0 at 0). Other backends get ``jax.nn.relu``.

``gelu``: the exact GELU as PyTorch and timm write it, x/2 (1 + erf(x/sqrt 2)).
``jax.nn.gelu(approximate=False)`` writes it with erfc, which XLA expands
into an exponential and two branches: on the CPU the MLP's GELU forward took
5.2 ms against 1.8 ms (backward 6.1 against 4.3 ms) on ViT-Ti/16's
32 x 197 x 768 activations, and the whole train step ran 0.92x the time
(BENCHMARKS.md). The two forms differ by rounding only (4.8e-7 at most on
standard normal inputs); erfc is the more accurate far in the negative tail,
where GELU is below 1e-6.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax


@jax.custom_jvp
def _select_relu(x: jax.Array) -> jax.Array:
    # x < 0 is False for NaN, so NaNs pass through as with max(x, 0).
    return jnp.where(x < 0, jnp.zeros((), x.dtype), x)


_select_relu.defjvps(lambda g, ans, x: lax.select(x > 0, g, lax.full_like(g, 0)))


def relu(x: jax.Array) -> jax.Array:
    """``jax.nn.relu``, as a select on the CPU (see the module docstring)."""
    if jax.default_backend() == "cpu":
        return _select_relu(x)
    return jax.nn.relu(x)


def gelu(x: jax.Array) -> jax.Array:
    """Exact (erf) GELU, in the erf form of PyTorch's ``nn.GELU()``."""
    return x * 0.5 * (1.0 + lax.erf(x * (1.0 / math.sqrt(2.0))))
