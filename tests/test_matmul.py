"""flat_dot_general: the same numbers as numpy, and no transposed copies."""
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from noisy_flax import cpu_tuning
from noisy_flax.models.matmul import flat_dot_general

RNG = np.random.default_rng(0)


def _array(*shape):
    return RNG.standard_normal(shape).astype(np.float32)


# (lhs shape, rhs shape, dimension numbers, numpy einsum of the same product)
CASES = {
    "dense": ((4, 7, 12), (12, 5), (((2,), (0,)), ((), ())), "bnd,df->bnf"),
    "qkv projection": ((4, 7, 12), (12, 3, 4), (((2,), (0,)), ((), ())), "bnd,dhk->bnhk"),
    "output projection": ((4, 7, 3, 4), (3, 4, 12), (((2, 3), (0, 1)), ((), ())), "bnhk,hkd->bnd"),
    "negative axes": ((4, 7, 3, 4), (3, 4, 12), (((-2, -1), (0, 1)), ((), ())), "bnhk,hkd->bnd"),
    "batched (falls back)": ((4, 7, 12), (4, 12, 5), (((2,), (1,)), ((0,), (0,))), "bnd,bdf->bnf"),
    "leading contraction (falls back)": ((12, 7), (12, 5), (((0,), (0,)), ((), ())), "dn,df->nf"),
    "trailing contraction on the right (falls back)": ((4, 7, 12), (5, 12),
                                                       (((2,), (1,)), ((), ())), "bnd,fd->bnf"),
    "batch axis not leading on the right (falls back)": ((4, 7, 12), (12, 4, 5),
                                                          (((2,), (0,)), ((0,), (1,))),
                                                          "bnd,dbf->bnf"),
}


@pytest.mark.parametrize("name", CASES)
def test_matches_numpy(name):
    lhs_shape, rhs_shape, dims, spec = CASES[name]
    lhs, rhs = _array(*lhs_shape), _array(*rhs_shape)
    got = flat_dot_general(jnp.asarray(lhs), jnp.asarray(rhs), dims)
    want = np.einsum(spec, lhs.astype(np.float64), rhs.astype(np.float64))
    assert got.shape == want.shape
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)


def test_dense_gradients_match_closed_form():
    x, w, b = _array(3, 5, 8), _array(8, 6), _array(6)
    dense = nn.Dense(6, dot_general=flat_dot_general)
    params = {"params": {"kernel": jnp.asarray(w), "bias": jnp.asarray(b)}}
    loss = lambda p, x: 0.5 * jnp.sum(dense.apply(p, x) ** 2)
    grads, grad_x = jax.grad(loss, argnums=(0, 1))(params, jnp.asarray(x))
    # d/dW of ||xW + b||^2 / 2 is x^T (xW + b); d/dx is (xW + b) W^T.
    x64, w64 = x.astype(np.float64), w.astype(np.float64)
    y = x64 @ w64 + b
    np.testing.assert_allclose(grads["params"]["kernel"], np.einsum("bnd,bnf->df", x64, y), rtol=1e-4)
    np.testing.assert_allclose(grads["params"]["bias"], y.sum((0, 1)), rtol=1e-4)
    np.testing.assert_allclose(grad_x, y @ w64.T, rtol=1e-4, atol=1e-5)


def _transposed_copies(dot_general, compiler_options):
    x = jnp.ones((8, 50, 96))
    dense = nn.Dense(384, dot_general=dot_general)
    params = dense.init(jax.random.key(0), x)
    grad = jax.jit(jax.grad(lambda p, x: jnp.sum(dense.apply(p, x) ** 2)))
    hlo = grad.lower(params, x).compile(compiler_options=compiler_options).as_text()
    return re.findall(r"= f32\[[\d,]+\]\{[\d,]+\} (?:transpose|copy)\(", hlo)


@pytest.mark.parametrize("cpu_ynnpack", ["default", "reductions"])
def test_kernel_gradient_needs_no_transposed_copy(cpu_ynnpack):
    options = cpu_tuning.compiler_options(ml_collections.ConfigDict({"cpu_ynnpack": cpu_ynnpack}))
    # The control: XLA:CPU copies the activation gradient to a transposed
    # layout for lax.dot_general; if it ever stops, this test has nothing to show.
    assert _transposed_copies(None, options)
    assert _transposed_copies(flat_dot_general, options) == []
