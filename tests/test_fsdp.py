"""FSDP (ZeRO-3 style parameter sharding) and mesh shapes, on 8 fake CPU devices.

* ViT-B/16: per-device parameter (and optimizer) bytes are about 1/8 of the
  total, from shapes and shardings only; the total is the published count.
* A small ViT trained 3 steps: FSDP = replicated, a (data 2, fsdp 4) mesh =
  a (data 8) mesh, 1 device = 8 devices, all within 1e-5.
* With fsdp > 1 in config.mesh, batch rows and device-scope noise still
  follow the flat device order of the batch axes.
"""
import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from configs import fashion_mnist
from noisy_flax import noise, optim, sharding, train

VIT_B16_PARAMS = 86_567_656  # published (timm / vit_jax), 1000 classes
STEPS, BATCH = 3, 16


@pytest.fixture(autouse=True, scope="module")
def fast_compiles():
    """Most XLA optimizations off: compiles in seconds; same numbers on every path."""
    previous = jax.config.values["jax_disable_most_optimizations"]
    jax.config.update("jax_disable_most_optimizations", True)
    yield
    jax.config.update("jax_disable_most_optimizations", previous)


# ---------------------------------------------------------------------------
# ViT-B/16 memory per device, without materialising it
# ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def vit_b16_state_shapes():
    """TrainState shapes (params + AdamW moments) of ViT-B/16 via eval_shape."""
    config = small_vit_config()
    config.model, config.num_classes, config.image_size = "vit_base_patch16_224", 1000, 224
    config.input.channels = 3
    config.model_kwargs = ml_collections.ConfigDict()
    config.noise.type = "none"
    model = train.build_model(config)
    tx, _ = optim.make_optimizer(config, 10, 0)
    mesh = sharding.create_mesh()
    return jax.eval_shape(lambda: train.create_train_state(config, model, tx, mesh)[0])


def bytes_on_one_device(tree, strategy: str, mesh_axes=None) -> int:
    mesh = sharding.create_mesh(mesh_axes)
    return sharding.bytes_per_device(sharding.param_shardings(tree, mesh, strategy), tree)


def test_vit_b16_replicated_params_are_the_published_count(vit_b16_state_shapes):
    assert bytes_on_one_device(vit_b16_state_shapes.params, "replicate") == 4 * VIT_B16_PARAMS


@pytest.mark.parametrize("mesh_axes", [[("data", 8), ("fsdp", 1)], [("data", 2), ("fsdp", 4)],
                                       [("data", 1), ("fsdp", 8)]])
def test_vit_b16_fsdp_params_are_an_eighth_per_device(vit_b16_state_shapes, mesh_axes):
    per_device = bytes_on_one_device(vit_b16_state_shapes.params, "fsdp", mesh_axes)
    # What stays replicated (biases, norms, the class token) is under 1%.
    assert 1 / 8 <= per_device / (4 * VIT_B16_PARAMS) < 1 / 8 + 0.01


def test_vit_b16_fsdp_shards_the_optimizer_state_too(vit_b16_state_shapes):
    total = bytes_on_one_device(vit_b16_state_shapes, "replicate")
    per_device = bytes_on_one_device(vit_b16_state_shapes, "fsdp")
    assert total > 3 * 4 * VIT_B16_PARAMS  # params + two AdamW moments
    assert 1 / 8 <= per_device / total < 1 / 8 + 0.01


def test_fsdp_spec_shards_the_largest_divisible_dimension():
    assert sharding.fsdp_spec((768, 3072), 8) == P(None, sharding.BATCH_AXES)
    assert sharding.fsdp_spec((3072, 768), 8) == P(sharding.BATCH_AXES, None)
    assert sharding.fsdp_spec((1000, 768), 16) == P(None, sharding.BATCH_AXES)  # 1000 % 16 != 0
    assert sharding.fsdp_spec((768,), 8) == P()  # too small to be worth it
    assert sharding.fsdp_spec((999, 999), 8) == P()  # nothing divides


def test_fsdp_warns_about_large_arrays_it_cannot_split(caplog):
    """7,283 (prime) and 3 divide by no device count above 1: the 65,547-value
    kernel stays whole on each of the 8 devices, and the log says so; the
    divisible one and the small one do not count."""
    import logging
    mesh = sharding.create_mesh((("data", -1), ("fsdp", 1)))
    tree = {"odd": jax.ShapeDtypeStruct((3, 3, 7283), jnp.float32),
            "even": jax.ShapeDtypeStruct((8, 8192), jnp.float32),
            "small": jax.ShapeDtypeStruct((3, 5), jnp.float32)}
    with caplog.at_level(logging.WARNING):
        shardings = sharding.param_shardings(tree, mesh, "fsdp")
    assert shardings["odd"].spec == P() and shardings["even"].spec != P()
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert warnings == ["fsdp: 1 arrays (0.3 MB, e.g. odd) have no dimension divisible by the "
                        "8 devices and stay whole on every device"]


def test_one_device_fsdp_does_not_warn(caplog):
    """On one device nothing is split, and nothing is lost by not splitting."""
    import logging
    mesh = sharding.create_mesh(devices=jax.devices()[:1])
    tree = {"odd": jax.ShapeDtypeStruct((3, 3, 7283), jnp.float32)}
    with caplog.at_level(logging.WARNING):
        shardings = sharding.param_shardings(tree, mesh, "fsdp")
    assert shardings["odd"].spec == P()
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_rules_take_precedence_over_the_strategy():
    """A rule matches the '/'-joined path: it keeps the head whole under FSDP,
    and splits a kernel that 'replicate' would leave whole."""
    mesh = sharding.create_mesh()
    tree = {"head": {"kernel": jax.ShapeDtypeStruct((8, 8192), jnp.float32)},
            "body": {"kernel": jax.ShapeDtypeStruct((8, 8192), jnp.float32)}}
    fsdp = sharding.param_shardings(tree, mesh, "fsdp", rules=[("head/kernel", P())])
    assert fsdp["head"]["kernel"].spec == P()
    assert fsdp["body"]["kernel"].spec == P(None, sharding.BATCH_AXES)
    split = sharding.param_shardings(tree, mesh, "replicate", rules=[("body/", P("data"))])
    assert split["body"]["kernel"].spec == P("data") and split["head"]["kernel"].spec == P()


def test_bytes_per_device_use_each_leafs_own_dtype():
    # bf16 (8, 8192) split 8 ways: 8 * 8192 * 2 / 8 = 16,384 bytes; the int8
    # (8192,) vector is under the FSDP minimum, so whole: 8,192 bytes.
    mesh = sharding.create_mesh()
    tree = {"w": jax.ShapeDtypeStruct((8, 8192), jnp.bfloat16),
            "b": jax.ShapeDtypeStruct((8192,), jnp.int8)}
    shardings = sharding.param_shardings(tree, mesh, "fsdp")
    assert sharding.bytes_per_device(shardings, tree) == 16_384 + 8_192


@pytest.mark.parametrize("axes, message", [
    ([("data", -1), ("fsdp", -1)], "at most one axis may have size -1"),
    ([("data", -1), ("fsdp", 3)], "does not divide the 8 devices"),
    ([("data", 2), ("model", 4)], r"unknown mesh axis \['model'\]"),
    ([("data", 2), ("fsdp", 2)], "uses 4 devices but 8 are present"),
])
def test_a_bad_mesh_names_its_mistake(axes, message):
    with pytest.raises(ValueError, match=message):
        sharding.create_mesh(axes)


def test_unknown_strategy_is_a_clear_error():
    with pytest.raises(ValueError, match="config.sharding"):
        sharding.param_shardings({"w": jnp.zeros((4,))}, sharding.create_mesh(), "zero3")


# ---------------------------------------------------------------------------
# Training: the same numbers however the work is spread
# ---------------------------------------------------------------------------
def small_vit_config(**changes) -> ml_collections.ConfigDict:
    """A 1-block ViT wide enough (256) that FSDP shards its kernels."""
    config = fashion_mnist.get_config("runlocal")
    config.model_kwargs = ml_collections.ConfigDict(
        {"num_layers": 1, "hidden_size": 256, "mlp_dim": 512, "num_heads": 4})
    config.noise.type = "optimal_q"
    config.noise.scope = "device"
    config.total_steps, config.warmup_steps = STEPS, 0
    # Adam's eps well above rounding: a near-zero gradient element then moves
    # its weight by ~lr * g / eps, not by +-lr depending on its rounding.
    config.eps = 1e-3
    config.batch_size = BATCH
    for key, value in changes.items():
        target = config
        *parents, leaf = key.split(".")
        for parent in parents:
            target = target[parent]
        target[leaf] = value
    return config


def fake_batches(seed: int = 0) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"image": rng.uniform(-1, 1, (BATCH, 28, 28, 1)).astype(np.float32),
             "label": rng.integers(0, 10, (BATCH,)).astype(np.int32)} for _ in range(STEPS)]


def train_steps(config, devices=None):
    """Losses and final state after STEPS jitted train steps, set up as train.py does."""
    mesh = sharding.create_mesh(config.mesh, devices)
    model = train.build_model(config, mesh)
    tx, schedule = optim.make_optimizer(config, config.total_steps, config.warmup_steps)
    state, shardings = train.create_train_state(config, model, tx, mesh)
    step = jax.jit(train.make_train_step(model, tx, schedule, config),
                   in_shardings=(shardings, sharding.batch_sharding(mesh)),
                   out_shardings=(shardings, sharding.replicated(mesh)), donate_argnums=(0,))
    losses = []
    for batch in fake_batches():
        state, metrics = step(state, sharding.global_batch(batch, mesh))
        losses.append(float(metrics["loss"]))
    return np.array(losses), state


@functools.lru_cache(maxsize=None)
def run(strategy: str, mesh_axes: tuple, scope: str = "device", num_devices: int = 8):
    """Cached: several tests compare against the same baseline run."""
    config = small_vit_config(sharding=strategy, mesh=list(mesh_axes), **{"noise.scope": scope})
    losses, state = train_steps(config, jax.devices()[:num_devices])
    return losses, state


DATA8 = (("data", 8), ("fsdp", 1))
DATA2_FSDP4 = (("data", 2), ("fsdp", 4))
ONE_DEVICE = (("data", 1), ("fsdp", 1))


def assert_same_params(a, b):
    for x, y in zip(jax.tree.leaves(jax.device_get(a.params)),
                    jax.tree.leaves(jax.device_get(b.params))):
        np.testing.assert_allclose(x, y, atol=1e-5)


def device_bytes(tree) -> int:
    """Bytes that device 0 actually holds for a tree of arrays."""
    return sum(leaf.addressable_shards[0].data.nbytes for leaf in jax.tree.leaves(tree))


def test_fsdp_shards_kernels_and_adam_moments_over_all_eight_devices():
    _, state = run("fsdp", DATA2_FSDP4)
    sharded = [leaf for leaf in jax.tree.leaves(state.params) if leaf.sharding.spec != P()]
    assert len(sharded) >= 6  # q, k, v, out and both MLP kernels
    for leaf in sharded:  # over data x fsdp = 8 devices, not only the fsdp axis
        assert leaf.addressable_shards[0].data.size * 8 == leaf.size
    # The AdamW moments are sharded like the parameters: twice their bytes.
    param_bytes, opt_bytes = device_bytes(state.params), device_bytes(state.opt_state)
    assert 2 * param_bytes <= opt_bytes < 2 * param_bytes + 1024


def test_fsdp_on_a_data2_fsdp4_mesh_gives_the_replicated_data8_losses():
    # Batch rows and device-scope noise shards follow the flat device order
    # on both meshes, so even per-device mixing must agree.
    replicated_losses, replicated = run("replicate", DATA8)
    fsdp_losses, fsdp = run("fsdp", DATA2_FSDP4)
    assert len(set(replicated_losses.tolist())) == STEPS  # the loss moves: a real comparison
    np.testing.assert_allclose(fsdp_losses, replicated_losses, atol=1e-5)
    assert_same_params(fsdp, replicated)
    assert dict(fsdp.step.sharding.mesh.shape) == {"data": 2, "fsdp": 4}


def test_one_device_gives_the_eight_device_fsdp_losses():
    # Global-scope noise mixes the whole batch, so the device count must not matter.
    one, one_state = run("replicate", ONE_DEVICE, "global", num_devices=1)
    eight, eight_state = run("fsdp", DATA2_FSDP4, "global")
    assert len(one_state.step.sharding.device_set) == 1
    np.testing.assert_allclose(one, eight, atol=1e-5)
    assert_same_params(one_state, eight_state)


# ---------------------------------------------------------------------------
# Batch placement and device-scope noise on a mesh with fsdp > 1
# ---------------------------------------------------------------------------
def flat_device_order(mesh) -> list:
    return list(mesh.devices.reshape(-1))


def test_batch_rows_follow_the_flat_device_order_on_a_data2_fsdp4_mesh():
    mesh = sharding.create_mesh(list(DATA2_FSDP4))
    rows = np.arange(16 * 3, dtype=np.float32).reshape(16, 3)
    batch = sharding.global_batch({"x": rows}, mesh)["x"]
    by_device = {shard.device: np.asarray(shard.data) for shard in batch.addressable_shards}
    for index, device in enumerate(flat_device_order(mesh)):
        np.testing.assert_array_equal(by_device[device], rows[2 * index:2 * index + 2])


def test_device_scope_noise_mixes_each_device_shard_on_a_data2_fsdp4_mesh():
    mesh = sharding.create_mesh(list(DATA2_FSDP4))
    x = np.random.default_rng(3).normal(size=(24, 5)).astype(np.float32)
    fn = noise.make_noise({"type": "optimal_q", "scope": "device"}, mesh=mesh).fn
    out = np.asarray(jax.jit(fn)(sharding.global_batch({"x": x}, mesh)["x"]))
    k = 3  # rows per device
    q = (np.ones((k, k)) - k * np.eye(k)) / (k + 1)
    expected = np.concatenate([shard + q @ shard for shard in np.split(x, 8)])
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)
