"""Max pooling whose gradient XLA:CPU runs fast.

``nn.max_pool``'s gradient is a select-and-scatter, which XLA:CPU expands
into a general scatter over an index array as large as the input (about a
tenth of a ResNet-18 train step on CPU). Here the pool is the maximum of
the window's strided slices, and the gradient goes to the first maximum of
each window in row-major order, as select-and-scatter (and PyTorch) do: the
same values and the same gradients, built from slices, selects and pads.
"""
from __future__ import annotations

import functools
import itertools

import jax
import jax.numpy as jnp
from jax import lax


def max_pool(x: jax.Array, window: tuple[int, int], strides: tuple[int, int],
             padding: tuple[tuple[int, int], tuple[int, int]]) -> jax.Array:
    """Max pooling of an NHWC map, as ``nn.max_pool`` with explicit padding."""
    if x.ndim != 4:
        raise ValueError(f"max_pool expects NHWC input, got shape {x.shape}")
    return _max_pool(x, tuple(window), tuple(strides), tuple(map(tuple, padding)))


def _offsets(window):
    return list(itertools.product(range(window[0]), range(window[1])))


def _window_slices(x, window, strides, padding):
    """The padded input and, per window offset, its strided slice."""
    padded = jnp.pad(x, ((0, 0), *padding, (0, 0)), constant_values=-jnp.inf)
    out_h = (padded.shape[1] - window[0]) // strides[0] + 1
    out_w = (padded.shape[2] - window[1]) // strides[1] + 1
    slices = [lax.slice(padded, (0, i, j, 0),
                        (padded.shape[0], i + strides[0] * (out_h - 1) + 1,
                         j + strides[1] * (out_w - 1) + 1, padded.shape[3]),
                        (1, strides[0], strides[1], 1))
              for i, j in _offsets(window)]
    return padded, slices


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def _max_pool(x, window, strides, padding):
    _, slices = _window_slices(x, window, strides, padding)
    return functools.reduce(jnp.maximum, slices)


def _max_pool_fwd(x, window, strides, padding):
    out = _max_pool(x, window, strides, padding)
    return out, (x, out)


def _max_pool_bwd(window, strides, padding, residuals, grad):
    x, out = residuals
    padded, slices = _window_slices(x, window, strides, padding)
    taken = jnp.zeros(out.shape, bool)
    grad_padded = jnp.zeros(padded.shape, grad.dtype)
    for (i, j), window_slice in zip(_offsets(window), slices):
        first = (window_slice == out) & ~taken  # the first maximum wins ties
        taken = taken | first
        hits = jnp.where(first, grad, jnp.zeros_like(grad))
        # Spread the strided slice back onto the padded map (interior padding).
        high_h = padded.shape[1] - i - (strides[0] * (out.shape[1] - 1) + 1)
        high_w = padded.shape[2] - j - (strides[1] * (out.shape[2] - 1) + 1)
        grad_padded = grad_padded + lax.pad(
            hits, jnp.zeros((), grad.dtype),
            ((0, 0, 0), (i, high_h, strides[0] - 1), (j, high_w, strides[1] - 1), (0, 0, 0)))
    (top, _), (left, _) = padding
    return (grad_padded[:, top:top + x.shape[1], left:left + x.shape[2]],)


_max_pool.defvjp(_max_pool_fwd, _max_pool_bwd)
