"""activations.relu: numpy's values and jax.nn.relu's gradient on either
backend, and on the CPU an output that XLA computes once."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

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
