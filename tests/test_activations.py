"""activations.relu: numpy's values and jax.nn.relu's gradient on either
backend, and on the CPU an output that XLA computes once. activations.gelu:
the exact GELU's values and derivative (scipy in float64), without erfc."""
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from scipy import special

from noisy_flax.models import activations

VALUES = np.array([-3.0, -1e-30, -0.0, 0.0, 1e-30, 2.5, np.inf, -np.inf, np.nan], np.float32)


@pytest.mark.parametrize("backend", ["cpu", "gpu"])
def test_values_and_gradient_match_numpy(backend, monkeypatch):
    monkeypatch.setattr(jax, "default_backend", lambda: backend)
    out, vjp = jax.vjp(activations.relu, jnp.asarray(VALUES))
    upstream = np.arange(1, VALUES.size + 1, dtype=np.float32)
    (grad,) = vjp(jnp.asarray(upstream))
    np.testing.assert_array_equal(out, np.maximum(VALUES, 0))  # NaN stays NaN
    # The derivative is 0 at 0 and for NaN, as jax.nn.relu and PyTorch have it.
    np.testing.assert_array_equal(grad, np.where(VALUES > 0, upstream, 0))


def _channel_major_copy_inputs(relu) -> list[int]:
    """For grad_w of conv(relu(a * 1.5 + b), w): how many full-size
    arrays each fusion producing the channel-major copy of the conv input
    reads (XLA:CPU's weight-gradient convolution works on that copy)."""
    def loss(a, b, w):
        x = relu(a * 1.5 + b)
        y = lax.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)),
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return jnp.sum(y * y)

    a, w = jnp.ones((4, 8, 8, 16)), jnp.ones((3, 3, 16, 16))
    hlo = jax.jit(jax.grad(loss, argnums=2)).lower(a, a, w).compile().as_text()
    headers = re.findall(r"^%\S+ \((.*)\) -> f32\[16,8,8,4\]", hlo, flags=re.M)
    return [params.count("f32[4,8,8,16]") for params in headers]


def test_cpu_weight_gradient_copy_reads_the_relu_output_only():
    if jax.default_backend() != "cpu":
        pytest.skip("an XLA:CPU property")
    # What is avoided: with max(x, 0) XLA re-computes a * 1.5 + b inside the copy.
    assert max(_channel_major_copy_inputs(jax.nn.relu)) == 2
    assert _channel_major_copy_inputs(activations.relu) == [1]


GELU_INPUTS = np.concatenate([np.linspace(-6, 6, 241), [-30.0, -1e-3, 0.0, 1e-3, 30.0]]).astype(np.float32)


def test_gelu_values_and_derivative_match_the_exact_gelu():
    x = GELU_INPUTS.astype(np.float64)
    cdf = special.ndtr(x)  # Phi(x), the normal CDF
    pdf = np.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)
    out, vjp = jax.vjp(activations.gelu, jnp.asarray(GELU_INPUTS))
    (grad,) = vjp(jnp.ones_like(out))
    np.testing.assert_allclose(out, x * cdf, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(grad, cdf + x * pdf, rtol=1e-6, atol=1e-6)
    # The tanh approximation is 1e-3 away at |x| ~ 2: the tolerance tells them apart.
    assert np.max(np.abs(jax.nn.gelu(GELU_INPUTS, approximate=True) - x * cdf)) > 1e-4


def test_gelu_forward_needs_no_exponential():
    # jax.nn.gelu's erfc expands into an exponential and branches; erf does not.
    count = lambda f: jax.jit(f).lower(jnp.ones((8, 16))).compile().as_text().count(" exponential(")
    assert count(lambda x: jax.nn.gelu(x, approximate=False)) >= 1
    assert count(activations.gelu) == 0
