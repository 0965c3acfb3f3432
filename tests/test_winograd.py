"""Winograd's F(4x4, 3x3) convolution against a float64 numpy convolution,
its choice rules, and the ResNet built on it."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from noisy_flax.models import create_model
from noisy_flax.models.winograd import (AUTO_MIN_CHANNELS, AUTO_MIN_ROWS, AUTO_MIN_SIDE,
                                        uses_winograd, winograd_conv3x3)


def numpy_conv3x3(x, kernel):
    """Cross-correlation with padding 1, stride 1, NHWC by HWIO, in float64."""
    x = np.asarray(x, np.float64)
    kernel = np.asarray(kernel, np.float64)
    _, height, width, _ = x.shape
    padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    return sum(np.einsum("bhwc,co->bhwo", padded[:, i:i + height, j:j + width], kernel[i, j])
               for i in range(3) for j in range(3))


def numpy_conv3x3_gradients(x, kernel, out_grad):
    """d(sum(out * out_grad)) / d(x, kernel), written out from the definition."""
    x, kernel, out_grad = (np.asarray(a, np.float64) for a in (x, kernel, out_grad))
    _, height, width, _ = x.shape
    padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    padded_grad = np.zeros_like(padded)
    kernel_grad = np.zeros_like(kernel)
    for i in range(3):
        for j in range(3):
            window = padded[:, i:i + height, j:j + width]
            kernel_grad[i, j] = np.einsum("bhwc,bhwo->co", window, out_grad)
            padded_grad[:, i:i + height, j:j + width] += np.einsum("bhwo,co->bhwc", out_grad,
                                                                  kernel[i, j])
    return padded_grad[:, 1:-1, 1:-1], kernel_grad


def relative_error(actual, expected):
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    return float(np.linalg.norm(actual - expected) / np.linalg.norm(expected))


# Sides that are and are not whole 4x4 tiles, non-square maps, channel changes.
SHAPES = [(2, 8, 8, 3, 5), (1, 7, 9, 4, 4), (3, 5, 6, 2, 7), (1, 1, 1, 3, 2), (2, 14, 13, 6, 3)]


@pytest.mark.parametrize("batch,height,width,cin,cout", SHAPES)
def test_values_and_gradients_match_float64(batch, height, width, cin, cout):
    rng = np.random.default_rng(height * 100 + width)
    x = rng.standard_normal((batch, height, width, cin)).astype(np.float32)
    kernel = (rng.standard_normal((3, 3, cin, cout)) / np.sqrt(9 * cin)).astype(np.float32)
    out_grad = rng.standard_normal((batch, height, width, cout)).astype(np.float32)

    @jax.jit
    def forward_backward(x, kernel, out_grad):
        out, vjp = jax.vjp(winograd_conv3x3, x, kernel)
        return out, vjp(out_grad)

    out, (x_grad, kernel_grad) = forward_backward(x, kernel, out_grad)
    expected_x_grad, expected_kernel_grad = numpy_conv3x3_gradients(x, kernel, out_grad)

    # F(4x4, 3x3) rounds a little more than the direct form (its transforms
    # carry constants up to 8 and 1/24): a few 1e-6 here, 1e-7 for the direct form.
    assert out.shape == (batch, height, width, cout)
    assert relative_error(out, numpy_conv3x3(x, kernel)) < 2e-5
    assert relative_error(x_grad, expected_x_grad) < 2e-5
    assert relative_error(kernel_grad, expected_kernel_grad) < 2e-5


def test_it_runs_as_matmuls_with_no_convolution_left():
    x = jnp.ones((1, 8, 8, 4))
    kernel = jnp.ones((3, 3, 4, 4))
    text = jax.jit(jax.grad(lambda x, k: winograd_conv3x3(x, k).sum(), argnums=(0, 1))) \
        .lower(x, kernel).as_text()
    assert "convolution" not in text and "dot_general" in text


def test_bad_shapes_are_named():
    with pytest.raises(ValueError, match="NHWC map and a 3x3 HWIO kernel"):
        winograd_conv3x3(jnp.ones((8, 8, 4)), jnp.ones((3, 3, 4, 4)))
    with pytest.raises(ValueError, match="4 channels, the kernel takes 5"):
        winograd_conv3x3(jnp.ones((1, 8, 8, 4)), jnp.ones((3, 3, 5, 4)))


def test_choice_rules():
    # A 7x7 map is covered by 2 x 2 tiles of 4x4, so a batch of 32 gives 128.
    def choose(choice="auto", kernel_size=3, stride=1, input_shape=(32, 7, 7, 128),
               dtype=jnp.float32):
        return uses_winograd(choice, kernel_size=kernel_size, stride=stride,
                             input_shape=input_shape, dtype=dtype)

    assert (AUTO_MIN_SIDE, AUTO_MIN_CHANNELS, AUTO_MIN_ROWS) == (7, 128, 128)
    assert choose()  # this is a CPU
    assert not choose(input_shape=(32, 6, 7, 128))       # a side below 7
    assert not choose(input_shape=(32, 7, 7, 127))       # fewer than 128 channels
    assert not choose(input_shape=(31, 7, 7, 128))       # 124 tiles
    assert choose(input_shape=(16, 14, 14, 256))         # 16 x 4 x 4 = 256 tiles
    assert not choose(input_shape=(7, 16, 16, 128))      # 7 x 4 x 4 = 112 tiles
    assert not choose(input_shape=(16, 7, 7, 512))       # ResNet-50's last stage at batch 16
    assert not choose(stride=2)
    assert not choose(kernel_size=1)
    assert not choose(dtype=jnp.bfloat16)
    assert not choose("direct")
    assert choose("winograd", input_shape=(1, 1, 1, 1))
    assert not choose("winograd", stride=2)
    with pytest.raises(ValueError, match="needs float32, got bfloat16"):
        choose("winograd", dtype=jnp.bfloat16)
    with pytest.raises(ValueError, match="unknown conv_algorithm 'wino'"):
        choose("wino")


def test_auto_keeps_the_direct_form_off_the_cpu(monkeypatch):
    # cuDNN's and the TPU's convolutions are fast: "auto" takes Winograd on the CPU only.
    choose = lambda choice: uses_winograd(choice, kernel_size=3, stride=1,
                                          input_shape=(32, 14, 14, 256), dtype=jnp.float32)
    for backend in ("gpu", "tpu"):
        monkeypatch.setattr(jax, "default_backend", lambda: backend)
        assert not choose("auto")
        assert choose("winograd")  # asked for, it is taken anywhere


def _count_convolutions(model, variables, images):
    jaxpr = jax.make_jaxpr(lambda v, x: model.apply(v, x, train=False))(variables, images)
    return str(jaxpr).count("conv_general_dilated")


def test_resnet_takes_winograd_where_auto_says_and_keeps_parameters_and_outputs():
    images = jnp.asarray(np.random.default_rng(0).standard_normal((8, 64, 64, 3)), jnp.float32)
    models = {name: create_model("resnet18_small", num_classes=10, width=32, conv_algorithm=name)
              for name in ("auto", "direct")}
    # Initialised on one image, where "auto" picks no Winograd convolution at
    # all: the same parameters, initialised alike, so checkpoints load into either.
    variables = {name: m.init(jax.random.PRNGKey(0), images[:1]) for name, m in models.items()}
    jax.tree.map(np.testing.assert_array_equal, variables["auto"], variables["direct"])

    # resnet18_small of width 32 at 64 px: stages of 32, 64, 128 and 256 channels
    # at 64, 32, 16 and 8 px. Direct: the stem, 16 block convolutions and 3
    # projections. "auto" takes the stride-1 3x3 ones with 128 input channels
    # or more, on maps of 7 px or more, with 128 tiles or more: stage 3's
    # (8 images x 4 x 4 tiles), less its strided first; stage 4 has 8 x 2 x 2.
    assert _count_convolutions(models["direct"], variables["direct"], images) == 20
    assert _count_convolutions(models["auto"], variables["auto"], images) == 20 - 3
    assert _count_convolutions(models["auto"], variables["auto"], images[:1]) == 20

    def loss(model, params, batch_stats):
        logits, _ = model.apply({"params": params, "batch_stats": batch_stats}, images,
                                train=True, mutable=["batch_stats"])
        return jnp.sum(logits ** 2), logits

    results = {}
    for name, model in models.items():
        v = variables[name]
        gradient = jax.jit(jax.value_and_grad(lambda p, s: loss(model, p, s), has_aux=True))
        (_, logits), grads = gradient(v["params"], v["batch_stats"])
        results[name] = (logits, grads)
    logits_error = relative_error(results["auto"][0], results["direct"][0])
    assert 0 < logits_error < 1e-4
    # Same parameter tree on both sides (checked above), so the leaves pair up in order.
    for (path, grad), expected in zip(jax.tree_util.tree_leaves_with_path(results["auto"][1]),
                                      jax.tree.leaves(results["direct"][1]), strict=True):
        assert relative_error(grad, expected) < 1e-3, jax.tree_util.keystr(path)


def test_bottleneck_takes_winograd_in_its_stride_1_3x3_convolutions():
    """ResNet-50: 16 bottlenecks of 1x1, 3x3, 1x1 convolutions, 4 projections
    and the stem: 53 convolutions. Asked for Winograd, the 3x3 ones of
    stride 1 (all but the strided first of stages 2-4: 13) leave."""
    images = jnp.zeros((1, 16, 16, 3))
    counts = {}
    for name in ("direct", "winograd"):
        model = create_model("resnet50", num_classes=10, width=4, stem="small", conv_algorithm=name)
        variables = jax.eval_shape(model.init, jax.random.PRNGKey(0), images)
        counts[name] = _count_convolutions(model, variables, images)
    assert counts == {"direct": 53, "winograd": 53 - 13}


def test_resnet_rejects_an_unknown_algorithm():
    model = create_model("resnet18_small", num_classes=10, width=8, conv_algorithm="fast")
    with pytest.raises(ValueError, match="unknown conv_algorithm 'fast'"):
        model.init(jax.random.PRNGKey(0), jnp.ones((1, 32, 32, 3)))
