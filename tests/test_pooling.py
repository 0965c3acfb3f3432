"""pooling.max_pool: numpy's values, select-and-scatter's gradients, no scatter."""
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from noisy_flax.models.pooling import max_pool

RNG = np.random.default_rng(0)
SETTINGS = [((3, 3), (2, 2), ((1, 1), (1, 1))),   # the ResNet stem
            ((2, 2), (2, 2), ((0, 0), (0, 0))),
            ((3, 2), (1, 2), ((0, 1), (1, 0)))]


def numpy_max_pool(x, window, strides, padding):
    padded = np.pad(x, ((0, 0), *padding, (0, 0)), constant_values=-np.inf)
    out_h = (padded.shape[1] - window[0]) // strides[0] + 1
    out_w = (padded.shape[2] - window[1]) // strides[1] + 1
    out = np.empty((x.shape[0], out_h, out_w, x.shape[3]), x.dtype)
    for r in range(out_h):
        for c in range(out_w):
            r0, c0 = r * strides[0], c * strides[1]
            out[:, r, c] = padded[:, r0:r0 + window[0], c0:c0 + window[1]].max(axis=(1, 2))
    return out


def _numpy_first_max_grad(x, window, strides, padding, grad):
    """Each window's gradient to its first maximum in row-major order."""
    padded = np.pad(x, ((0, 0), *padding, (0, 0)), constant_values=-np.inf)
    out = np.zeros_like(padded)
    for b in range(grad.shape[0]):
        for r in range(grad.shape[1]):
            for c in range(grad.shape[2]):
                for ch in range(grad.shape[3]):
                    r0, c0 = r * strides[0], c * strides[1]
                    patch = padded[b, r0:r0 + window[0], c0:c0 + window[1], ch]
                    i, j = np.unravel_index(np.argmax(patch), patch.shape)
                    out[b, r0 + i, c0 + j, ch] += grad[b, r, c, ch]
    (top, _), (left, _) = padding
    return out[:, top:top + x.shape[1], left:left + x.shape[2]]


@pytest.mark.parametrize("window,strides,padding", SETTINGS)
@pytest.mark.parametrize("ties", [False, True])
def test_values_and_gradients(window, strides, padding, ties):
    x = (RNG.integers(0, 3, (2, 9, 8, 3)) if ties else RNG.standard_normal((2, 9, 8, 3))).astype(np.float32)
    out, vjp = jax.vjp(lambda x: max_pool(x, window, strides, padding), jnp.asarray(x))
    np.testing.assert_array_equal(out, numpy_max_pool(x, window, strides, padding))
    grad = RNG.standard_normal(out.shape).astype(np.float32)
    (got,) = vjp(jnp.asarray(grad))
    np.testing.assert_allclose(got, _numpy_first_max_grad(x, window, strides, padding, grad),
                               rtol=1e-6, atol=1e-6)
    # A second implementation: Flax's reduce_window pool and its select-and-scatter.
    (flax_grad,) = jax.vjp(lambda x: nn.max_pool(x, window, strides, padding), jnp.asarray(x))[1](grad)
    np.testing.assert_allclose(got, flax_grad, rtol=1e-6, atol=1e-6)


def test_gradient_has_no_scatter():
    x = jnp.ones((2, 16, 16, 4))
    grad = jax.jit(jax.grad(lambda x: jnp.sum(max_pool(x, (3, 3), (2, 2), ((1, 1), (1, 1))))))
    reference = jax.jit(jax.grad(lambda x: jnp.sum(nn.max_pool(x, (3, 3), (2, 2), ((1, 1), (1, 1))))))
    scatter_op = re.compile(r" (select-and-scatter|scatter)\(")
    assert scatter_op.search(reference.lower(x).compile().as_text())  # what is avoided
    assert not scatter_op.search(grad.lower(x).compile().as_text())


def test_rejects_non_nhwc():
    with pytest.raises(ValueError, match="NHWC"):
        max_pool(jnp.ones((4, 4, 3)), (2, 2), (2, 2), ((0, 0), (0, 0)))
