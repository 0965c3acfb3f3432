"""ViT and ResNet: published parameter counts, noise sites and switches."""
import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from noisy_flax import noise
from noisy_flax.models import create_model, input_size
from noisy_flax.models.vit import VisionTransformer
from test_pooling import numpy_max_pool

# Published parameter counts for 1000 classes (timm / torchvision model cards),
# BatchNorm running statistics not counted.
PUBLISHED_COUNTS = {
    "vit_tiny_patch16_224": 5_717_416,
    "vit_small_patch16_224": 22_050_664,
    "vit_base_patch16_224": 86_567_656,
    "vit_base_patch16_384": 86_859_496,
    "vit_base_patch32_224": 88_224_232,
    "vit_large_patch16_224": 304_326_632,
    # Closed form for width 1280, 32 blocks, MLP 5120, 257 tokens and a
    # 1000-class head; the ViT paper's Table 1 rounds it to 632M.
    "vit_huge_patch14_224": 632_045_800,
    "resnet18": 11_689_512,
    "resnet34": 21_797_672,
    "resnet50": 25_557_032,
    "resnet101": 44_549_160,
    "resnet152": 60_192_808,
}


def param_count(model, size):
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, size, size, 3)),
                                               train=False))
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes["params"]))


@pytest.mark.parametrize("name,count", PUBLISHED_COUNTS.items())
def test_published_parameter_counts(name, count):
    model = create_model(name, num_classes=1000)
    assert param_count(model, input_size(model) if "vit" in name else 224) == count


def test_nano_vit_parameter_count_is_the_documented_one():
    """BENCHMARKS.md: vit_nano_patch7_28 on Fashion-MNIST (1 channel, 10
    classes) has width 64, 6 blocks and 205,962 parameters; in closed form
    with MLP width 128: 7*7*64 + 64 (patches) + 64 (cls) + 17*64 (posemb)
    + 6 * (4 * (64*64 + 64) + 4*64 + 2*64*128 + 128 + 64) + 2*64 + 64*10 + 10."""
    model = create_model("vit_nano_patch7_28", num_classes=10)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 28, 28, 1))))
    assert sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes["params"])) == 205_962


def test_vit_parameter_names_follow_augreg_layout():
    model = create_model("vit_nano_patch4_32", num_classes=10, num_layers=2,
                         representation_size=16)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3))))
    names = {"/".join(k) for k in flax.traverse_util.flatten_dict(shapes["params"])}
    for expected in ["embedding/kernel", "cls", "Transformer/posembed_input/pos_embedding",
                     "Transformer/encoderblock_1/MultiHeadDotProductAttention_1/query/kernel",
                     "Transformer/encoderblock_0/MultiHeadDotProductAttention_1/out/kernel",
                     "Transformer/encoderblock_0/LayerNorm_0/scale",
                     "Transformer/encoderblock_0/LayerNorm_2/bias",
                     "Transformer/encoderblock_0/MlpBlock_3/Dense_1/kernel",
                     "Transformer/encoder_norm/scale", "pre_logits/kernel", "head/bias"]:
        assert expected in names
    q = flax.traverse_util.flatten_dict(shapes["params"])[
        ("Transformer", "encoderblock_0", "MultiHeadDotProductAttention_1", "query", "kernel")]
    assert q.shape == (64, 4, 16)  # (width, heads, head_dim) as in augreg files


@pytest.mark.parametrize("variant,width,heads", [
    ("tiny", 192, 3), ("small", 384, 6), ("base", 768, 12), ("large", 1024, 16), ("huge", 1280, 16)])
def test_vit_head_counts_are_the_published_ones(variant, width, heads):
    """Heads do not change the parameter count: the query kernel's
    (width, heads, head_dim) shape tells them (ViT paper Table 1; timm's
    Ti and S)."""
    model = create_model(f"vit_{variant}_patch16_224", num_classes=10, num_layers=1)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 224, 224, 3))))
    attention = shapes["params"]["Transformer"]["encoderblock_0"]["MultiHeadDotProductAttention_1"]
    assert attention["query"]["kernel"].shape == (width, heads, width // heads)


def test_vit_initialisation_follows_vit_jax():
    """vit_jax's initialisers: zero class token and head, position embedding
    N(0, 0.02^2), MLP biases N(0, 1e-6^2), attention and MLP kernels
    Glorot-uniform on the flattened (fan_in, fan_out) matrix, whose bound is
    sqrt(6 / (fan_in + fan_out)) and standard deviation bound / sqrt(3)."""
    model = create_model("vit_tiny_patch16_224", num_classes=10, num_layers=1)
    params = jax.device_get(model.init(jax.random.key(0), jnp.zeros((1, 224, 224, 3)))["params"])
    np.testing.assert_array_equal(params["cls"], 0)
    np.testing.assert_array_equal(params["head"]["kernel"], 0)
    np.testing.assert_array_equal(params["head"]["bias"], 0)
    posemb = params["Transformer"]["posembed_input"]["pos_embedding"]  # 197 x 192 draws
    assert np.std(posemb) == pytest.approx(0.02, rel=0.03)
    block = params["Transformer"]["encoderblock_0"]
    for dense in block["MlpBlock_3"].values():
        assert 0 < np.std(dense["bias"]) < 2e-6
    kernels = {"query": (192, 192), "out": (192, 192), "Dense_0": (192, 768), "Dense_1": (768, 192)}
    for name, (fan_in, fan_out) in kernels.items():
        layer = block["MlpBlock_3" if name.startswith("Dense") else "MultiHeadDotProductAttention_1"]
        kernel = layer[name]["kernel"]
        bound = np.sqrt(6 / (fan_in + fan_out))
        assert bound * 0.99 < np.max(np.abs(kernel)) <= bound, name
        assert np.std(kernel) == pytest.approx(bound / np.sqrt(3), rel=0.03), name


def tiny_vit(noise_cfg=None, **kw):
    return create_model("vit_nano_patch4_16", num_classes=5, num_layers=3,
                        noise=noise_cfg, **kw)


def images(batch=6, size=16, seed=0):
    return jnp.asarray(np.random.default_rng(seed).normal(size=(batch, size, size, 3)), jnp.float32)


@pytest.fixture(scope="module")
def vit_variables():
    variables = tiny_vit().init(jax.random.key(0), images(), train=False)
    # The head starts at zero (as in vit_jax); give it weights so logits differ.
    head = variables["params"]["head"]
    head["kernel"] = jax.random.normal(jax.random.key(1), head["kernel"].shape)
    return variables


OPTIMAL = {"type": "optimal_q", "scope": "global"}


@pytest.mark.parametrize("site", ["image", "embedding", "block_input", "attn_input"])
def test_noise_switched_off_for_mode_is_exactly_noiseless(vit_variables, site):
    x = images()
    clean = tiny_vit().apply(vit_variables, x, train=False)
    off = tiny_vit({**OPTIMAL, "site": site, "train": True, "eval": False}).apply(
        vit_variables, x, train=False)
    on = tiny_vit({**OPTIMAL, "site": site, "train": False, "eval": True}).apply(
        vit_variables, x, train=False)
    np.testing.assert_array_equal(off, clean)
    assert not np.allclose(on, clean, atol=1e-4)


@pytest.mark.parametrize("site", ["embedding", "block_input", "attn_input"])
def test_class_token_untouched_at_noise_site(vit_variables, site):
    model = tiny_vit({**OPTIMAL, "site": site, "layer": 1})
    _, state = model.apply(vit_variables, images(), train=False, mutable=["intermediates"])
    leaves = flax.traverse_util.flatten_dict(state["intermediates"])
    (before,) = [v[0] for k, v in leaves.items() if k[-1] == "noise_input"]
    (after,) = [v[0] for k, v in leaves.items() if k[-1] == "noise_output"]
    np.testing.assert_array_equal(after[:, 0], before[:, 0])
    patches = np.asarray(before[:, 1:], np.float64)  # (I + Q*) x = (x_b + sum_j x_j) / (k + 1)
    expected = (patches + patches.sum(0)) / (len(patches) + 1)
    np.testing.assert_allclose(after[:, 1:], expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["vit_nano_patch4_16", "resnet18_small"])
def test_within_image_noise_at_the_image_site_mixes_pixel_rows(name):
    """At the image site the rows (axis 1) are the image's pixel rows: each
    image is mixed with its own rows only, by (I + Q*) of its height."""
    model = create_model(name, num_classes=5,
                         noise={"type": "within_image", "site": "image", "scope": "global"})
    x = images(3, 16)
    variables = model.init(jax.random.key(0), x, train=False)
    _, state = model.apply(variables, x, train=False, mutable=["intermediates", "batch_stats"])
    leaves = flax.traverse_util.flatten_dict(state["intermediates"])
    (before,) = [v[0] for k, v in leaves.items() if k[-1] == "noise_input"]
    (after,) = [v[0] for k, v in leaves.items() if k[-1] == "noise_output"]
    np.testing.assert_array_equal(before, x)
    mix = np.eye(16) + (np.ones((16, 16)) - 16 * np.eye(16)) / 17  # the paper's Q*, k = 16
    np.testing.assert_allclose(after, np.einsum("rs,bswc->brwc", mix, np.asarray(x)),
                               rtol=1e-5, atol=1e-5)


def test_noise_at_block_changes_nothing_before_it(vit_variables):
    x = images()
    def block_outputs(noise_cfg):
        _, state = tiny_vit(noise_cfg).apply(vit_variables, x, train=False,
                                             capture_intermediates=True, mutable=["intermediates"])
        tr = state["intermediates"]["Transformer"]
        return [np.asarray(tr[f"encoderblock_{i}"]["__call__"][0]) for i in range(3)]
    clean = block_outputs(None)
    noisy = block_outputs({**OPTIMAL, "site": "attn_input", "layer": 1})  # not the default last
    np.testing.assert_array_equal(noisy[0], clean[0])
    for i in (1, 2):
        assert not np.allclose(noisy[i], clean[i], atol=1e-4)


def test_negative_layer_counts_from_end(vit_variables):
    x = images()
    last = tiny_vit({**OPTIMAL, "layer": -1}).apply(vit_variables, x)
    explicit = tiny_vit({**OPTIMAL, "layer": 2}).apply(vit_variables, x)
    np.testing.assert_array_equal(last, explicit)
    first = tiny_vit({**OPTIMAL, "layer": -3}).apply(vit_variables, x)  # -depth is block 0
    np.testing.assert_array_equal(first, tiny_vit({**OPTIMAL, "layer": 0}).apply(vit_variables, x))
    middle = tiny_vit({**OPTIMAL, "layer": -2}).apply(vit_variables, x)
    np.testing.assert_array_equal(middle, tiny_vit({**OPTIMAL, "layer": 1}).apply(vit_variables, x))
    assert not np.allclose(middle, last, atol=1e-4)


def test_layer_out_of_range_is_clear(vit_variables):
    with pytest.raises(ValueError, match="out of range.*-3..2"):
        tiny_vit({**OPTIMAL, "layer": 3}).apply(vit_variables, images())


def test_published_vit_protocol_noise_only_at_eval(vit_variables):
    """train=False, eval=True: training forward is clean, evaluation is not."""
    x = images()
    model = tiny_vit({**OPTIMAL, "train": False, "eval": True})
    clean = tiny_vit()
    np.testing.assert_array_equal(model.apply(vit_variables, x, train=True),
                                  clean.apply(vit_variables, x, train=True))
    assert not np.allclose(model.apply(vit_variables, x, train=False),
                           clean.apply(vit_variables, x, train=False), atol=1e-4)


def test_within_image_noise_never_mixes_samples(vit_variables):
    x = np.asarray(images())
    model = tiny_vit({"type": "within_image", "site": "embedding"})
    out = model.apply(vit_variables, jnp.asarray(x))
    x2 = x.copy(); x2[0] = 0
    out2 = model.apply(vit_variables, jnp.asarray(x2))
    np.testing.assert_allclose(out[1:], out2[1:], atol=1e-6)
    assert not np.allclose(out, tiny_vit().apply(vit_variables, jnp.asarray(x)), atol=1e-4)


def test_random_noise_needs_and_uses_noise_rng(vit_variables):
    model = tiny_vit({"type": "gaussian", "strength": 1.0})
    with pytest.raises(ValueError, match="rngs"):
        model.apply(vit_variables, images())
    a = model.apply(vit_variables, images(), rngs={"noise": jax.random.key(1)})
    b = model.apply(vit_variables, images(), rngs={"noise": jax.random.key(1)})
    c = model.apply(vit_variables, images(), rngs={"noise": jax.random.key(2)})
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)


def test_eval_mask_keeps_padding_out_of_real_predictions(vit_variables):
    x = np.asarray(images(batch=6))
    model = tiny_vit(OPTIMAL)
    real_only = model.apply(vit_variables, jnp.asarray(x[:4]))
    padded = np.concatenate([x[:4], np.zeros_like(x[:2])])
    masked = model.apply(vit_variables, jnp.asarray(padded), mask=jnp.asarray([1, 1, 1, 1, 0, 0], bool))
    np.testing.assert_allclose(masked[:4], real_only, rtol=1e-5, atol=1e-5)


def test_bf16_compute_keeps_fp32_params(vit_variables):
    model = tiny_vit(dtype=jnp.bfloat16)
    variables = model.init(jax.random.key(0), images())
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(variables["params"]))
    out16 = model.apply(vit_variables, images())
    out32 = tiny_vit().apply(vit_variables, images())
    # bf16 keeps 8 bits of mantissa: a few percent of the logit scale, not zero.
    assert 0 < np.max(np.abs(out16 - out32)) < 0.03 * np.max(np.abs(out32))
    assert out16.dtype == jnp.float32
    computes_in = lambda m: str(jax.make_jaxpr(lambda v: m.apply(v, images()))(vit_variables))
    assert "bf16[" in computes_in(model) and "bf16[" not in computes_in(tiny_vit())


def test_remat_gives_same_gradients(vit_variables):
    x = images()
    def loss(model, params):
        return jnp.sum(model.apply({"params": params}, x, train=False) ** 2)
    plain = jax.grad(lambda p: loss(tiny_vit(), p))(vit_variables["params"])
    remat = jax.grad(lambda p: loss(tiny_vit(remat=True), p))(vit_variables["params"])
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), plain, remat)
    # The rematerialised blocks are really there (and absent without remat).
    jaxpr = lambda m: str(jax.make_jaxpr(jax.grad(lambda p: loss(m, p)))(vit_variables["params"]))
    assert "remat" in jaxpr(tiny_vit(remat=True)) and "remat" not in jaxpr(tiny_vit())


def test_stochastic_depth_and_dropout_only_in_training(vit_variables):
    model = tiny_vit(drop_path_rate=0.5, dropout_rate=0.1, attention_dropout_rate=0.1)
    x = images()
    np.testing.assert_array_equal(model.apply(vit_variables, x, train=False),
                                  tiny_vit().apply(vit_variables, x, train=False))
    a = model.apply(vit_variables, x, train=True, rngs={"dropout": jax.random.key(0)})
    b = model.apply(vit_variables, x, train=True, rngs={"dropout": jax.random.key(1)})
    assert not np.allclose(a, b)


def test_stochastic_depth_drops_whole_branches_per_sample():
    """drop_path_rate=0.5, no dropout: each of a block's two residual
    branches is dropped per sample with probability 1/2, so a quarter of the
    samples leave the block exactly as they entered it."""
    from noisy_flax.models.vit import Encoder1DBlock
    x = np.random.default_rng(6).standard_normal((64, 5, 8)).astype(np.float32)
    block = Encoder1DBlock(mlp_dim=16, num_heads=2, grid=(2, 2), drop_path_rate=0.5)
    params = block.init(jax.random.key(0), x, False)["params"]
    out = np.asarray(block.apply({"params": params}, x, True, rngs={"dropout": jax.random.key(3)}))
    untouched = int(np.sum(np.all(out == x, axis=(1, 2))))
    assert 6 <= untouched <= 28  # Binomial(64, 1/4): mean 16, sd 3.5
    np.testing.assert_array_equal(block.apply({"params": params}, x, False),
                                  Encoder1DBlock(mlp_dim=16, num_heads=2, grid=(2, 2)).apply(
                                      {"params": params}, x, False))


def test_image_size_not_divisible_by_patch(vit_variables):
    with pytest.raises(ValueError, match="not divisible by the patch size"):
        tiny_vit().init(jax.random.key(0), jnp.zeros((1, 18, 18, 3)))


def test_image_width_not_divisible_by_patch():
    with pytest.raises(ValueError, match="16x18 is not divisible by the patch size 4"):
        tiny_vit().init(jax.random.key(0), jnp.zeros((1, 16, 18, 3)))
    with pytest.raises(ValueError, match="18x16 is not divisible by the patch size 4"):
        tiny_vit().init(jax.random.key(0), jnp.zeros((1, 18, 16, 3)))


@pytest.mark.parametrize("name", ["vit_nano_patch4_16", "resnet18_small"])
def test_channels_first_images_are_named_as_such(name):
    model = create_model(name, num_classes=5)
    with pytest.raises(ValueError, match=r"look channels-first \(NCHW\); the models take NHWC"):
        model.init(jax.random.key(0), jnp.zeros((2, 3, 16, 16)), train=False)
    model.init(jax.random.key(0), jnp.zeros((2, 16, 16, 3)), train=False)  # NHWC is fine
    model.init(jax.random.key(0), jnp.zeros((2, 16, 16, 4)), train=False)  # with any channel count


def test_width_not_divisible_by_heads_is_refused():
    # 64 = 5 x 12 + 4: 5 heads of 12 would silently drop 4 features from attention.
    with pytest.raises(ValueError, match="width 64 is not divisible by 5 heads"):
        tiny_vit(num_heads=5).init(jax.random.key(0), images())


def test_images_of_another_size_than_the_position_embedding_are_named(vit_variables):
    # 16 px in 4 px patches: 16 + 1 positions; 32 px: 64 + 1 tokens.
    with pytest.raises(ValueError, match="has 17 positions but the input has 65 tokens"):
        tiny_vit().apply(vit_variables, images(2, 32))


def test_unknown_model_name_suggests():
    with pytest.raises(ValueError, match="did you mean.*resnet50"):
        create_model("resnet5O", num_classes=10)


@pytest.mark.parametrize("name,size", [("resnet18_small", 32), ("resnet50", 224),
                                       ("vit_base_patch16_384", 384), ("vit_nano_patch4_28", 28)])
def test_input_size_is_the_one_the_name_says(name, size):
    # ViT: the resolution in the name; ResNet: 32 px for the small stem, ImageNet's 224 otherwise.
    assert input_size(create_model(name, num_classes=10)) == size


# --------------------------------------------------------------------------
# ResNet
# --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def resnet_setup():
    model = create_model("resnet18_small", num_classes=10, width=8)
    variables = model.init(jax.random.key(0), images(4, 16), train=False)
    return variables


def small_resnet(noise_cfg=None):
    return create_model("resnet18_small", num_classes=10, width=8, noise=noise_cfg)


def test_resnet_noise_at_last_block_of_stage4(resnet_setup):
    x = images(4, 16)
    def outputs(noise_cfg):
        _, state = small_resnet(noise_cfg).apply(resnet_setup, x, train=False,
                                                 capture_intermediates=True, mutable=["intermediates"])
        inter = state["intermediates"]
        return {k: np.asarray(v["__call__"][0]) for k, v in inter.items() if k.startswith("layer")}
    clean = outputs(None)
    noisy = outputs({"type": "circulant", "alpha": 0.4, "site": "block_input", "stage": 4,
                     "layer": -1, "scope": "global"})
    for name in ["layer1_0", "layer2_1", "layer3_1", "layer4_0"]:
        np.testing.assert_array_equal(noisy[name], clean[name])
    assert not np.allclose(noisy["layer4_1"], clean["layer4_1"], atol=1e-5)


@pytest.mark.parametrize("site", ["image", "block_input"])
def test_resnet_noise_switched_off_for_mode_is_exactly_noiseless(resnet_setup, site):
    x = images(4, 16)
    cfg = {**OPTIMAL, "site": site, "stage": 2, "layer": 0}
    for train in (False, True):
        def logits(noise_cfg):
            return small_resnet(noise_cfg).apply(resnet_setup, x, train=train,
                                                 mutable=["batch_stats"])[0]
        clean = logits(None)
        np.testing.assert_array_equal(logits({**cfg, "train": not train, "eval": train}), clean)
        assert not np.allclose(logits({**cfg, "train": train, "eval": not train}), clean, atol=1e-4)


def test_resnet_noise_input_is_circulant_of_previous_block(resnet_setup):
    model = small_resnet({"type": "circulant", "alpha": 0.4, "site": "block_input",
                          "stage": 3, "layer": 1, "scope": "global"})
    _, state = model.apply(resnet_setup, images(4, 16), train=False,
                           capture_intermediates=True, mutable=["intermediates"])
    inter = state["intermediates"]
    before = np.asarray(inter["layer3_0"]["__call__"][0])
    np.testing.assert_allclose(inter["noise_input"][0], before)
    k = before.shape[0]
    expected = np.stack([0.6 * before[b] + 0.4 * before[(b + 1) % k] for b in range(k)])
    np.testing.assert_allclose(inter["noise_output"][0], expected, rtol=1e-5, atol=1e-6)


def test_resnet_rejects_vit_site(resnet_setup):
    with pytest.raises(ValueError, match="ViT site"):
        small_resnet({"type": "optimal_q", "site": "attn_input"}).apply(resnet_setup, images(4, 16))


def test_resnet_stage_out_of_range(resnet_setup):
    with pytest.raises(ValueError, match="stage 5"):
        small_resnet({"type": "optimal_q", "site": "block_input", "stage": 5}).apply(
            resnet_setup, images(4, 16))


def test_resnet_unknown_stem_is_refused():
    with pytest.raises(ValueError, match="unknown ResNet stem 'cifar'"):
        create_model("resnet18", num_classes=3, width=4, stem="cifar").init(
            jax.random.key(0), images(1, 16))


def test_resnet_imagenet_stem_downsamples_32x():
    model = create_model("resnet18", num_classes=3, width=8)
    _, state = model.init_with_output(jax.random.key(0), jnp.zeros((1, 64, 64, 3)),
                                      capture_intermediates=True)
    assert state["intermediates"]["layer4_1"]["__call__"][0].shape == (1, 2, 2, 64)


def test_resnet_batch_stats_follow_pytorch_momentum(resnet_setup):
    model = small_resnet()
    x = images(4, 16)
    _, state = model.apply(resnet_setup, x, train=True, capture_intermediates=True,
                           mutable=["batch_stats", "intermediates"])
    conv_out = np.asarray(state["intermediates"]["conv1"]["__call__"][0])
    old = np.asarray(resnet_setup["batch_stats"]["bn1"]["mean"])
    # PyTorch momentum 0.1: new = 0.9 old + 0.1 batch mean.
    expected = 0.9 * old + 0.1 * conv_out.mean(axis=(0, 1, 2))
    np.testing.assert_allclose(state["batch_stats"]["bn1"]["mean"], expected, rtol=1e-5, atol=1e-6)
    _, unchanged = model.apply(resnet_setup, x, train=False, mutable=["batch_stats"])
    np.testing.assert_array_equal(unchanged["batch_stats"]["bn1"]["mean"], old)


def numpy_conv(x, kernel, stride, pad):
    """Cross-correlation of NHWC x with an HWIO kernel, zero padding ``pad`` on every side."""
    size = kernel.shape[0]
    padded = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    out_h = (padded.shape[1] - size) // stride + 1
    out_w = (padded.shape[2] - size) // stride + 1
    out = np.zeros((x.shape[0], out_h, out_w, kernel.shape[3]))
    for i in range(size):
        for j in range(size):
            window = padded[:, i:i + stride * (out_h - 1) + 1:stride, j:j + stride * (out_w - 1) + 1:stride]
            out += window @ kernel[i, j]
    return out


def test_resnet_stem_matches_torchvision_in_numpy():
    """torchvision's stem: 7x7 conv, stride 2, padding 3 on every side; BatchNorm
    with eps 1e-5 (running statistics in evaluation); ReLU; 3x3 max-pool,
    stride 2, padding 1. At 30 px the stem's map is 15 px (odd), so the pool
    reads its bottom and right padding too. The pool's output is read where
    block_input noise in layer1_0 records its input."""
    model = create_model("resnet18", num_classes=3, width=4,
                         noise={"type": "optimal_q", "site": "block_input", "stage": 1,
                                "layer": 0, "scope": "global"})
    # Small images and running variances of the order of eps, where eps 1e-5
    # and e.g. 1e-3 or 1e-6 give different outputs.
    x = 1e-3 * np.asarray(images(2, 30), np.float64)
    variables = jax.device_get(model.init(jax.random.key(0), jnp.asarray(x, jnp.float32)))
    rng = np.random.default_rng(3)
    stats = variables["batch_stats"]["bn1"]
    stats["mean"] = 1e-3 * rng.normal(size=4).astype(np.float32)
    stats["var"] = np.array([1e-5, 3e-5, 1e-4, 2e-6], np.float32)
    bn = variables["params"]["bn1"]
    bn["scale"], bn["bias"] = rng.normal(size=(2, 4)).astype(np.float32)
    _, state = model.apply(variables, jnp.asarray(x, jnp.float32), train=False,
                           capture_intermediates=True, mutable=["intermediates"])
    inter = state["intermediates"]
    conv = numpy_conv(x, np.asarray(variables["params"]["conv1"]["kernel"], np.float64), 2, 3)
    assert conv.shape == (2, 15, 15, 4)
    np.testing.assert_allclose(inter["conv1"]["__call__"][0], conv, rtol=1e-4, atol=1e-7)
    normed = ((conv - stats["mean"]) / np.sqrt(np.asarray(stats["var"], np.float64) + 1e-5)
              * bn["scale"] + bn["bias"])
    np.testing.assert_allclose(inter["bn1"]["__call__"][0], normed, rtol=1e-3, atol=1e-4)
    pooled = numpy_max_pool(np.maximum(normed, 0), (3, 3), (2, 2), ((1, 1), (1, 1)))
    assert pooled.shape == (2, 8, 8, 4)
    np.testing.assert_allclose(inter["noise_input"][0], pooled, rtol=1e-3, atol=1e-4)


def _small_resnet_intermediates():
    """A width-4 resnet18_small on two 16 px images: (images, variables, intermediates)."""
    model = create_model("resnet18_small", num_classes=3, width=4)
    x = images(2, 16)
    variables = model.init(jax.random.key(0), x, train=False)
    _, state = model.apply(variables, x, train=False, capture_intermediates=True,
                           mutable=["intermediates"])
    return x, variables, state["intermediates"]


def test_resnet_small_stem_is_one_3x3_stride_1_convolution():
    """The stem for 28-32 px images (as in the CIFAR ResNets): a 3x3
    convolution, stride 1, padding 1, then BatchNorm and ReLU, no max-pool,
    so layer1 sees the full 16 x 16 map."""
    x, variables, inter = _small_resnet_intermediates()
    kernel = np.asarray(variables["params"]["conv1"]["kernel"], np.float64)
    assert kernel.shape == (3, 3, 3, 4)
    expected = numpy_conv(np.asarray(x, np.float64), kernel, 1, 1)
    np.testing.assert_allclose(inter["conv1"]["__call__"][0], expected, rtol=1e-4, atol=1e-5)
    assert inter["layer1_0"]["__call__"][0].shape == (2, 16, 16, 4)


def test_resnet_strided_3x3_convolution_pads_one_on_every_side():
    """PyTorch pads a 3x3, stride-2 convolution by 1 on each side; 'SAME'
    would pad an even map by 0 on the top and left and 1 on the bottom and
    right, shifting every output by one pixel."""
    x, variables, inter = _small_resnet_intermediates()
    before = np.asarray(inter["layer1_1"]["__call__"][0], np.float64)  # 16 x 16
    kernel = np.asarray(variables["params"]["layer2_0"]["conv1"]["kernel"], np.float64)
    expected = numpy_conv(before, kernel, 2, 1)
    assert expected.shape == (2, 8, 8, 8)
    np.testing.assert_allclose(inter["layer2_0"]["conv1"]["__call__"][0], expected,
                               rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("block_name,features,stride,in_channels", [
    ("BasicBlock", 4, 1, 4),   # identity shortcut
    ("BasicBlock", 8, 2, 4),   # strided 1x1 projection
    ("Bottleneck", 2, 2, 4),   # 1x1, strided 3x3, 1x1 to 4x the width; projection
])
def test_resnet_blocks_match_torchvision_in_numpy(block_name, features, stride, in_channels):
    """torchvision's BasicBlock and Bottleneck (v1.5) in evaluation mode:
    conv-BN-ReLU, conv-BN (Bottleneck: one more conv-BN-ReLU first), plus the
    shortcut (identity, or a strided 1x1 conv and BN when the shape
    changes), then ReLU; BatchNorm with eps 1e-5 and set running statistics."""
    from noisy_flax.models.resnet import BasicBlock, Bottleneck
    block = {"BasicBlock": BasicBlock, "Bottleneck": Bottleneck}[block_name](features, stride=stride)
    x = np.random.default_rng(8).standard_normal((2, 8, 8, in_channels)).astype(np.float32)
    variables = jax.device_get(block.init(jax.random.key(0), x, train=False))
    rng = np.random.default_rng(9)
    for name, stats in variables["batch_stats"].items():
        size = stats["mean"].shape[0]
        stats["mean"] = rng.normal(size=size).astype(np.float32)
        stats["var"] = rng.uniform(0.5, 2, size=size).astype(np.float32)
        bn = variables["params"][name]
        bn["scale"] = rng.uniform(0.5, 1.5, size=size).astype(np.float32)
        bn["bias"] = rng.normal(size=size).astype(np.float32)
    got = block.apply(variables, x, train=False)
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), variables["params"])
    s = jax.tree.map(lambda a: np.asarray(a, np.float64), variables["batch_stats"])

    def norm(name, y):
        return (y - s[name]["mean"]) / np.sqrt(s[name]["var"] + 1e-5) * p[name]["scale"] + p[name]["bias"]

    def conv(name, y, stride):
        kernel = p[name]["kernel"]
        return numpy_conv(y, kernel, stride, kernel.shape[0] // 2)

    h = x.astype(np.float64)
    if block_name == "BasicBlock":
        out_channels = features
        y = np.maximum(norm("bn1", conv("conv1", h, stride)), 0)
        y = norm("bn2", conv("conv2", y, 1))
    else:
        out_channels = 4 * features
        y = np.maximum(norm("bn1", conv("conv1", h, 1)), 0)
        y = np.maximum(norm("bn2", conv("conv2", y, stride)), 0)
        y = norm("bn3", conv("conv3", y, 1))
    projection = stride != 1 or in_channels != out_channels
    assert ("downsample_conv" in p) == projection
    shortcut = norm("downsample_bn", conv("downsample_conv", h, stride)) if projection else h
    np.testing.assert_allclose(got, np.maximum(y + shortcut, 0), rtol=1e-4, atol=1e-4)


def test_resnet_kernels_follow_torchvisions_kaiming_fan_out():
    """torchvision: kaiming_normal_(mode='fan_out', nonlinearity='relu'),
    std sqrt(2 / (k * k * out_channels)), for every convolution, the 1x1
    projections too. A normal, not truncated: 1.24% of the draws lie
    beyond 2.5 standard deviations (a 2-sigma truncation leaves none)."""
    model = create_model("resnet18_small", num_classes=3, width=16)
    params = jax.device_get(model.init(jax.random.key(0), images(1, 16), train=False)["params"])
    standardised = []
    for conv in ("conv1", "downsample_conv"):
        kernel = params["layer2_0"][conv]["kernel"]  # (k, k, 16, 32)
        fan_out = kernel.shape[0] * kernel.shape[1] * kernel.shape[3]
        assert np.std(kernel) == pytest.approx(np.sqrt(2 / fan_out), rel=0.1), conv
        standardised.append(np.ravel(kernel) / np.sqrt(2 / fan_out))
    tail = np.mean(np.abs(np.concatenate(standardised)) > 2.5)  # 5120 draws
    assert 0.006 < tail < 0.02


def numpy_attention(params, x):
    """Multi-head attention in float64 numpy, vit_jax's parameter layout."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    project = lambda name: np.einsum("bnd,dhk->bnhk", x, p[name]["kernel"]) + p[name]["bias"]
    q, k, v = project("query"), project("key"), project("value")
    logits = np.einsum("bqhk,bshk->bhqs", q, k) / np.sqrt(q.shape[-1])
    weights = np.exp(logits - logits.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    attended = np.einsum("bhqs,bshk->bqhk", weights, v)
    return np.einsum("bqhk,hkd->bqd", attended, p["out"]["kernel"]) + p["out"]["bias"]


def numpy_layer_norm(p, x):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + 1e-6) * p["scale"] + p["bias"]


@pytest.mark.parametrize("site", ["block_input", "attn_input"])
def test_noisy_block_matches_numpy(site):
    """One pre-norm block with optimal-Q noise, written out in numpy: at
    ``attn_input`` the noise mixes the LayerNorm-1 output that feeds the
    attention, and the residual stream keeps the clean input (the published
    NoisyViT site); at ``block_input`` the block's input itself is mixed."""
    from scipy.special import erf
    from noisy_flax.models.vit import Encoder1DBlock
    x = np.random.default_rng(4).standard_normal((3, 5, 8)).astype(np.float32)
    block = Encoder1DBlock(mlp_dim=16, num_heads=2, grid=(2, 2),
                           noise=noise.make_noise({**OPTIMAL, "site": site}))
    params = block.init(jax.random.key(0), x, False)["params"]
    got = block.apply({"params": params}, x, False)
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)

    def mix_patch_tokens(h):  # (I + Q*) over the batch, class token untouched
        k = h.shape[0]
        return np.concatenate([h[:, :1], (h[:, 1:] + h[:, 1:].sum(0)) / (k + 1)], axis=1)

    h = x.astype(np.float64)
    if site == "block_input":
        h = mix_patch_tokens(h)
    y = numpy_layer_norm(p["LayerNorm_0"], h)
    if site == "attn_input":
        y = mix_patch_tokens(y)
    h = h + numpy_attention(params["MultiHeadDotProductAttention_1"], y)
    mlp = p["MlpBlock_3"]
    hidden = numpy_layer_norm(p["LayerNorm_2"], h) @ mlp["Dense_0"]["kernel"] + mlp["Dense_0"]["bias"]
    hidden = hidden / 2 * (1 + erf(hidden / np.sqrt(2)))
    expected = h + hidden @ mlp["Dense_1"]["kernel"] + mlp["Dense_1"]["bias"]
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("query_tokens", [None, 1, 2])
@pytest.mark.parametrize("backend,implementation", [
    ("cpu", "auto"), ("gpu", "auto"), ("cpu", "xla"), ("gpu", "softmax")])
def test_attention_matches_numpy_on_every_path(backend, implementation, query_tokens, monkeypatch):
    """The explicit softmax (the CPU's default) and jax.nn.dot_product_attention
    (an accelerator's, in float32 XLA's) against numpy's attention; with
    ``query_tokens`` the first rows of it."""
    from noisy_flax.models.vit import MultiHeadDotProductAttention
    x = np.random.default_rng(0).standard_normal((2, 5, 12)).astype(np.float32)
    module = MultiHeadDotProductAttention(num_heads=3, query_tokens=query_tokens,
                                          implementation=implementation)
    params = module.init(jax.random.key(0), x, deterministic=True)["params"]
    monkeypatch.setattr(jax, "default_backend", lambda: backend)
    got = module.apply({"params": params}, x, deterministic=True)
    assert got.shape == (2, query_tokens or 5, 12)
    np.testing.assert_allclose(got, numpy_attention(params, x)[:, :query_tokens],
                               rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("query_tokens", [None, 1])
def test_softmax_attention_gradients_are_xla_attention_s(query_tokens):
    """The explicit softmax's backward (jax's derivative from the softmax's
    output) against jax.nn.dot_product_attention's, a second implementation."""
    from noisy_flax.models.vit import MultiHeadDotProductAttention
    x = jnp.asarray(np.random.default_rng(1).standard_normal((2, 5, 12)), jnp.float32)
    grads = {}
    for implementation in ("softmax", "xla"):
        module = MultiHeadDotProductAttention(num_heads=3, query_tokens=query_tokens,
                                              implementation=implementation)
        params = module.init(jax.random.key(0), x, deterministic=True)["params"]
        loss = lambda p, x: jnp.sum(jnp.sin(module.apply({"params": p}, x, deterministic=True)))
        grads[implementation] = jax.grad(loss, argnums=(0, 1))(params, x)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
                 grads["softmax"], grads["xla"])


def test_softmax_attention_backward_keeps_no_extra_probability_sized_buffers(monkeypatch):
    """With the quotient rule's derivative, XLA:CPU wrote the row sums out
    over all the probabilities and read them back in the backward pass;
    jax's derivative from the softmax's output needs neither (here: two
    probability-sized buffers less, 16% fewer bytes accessed)."""
    import ml_collections
    from noisy_flax import cpu_tuning
    from noisy_flax.models.vit import MultiHeadDotProductAttention
    x = jnp.ones((8, 197, 192))
    module = MultiHeadDotProductAttention(num_heads=3, implementation="softmax")
    params = module.init(jax.random.key(0), x, deterministic=True)["params"]
    options = cpu_tuning.compiler_options(ml_collections.ConfigDict())

    def compiled_gradient():
        loss = lambda p, x: jnp.sum(module.apply({"params": p}, x, deterministic=True) ** 2)
        compiled = jax.jit(jax.grad(loss), compiler_options=options).lower(params, x).compile()
        return (compiled.memory_analysis().temp_size_in_bytes,
                compiled.cost_analysis()["bytes accessed"])

    temp, accessed = compiled_gradient()
    the_rule = jax.softmax_custom_jvp  # the control: the quotient rule, jax's default
    monkeypatch.setattr(jax, "softmax_custom_jvp", lambda value: the_rule(False))
    quotient_temp, quotient_accessed = compiled_gradient()
    probabilities = 8 * 3 * 197 * 197 * 4
    assert temp <= quotient_temp - probabilities
    assert accessed <= 0.9 * quotient_accessed


@pytest.mark.parametrize("dtype,query_tokens,asked", [
    (jnp.bfloat16, None, ["cudnn", "xla"]), (jnp.float32, None, ["xla"]),
    (jnp.bfloat16, 1, ["xla"])])
def test_gpu_attention_asks_cudnn_in_half_precision_and_falls_back_to_xla(
        dtype, query_tokens, asked, monkeypatch):
    """On a GPU, bf16 self-attention asks jax for cuDNN first; where jax
    refuses (here: no cuDNN on this machine) it takes XLA's. float32 goes to
    XLA directly (cuDNN's fused attention has no float32), and so does the
    class token's single query row."""
    from noisy_flax.models.vit import MultiHeadDotProductAttention
    x = np.random.default_rng(0).standard_normal((2, 5, 16)).astype(np.float32)
    module = MultiHeadDotProductAttention(num_heads=2, dtype=dtype, query_tokens=query_tokens)
    params = module.init(jax.random.key(0), x, deterministic=True)["params"]
    calls, real = [], jax.nn.dot_product_attention

    def spy(*args, implementation=None, **kwargs):
        calls.append(implementation)
        return real(*args, implementation=implementation, **kwargs)

    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(jax.nn, "dot_product_attention", spy)
    got = module.apply({"params": params}, x, deterministic=True)
    assert calls == asked
    want = numpy_attention(params, x)[:, :query_tokens]
    tolerance = 0.05 if dtype == jnp.bfloat16 else 1e-5  # bf16: 8 bits of mantissa
    np.testing.assert_allclose(np.asarray(got, np.float32), want,
                               atol=tolerance * np.max(np.abs(want)))


@pytest.mark.parametrize("implementation,dtype,query_tokens,dropout_rate,asked", [
    ("auto", jnp.float16, None, 0.0, ["cudnn"]),     # half precision: fp16 as bf16
    ("cudnn", jnp.float32, 1, 0.0, ["cudnn"]),       # asked for: no shape or dtype rule
    ("xla", jnp.bfloat16, None, 0.0, ["xla"]),       # asked for: no cuDNN first
    ("softmax", jnp.bfloat16, None, 0.0, []),        # the explicit softmax on any backend
    ("xla", jnp.float32, None, 0.5, []),             # attention dropout needs the probabilities
])
def test_gpu_attention_takes_the_asked_implementation(
        implementation, dtype, query_tokens, dropout_rate, asked, monkeypatch):
    """On a GPU: which implementation jax.nn.dot_product_attention is asked
    for (none: the explicit softmax). The spy computes XLA's attention
    whatever is asked, as this machine has no cuDNN."""
    from noisy_flax.models.vit import MultiHeadDotProductAttention
    x = np.random.default_rng(0).standard_normal((2, 5, 16)).astype(np.float32)
    module = MultiHeadDotProductAttention(num_heads=2, dtype=dtype, query_tokens=query_tokens,
                                          implementation=implementation, dropout_rate=dropout_rate)
    calls, real = [], jax.nn.dot_product_attention

    def spy(*args, implementation=None, **kwargs):
        calls.append(implementation)
        return real(*args, implementation="xla", **kwargs)

    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(jax.nn, "dot_product_attention", spy)
    params = module.init(jax.random.key(0), x, deterministic=True)["params"]
    calls.clear()
    got = module.apply({"params": params}, x, deterministic=dropout_rate == 0,
                       rngs={"dropout": jax.random.key(1)})
    assert calls == asked
    want = numpy_attention(params, x)[:, :query_tokens]
    if dropout_rate:  # half the probabilities dropped, the rest doubled: not the plain attention
        assert not np.allclose(got, want, atol=0.05 * np.max(np.abs(want)))
    else:
        tolerance = 1e-5 if dtype == jnp.float32 else 0.05  # half precision: 8-11 bits
        np.testing.assert_allclose(np.asarray(got, np.float32), want,
                                   atol=tolerance * np.max(np.abs(want)))


def test_unknown_attention_implementation_is_clear():
    with pytest.raises(ValueError, match="attention_implementation 'flash'.*auto, softmax, xla, cudnn"):
        tiny_vit(attention_implementation="flash").init(jax.random.key(0), images())


LAST_BLOCK_NOISES = [None, {**OPTIMAL, "site": "attn_input", "train": True},
                     {"type": "within_image", "site": "block_input", "train": True},
                     {"type": "gaussian", "site": "attn_input", "strength": 0.5, "train": True}]


@pytest.mark.parametrize("noise_cfg", LAST_BLOCK_NOISES, ids=lambda c: c and c["type"])
def test_last_block_on_class_token_alone_gives_same_logits_and_gradients(vit_variables, noise_cfg):
    """The default (the last block computes the class token only) against
    every token computed, with noise in that block, in training mode."""
    x = images()
    labels = jnp.arange(6) % 5

    def loss(model, params):
        logits = model.apply({"params": params}, x, train=True, rngs={"noise": jax.random.key(3)})
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], 1)), logits

    (l_cls, logits_cls), g_cls = jax.value_and_grad(
        lambda p: loss(tiny_vit(noise_cfg), p), has_aux=True)(vit_variables["params"])
    (l_all, logits_all), g_all = jax.value_and_grad(
        lambda p: loss(tiny_vit(noise_cfg, last_block_all_tokens=True), p),
        has_aux=True)(vit_variables["params"])
    np.testing.assert_allclose(logits_cls, logits_all, atol=1e-6 * np.max(np.abs(logits_all)))
    np.testing.assert_allclose(l_cls, l_all, rtol=1e-6)
    # Rounding only, against the gradients' scale: optimal Q's inverse
    # amplifies float32 rounding in a few elements, and some gradients are
    # zero up to rounding (the key bias: softmax ignores a constant shift).
    scale = max(float(np.max(np.abs(g))) for g in jax.tree.leaves(g_all))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-4 * scale), g_cls, g_all)


def test_last_block_on_class_token_alone_saves_its_other_tokens_matmuls():
    """XLA's FLOP count of the forward pass drops by the closed form of the
    matmuls the other tokens would need in the last block: query and output
    projections, both MLP layers, and their rows of Q.K^T and P.V."""
    batch, width, mlp, tokens = 2, 192, 768, 197  # ViT-Ti/16 at 224 px
    x = jnp.zeros((batch, 224, 224, 3))

    def forward_flops(**kw):
        model = create_model("vit_tiny_patch16_224", num_classes=10, num_layers=2, **kw)
        variables = jax.eval_shape(lambda: model.init(jax.random.key(0), x))
        return jax.jit(model.apply).lower(variables, x).compile().cost_analysis()["flops"]

    per_token = 2 * (2 * width * width + 2 * width * mlp + 2 * tokens * width)
    saved = batch * (tokens - 1) * per_token
    # The rest of the difference is element-wise work (GELU, LayerNorm, biases): ~2%.
    assert forward_flops(last_block_all_tokens=True) - forward_flops() == pytest.approx(saved, rel=0.03)


@pytest.mark.parametrize("name, kwargs, message", [
    ("vit_nano_patch4_28", {"num_classes": -3}, "num_classes=-3 must be a positive integer"),
    ("vit_nano_patch4_28", {"num_classes": 10, "num_layers": -1},
     "num_layers=-1 must be a positive integer"),
    ("resnet18", {"num_classes": 10, "width": 0}, "width=0 must be a positive integer"),
])
def test_impossible_sizes_are_refused_by_name(name, kwargs, message):
    with pytest.raises(ValueError, match=message):
        create_model(name, **kwargs)


def numpy_mlp(p, x):
    from scipy.special import erf
    hidden = x @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"]
    hidden = hidden / 2 * (1 + erf(hidden / np.sqrt(2)))
    return hidden @ p["Dense_1"]["kernel"] + p["Dense_1"]["bias"]


def test_whole_vit_matches_numpy():
    """Patches as one matmul, the class token and the position embedding
    (class token included), two pre-norm blocks, the final norm, the tanh
    representation layer and the head, in float64 numpy."""
    model = create_model("vit_nano_patch4_16", num_classes=5, num_layers=2,
                         representation_size=16)
    x = np.asarray(images(3, 16), np.float64)
    variables = model.init(jax.random.key(0), jnp.asarray(x, jnp.float32), train=False)
    params = jax.tree.map(lambda a: np.asarray(a, np.float64), variables["params"])
    rng = np.random.default_rng(2)  # the zero-initialised cls and head would hide their terms
    params["cls"] = rng.normal(size=params["cls"].shape)
    params["head"]["kernel"] = rng.normal(size=params["head"]["kernel"].shape)
    got = model.apply({"params": jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), params)},
                      jnp.asarray(x, jnp.float32), train=False)
    patches = x.reshape(3, 4, 4, 4, 4, 3).transpose(0, 1, 3, 2, 4, 5).reshape(3, 16, 48)
    kernel = params["embedding"]["kernel"].reshape(48, -1)  # (4, 4, 3, width), HWIO order
    h = patches @ kernel + params["embedding"]["bias"]
    h = np.concatenate([np.repeat(params["cls"], 3, axis=0), h], axis=1)
    enc = params["Transformer"]
    h = h + enc["posembed_input"]["pos_embedding"]
    for i in range(2):
        p = enc[f"encoderblock_{i}"]
        h = h + numpy_attention(p["MultiHeadDotProductAttention_1"],
                                numpy_layer_norm(p["LayerNorm_0"], h))
        h = h + numpy_mlp(p["MlpBlock_3"], numpy_layer_norm(p["LayerNorm_2"], h))
    z = numpy_layer_norm(enc["encoder_norm"], h)[:, 0]
    z = np.tanh(z @ params["pre_logits"]["kernel"] + params["pre_logits"]["bias"])
    expected = z @ params["head"]["kernel"] + params["head"]["bias"]
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


def test_layer_norms_use_timms_epsilon_on_tiny_variance_tokens():
    """timm's ViT LayerNorms take eps 1e-6. On tokens whose feature variance
    is ~1e-6, eps 1e-5 would shrink the normalised values by ~2.3x, so the
    block (attention output scaled down to keep the stream tiny for
    LayerNorm_2) and the final norm are checked in numpy with eps 1e-6."""
    from noisy_flax.models.vit import Encoder, Encoder1DBlock
    x = 1e-3 * np.random.default_rng(5).standard_normal((2, 5, 8))
    block = Encoder1DBlock(mlp_dim=16, num_heads=2, grid=(2, 2))
    params = jax.device_get(block.init(jax.random.key(0), x.astype(np.float32), False)["params"])
    attn = params["MultiHeadDotProductAttention_1"]
    attn["out"]["kernel"] = attn["out"]["kernel"] * 1e-3  # the stream stays ~1e-3 after it
    got = block.apply({"params": params}, x.astype(np.float32), False)
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    h = x + numpy_attention(attn, numpy_layer_norm(p["LayerNorm_0"], x))
    expected = h + numpy_mlp(p["MlpBlock_3"], numpy_layer_norm(p["LayerNorm_2"], h))
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-6)

    # The final norm: blocks whose residual branches are zero pass the tokens on.
    encoder = Encoder(num_layers=1, mlp_dim=16, num_heads=2, grid=(2, 2))
    params = jax.device_get(encoder.init(jax.random.key(0), x.astype(np.float32), train=False)["params"])
    block = params["encoderblock_0"]
    for branch in (block["MultiHeadDotProductAttention_1"]["out"], block["MlpBlock_3"]["Dense_1"]):
        branch["kernel"], branch["bias"] = np.zeros_like(branch["kernel"]), np.zeros_like(branch["bias"])
    params["posembed_input"]["pos_embedding"] = np.zeros_like(params["posembed_input"]["pos_embedding"])
    got = encoder.apply({"params": params}, x.astype(np.float32), train=False)
    norm = jax.tree.map(lambda a: np.asarray(a, np.float64), params["encoder_norm"])
    np.testing.assert_allclose(got, numpy_layer_norm(norm, x[:, :1]), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("rate", [0.5, 0.25])
def test_stochastic_depth_rescales_kept_branches_by_the_keep_rate(rate):
    """Each sample leaves the block as one of four outcomes (attention
    branch and MLP branch each dropped or kept at 1 / (1 - rate)), written
    out in numpy; all four occur among 64 samples, and both branches are
    dropped for about rate^2 of them."""
    from noisy_flax.models.vit import Encoder1DBlock
    x = np.random.default_rng(6).standard_normal((64, 5, 8))
    block = Encoder1DBlock(mlp_dim=16, num_heads=2, grid=(2, 2), drop_path_rate=rate)
    params = block.init(jax.random.key(0), x.astype(np.float32), False)["params"]
    out = np.asarray(block.apply({"params": params}, x.astype(np.float32), True,
                                 rngs={"dropout": jax.random.key(3)}), np.float64)
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    seen = []
    for b in range(64):
        attention = numpy_attention(p["MultiHeadDotProductAttention_1"],
                                    numpy_layer_norm(p["LayerNorm_0"], x[b:b + 1]))
        outcomes = []
        for keep_attention in (0.0, 1 / (1 - rate)):
            h = x[b:b + 1] + keep_attention * attention
            mlp = numpy_mlp(p["MlpBlock_3"], numpy_layer_norm(p["LayerNorm_2"], h))
            outcomes += [h, h + mlp / (1 - rate)]
        matches = [i for i, o in enumerate(outcomes) if np.allclose(out[b], o[0], atol=1e-4)]
        assert matches, b
        seen.append(matches[0])
    assert set(seen) == {0, 1, 2, 3}
    # Binomial(64, rate^2): 16 +- 3.5 at 0.5, 4 +- 1.9 at 0.25.
    assert abs(seen.count(0) - 64 * rate ** 2) <= 8


def test_stochastic_depth_is_zero_in_the_first_block():
    """timm's schedule: rate * i / (depth - 1), so block 0 never drops."""
    model = tiny_vit(drop_path_rate=0.5)
    x = images(32)
    variables = model.init(jax.random.key(0), x, train=False)

    def first_block(train):
        _, state = model.apply(variables, x, train=train, rngs={"dropout": jax.random.key(1)},
                               capture_intermediates=True, mutable=["intermediates"])
        return np.asarray(state["intermediates"]["Transformer"]["encoderblock_0"]["__call__"][0])

    np.testing.assert_array_equal(first_block(True), first_block(False))


def test_stochastic_depth_rates_grow_linearly_to_the_last_block():
    """timm: torch.linspace(0, drop_path_rate, depth), one rate per block."""
    rates = {}

    def record(module, method_name):
        if hasattr(module, "drop_path_rate") and (module.name or "").startswith("encoderblock_"):
            rates[module.name] = module.drop_path_rate
        return False

    model = create_model("vit_nano_patch4_16", num_classes=5, num_layers=4, drop_path_rate=0.3)
    model.init(jax.random.key(0), images(2), train=False, capture_intermediates=record)
    got = [rates[f"encoderblock_{i}"] for i in range(4)]
    np.testing.assert_allclose(got, np.linspace(0, 0.3, 4), rtol=1e-12)


def _dropped_or_scaled(got, full, rate):
    """Each element is 0 or full / (1 - rate); returns the kept fraction."""
    got, full = np.asarray(got, np.float64), np.asarray(full, np.float64)
    kept = np.isclose(got, full / (1 - rate), rtol=1e-4, atol=1e-5)
    dropped = np.abs(got) <= 1e-5
    assert np.all(kept | dropped)
    return float(np.mean(kept))


def test_dropout_sites_follow_vit_jax():
    """vit_jax / timm: dropout on the attention output before the residual
    add, on the MLP's hidden activation and on its output, and on the
    embedded tokens after the position embedding; each zeroes about half
    the elements at rate 0.5 and doubles the rest."""
    from scipy.special import erf
    from noisy_flax.models.vit import Encoder, Encoder1DBlock
    x = np.random.default_rng(7).standard_normal((8, 5, 8)).astype(np.float32)
    rngs = {"dropout": jax.random.key(2)}
    block = Encoder1DBlock(mlp_dim=16, num_heads=2, grid=(2, 2), dropout_rate=0.5)
    params = block.init(jax.random.key(0), x, False)["params"]
    out, state = block.apply({"params": params}, x, True, rngs=rngs, capture_intermediates=True,
                             mutable=["intermediates"])
    inter = state["intermediates"]
    attention = inter["MultiHeadDotProductAttention_1"]["__call__"][0]
    mlp = inter["MlpBlock_3"]
    mlp_out = mlp["__call__"][0]
    # The residual stream after attention: the input plus the dropped attention output.
    assert 0.3 < _dropped_or_scaled(np.asarray(out) - mlp_out - x, attention, 0.5) < 0.7
    hidden = np.asarray(mlp["Dense_0"]["__call__"][0], np.float64)
    dropped_hidden = mlp["Dropout_0"]["__call__"][0]
    assert 0.3 < _dropped_or_scaled(dropped_hidden, hidden / 2 * (1 + erf(hidden / np.sqrt(2))),
                                    0.5) < 0.7
    dense_1 = jax.tree.map(lambda a: np.asarray(a, np.float64), params["MlpBlock_3"]["Dense_1"])
    np.testing.assert_allclose(mlp["Dense_1"]["__call__"][0],
                               np.asarray(dropped_hidden) @ dense_1["kernel"] + dense_1["bias"],
                               rtol=1e-4, atol=1e-5)
    assert 0.3 < _dropped_or_scaled(mlp_out, mlp["Dense_1"]["__call__"][0], 0.5) < 0.7

    # Embedding dropout: blocks whose residual branches are zero pass on the dropped tokens.
    encoder = Encoder(num_layers=1, mlp_dim=16, num_heads=2, grid=(2, 2), dropout_rate=0.5,
                      last_block_all_tokens=True)
    params = jax.device_get(encoder.init(jax.random.key(0), x, train=False)["params"])
    branches = params["encoderblock_0"]
    for branch in (branches["MultiHeadDotProductAttention_1"]["out"], branches["MlpBlock_3"]["Dense_1"]):
        branch["kernel"], branch["bias"] = np.zeros_like(branch["kernel"]), np.zeros_like(branch["bias"])
    _, state = encoder.apply({"params": params}, x, train=True, rngs=rngs,
                             capture_intermediates=True, mutable=["intermediates"])
    tokens = state["intermediates"]["encoderblock_0"]["__call__"][0]
    embedded = x + params["posembed_input"]["pos_embedding"]
    assert 0.3 < _dropped_or_scaled(tokens, embedded, 0.5) < 0.7


def test_resnet_head_reads_the_spatial_mean_of_the_last_block():
    model = create_model("resnet18_small", num_classes=5, width=4)
    x = images(2, 16)
    variables = model.init(jax.random.key(0), x, train=False)
    params = jax.device_get(variables["params"])
    params["fc"]["kernel"] = np.random.default_rng(1).normal(size=params["fc"]["kernel"].shape)
    logits, state = model.apply({**variables, "params": params}, x, train=False,
                                capture_intermediates=True, mutable=["intermediates"])
    inter = flax.traverse_util.flatten_dict(state["intermediates"])
    last = [k for k in inter if len(k) == 2 and k[1] == "__call__" and k[0].startswith("layer4")]
    features = np.asarray(inter[sorted(last)[-1]][0], np.float64).mean(axis=(1, 2))
    expected = features @ params["fc"]["kernel"] + params["fc"]["bias"]
    np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-5)


def test_within_image_noise_on_tokens_mixes_rows_of_the_patch_grid():
    """At the embedding site the 16 patch tokens are a 4 x 4 grid (row-major,
    as the patches were cut): each grid row is mixed with the other rows of
    the same image by (I + Q*) of the grid height; the class token is kept."""
    model = tiny_vit({"type": "within_image", "site": "embedding", "scope": "global"})
    x = images(2, 16)
    variables = model.init(jax.random.key(0), x, train=False)
    _, state = model.apply(variables, x, train=False, mutable=["intermediates"])
    leaves = flax.traverse_util.flatten_dict(state["intermediates"])
    (before,) = [np.asarray(v[0], np.float64) for k, v in leaves.items() if k[-1] == "noise_input"]
    (after,) = [np.asarray(v[0]) for k, v in leaves.items() if k[-1] == "noise_output"]
    grid = before[:, 1:].reshape(2, 4, 4, -1)  # (batch, grid row, grid column, width)
    mix = np.eye(4) + (np.ones((4, 4)) - 4 * np.eye(4)) / 5  # the paper's Q*, k = 4
    expected = np.einsum("rs,bswd->brwd", mix, grid).reshape(2, 16, -1)
    np.testing.assert_allclose(after[:, 1:], expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(after[:, 0], before[:, 0])


def test_embedding_site_reads_tokens_after_the_position_embedding():
    """The embedding site's input is the patch embedding with the class
    token prepended and the position embedding added (numpy); the mixing of
    grid rows would not commute with adding a per-position embedding."""
    model = tiny_vit({"type": "within_image", "site": "embedding", "scope": "global"})
    x = np.asarray(images(2, 16), np.float64)
    variables = model.init(jax.random.key(0), jnp.asarray(x, jnp.float32), train=False)
    params = jax.tree.map(lambda a: np.asarray(a, np.float64), variables["params"])
    _, state = model.apply(variables, jnp.asarray(x, jnp.float32), train=False,
                           mutable=["intermediates"])
    leaves = flax.traverse_util.flatten_dict(state["intermediates"])
    (before,) = [v[0] for k, v in leaves.items() if k[-1] == "noise_input"]
    patches = x.reshape(2, 4, 4, 4, 4, 3).transpose(0, 1, 3, 2, 4, 5).reshape(2, 16, 48)
    tokens = patches @ params["embedding"]["kernel"].reshape(48, -1) + params["embedding"]["bias"]
    tokens = np.concatenate([np.repeat(params["cls"], 2, axis=0), tokens], axis=1)
    expected = tokens + params["Transformer"]["posembed_input"]["pos_embedding"]
    np.testing.assert_allclose(before, expected, rtol=1e-5, atol=1e-5)


def test_bottleneck_strides_in_its_3x3_convolution():
    """torchvision's ResNet-50 (v1.5) downsamples in the 3 x 3 convolution of
    a stage's first block, not in the 1 x 1 before it (v1): at 64 px the
    second stage's first block keeps 16 x 16 in conv1 and halves it in conv2."""
    model = create_model("resnet50", num_classes=5, width=4)
    x = jnp.zeros((1, 64, 64, 3))
    variables = model.init(jax.random.key(0), x, train=False)
    _, state = model.apply(variables, x, train=False, capture_intermediates=True,
                           mutable=["intermediates"])
    block = state["intermediates"]["layer2_0"]
    assert block["conv1"]["__call__"][0].shape[1:3] == (16, 16)
    assert block["conv2"]["__call__"][0].shape[1:3] == (8, 8)
