"""Sums over and copies along the batch axis: numpy's values, and products
where XLA:CPU would otherwise sum over the batch axis."""
import importlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from noisy_flax import batch_axis
from noisy_flax.models import create_model

RNG = np.random.default_rng(0)


@pytest.mark.parametrize("shape", [(5, 3, 4), (1, 7), (9,)])
def test_sum_over_batch_is_numpy_s(shape):
    x = RNG.normal(size=shape).astype(np.float32)
    got = batch_axis.sum_over_batch(jnp.asarray(x))
    assert got.shape == (1,) + shape[1:] and got.dtype == jnp.float32
    np.testing.assert_allclose(got, x.astype(np.float64).sum(0, keepdims=True), rtol=1e-6, atol=1e-6)


def test_sum_over_batch_accumulates_in_the_dtype_asked_for():
    # 300 values near 1: their bfloat16 sum would be off by several units.
    half = jnp.asarray(RNG.uniform(0.5, 1.5, size=(300, 8)), jnp.bfloat16)
    got = batch_axis.sum_over_batch(half, jnp.float32)
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(got, np.asarray(half, np.float64).sum(0, keepdims=True), rtol=1e-6)
    assert batch_axis.sum_over_batch(half).dtype == jnp.bfloat16


def test_repeat_over_batch_is_broadcast_to():
    row = RNG.normal(size=(1, 3, 4)).astype(np.float32)
    got = batch_axis.repeat_over_batch(jnp.asarray(row), 6)
    np.testing.assert_array_equal(got, np.broadcast_to(row, (6, 3, 4)))


def test_repeat_over_batch_refuses_more_than_one_row():
    with pytest.raises(ValueError, match=r"takes one row, shape \(1, \.\.\.\), got \(2, 3\)"):
        batch_axis.repeat_over_batch(jnp.ones((2, 3)), 4)


def test_gradients_are_each_other():
    # The sum's gradient copies the cotangent to every row; the copy's sums it.
    x = jnp.asarray(RNG.normal(size=(4, 3)).astype(np.float32))
    row_cotangent = RNG.normal(size=(1, 3)).astype(np.float32)
    cotangent = RNG.normal(size=(4, 3)).astype(np.float32)
    _, vjp = jax.vjp(batch_axis.sum_over_batch, x)
    np.testing.assert_allclose(vjp(jnp.asarray(row_cotangent))[0],
                               np.broadcast_to(row_cotangent, (4, 3)), rtol=1e-6)
    _, vjp = jax.vjp(lambda r: batch_axis.repeat_over_batch(r, 4), jnp.ones((1, 3)))
    np.testing.assert_allclose(vjp(jnp.asarray(cotangent))[0], cotangent.sum(0, keepdims=True),
                               rtol=1e-5)


def _batch_sums(fn, arg, tokens):
    """Reduces over axis 0 to a non-scalar in the compiled forward and backward
    of fn(arg, tokens), tokens (32, 197, 192) given as an argument (not a
    constant XLA could fold)."""
    def forward_backward(arg, tokens, cotangent):
        out, vjp = jax.vjp(lambda a: fn(a, tokens), arg)
        return out, vjp(cotangent)
    cotangent = jax.eval_shape(fn, arg, tokens)
    hlo = jax.jit(forward_backward).lower(arg, tokens, cotangent).compile().as_text()
    return re.findall(r"= f32\[\d[\d,]*\]\S* reduce\([^\n]*dimensions=\{0\}", hlo)


def test_neither_direction_compiles_to_a_batch_sum():
    tokens = jax.ShapeDtypeStruct((32, 197, 192), jnp.float32)
    row = jax.ShapeDtypeStruct((1, 197, 192), jnp.float32)
    # The controls: jnp.sum and broadcasting do (the sum forward, the copy backward).
    assert _batch_sums(lambda x, _: jnp.sum(x, 0, keepdims=True), tokens, tokens)
    assert _batch_sums(lambda r, x: x + r, row, tokens)
    assert _batch_sums(lambda x, _: batch_axis.sum_over_batch(x), tokens, tokens) == []
    assert _batch_sums(lambda r, x: x + batch_axis.repeat_over_batch(r, 32), row, tokens) == []


def test_products_ask_for_full_float32_precision():
    # TPUs multiply float32 in bfloat16 pieces by default, GPUs in TF32.
    x = jnp.ones((4, 3))
    for fn in (batch_axis.sum_over_batch, lambda x: batch_axis.repeat_over_batch(x[:1], 4)):
        for lowered in (jax.jit(fn).lower(x), jax.jit(jax.grad(lambda x: jnp.sum(fn(x)))).lower(x)):
            dots = re.findall(r"stablehlo.dot_general[^\n]*", lowered.as_text())
            assert dots and all("precision = [HIGHEST, HIGHEST]" in d for d in dots), dots


def test_the_vit_position_embedding_gradient_is_no_batch_sum(monkeypatch):
    model = create_model("vit_nano_patch4_16", num_classes=5, num_layers=1)
    images = jnp.ones((8, 16, 16, 3))
    params = model.init(jax.random.key(0), images, train=False)["params"]

    def position_gradient_sums():
        def loss(params):
            return jnp.sum(model.apply({"params": params}, images, train=False) ** 2)
        hlo = jax.jit(jax.grad(loss)).lower(params).compile().as_text()
        tokens, width = params["Transformer"]["posembed_input"]["pos_embedding"].shape[1:]
        return re.findall(rf"= f32\[{tokens},{width}\]\S* reduce\([^\n]*dimensions=\{{0\}}", hlo)

    vit = importlib.import_module("noisy_flax.models.vit")
    monkeypatch.setattr(vit, "repeat_over_batch",
                        lambda row, k: jnp.broadcast_to(row, (k,) + row.shape[1:]))
    assert position_gradient_sums()  # the control: a broadcast's gradient is the sum
    monkeypatch.undo()
    assert position_gradient_sums() == []
