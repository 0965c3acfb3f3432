"""The training path end to end: main, evaluation counts, schedules."""
import json
import os
import pathlib
import subprocess
import sys
import textwrap
import time

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import tensorflow_datasets as tfds

import tiny_run
from configs import common
from noisy_flax import optim, train

ROOT = pathlib.Path(__file__).resolve().parents[1]


def numpy_log_softmax(logits):
    """log softmax over the last axis, shifted by the maximum for stability."""
    shifted = logits - logits.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def test_main_runlocal_end_to_end(tmp_path):
    """`python -m noisy_flax.main` as a user runs it, on mock data."""
    script = textwrap.dedent("""
        import sys, runpy
        import tensorflow_datasets as tfds
        with tfds.testing.mock_data(num_examples=40):
            sys.argv = ["main", "--config", "configs/default.py:runlocal",
                        "--config.async_checkpoints=False", "--workdir", sys.argv[1]]
            runpy.run_module("noisy_flax.main", run_name="__main__")
    """)
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "CUDA_VISIBLE_DEVICES": ""}
    # A relative workdir, as the README's command gives.
    workdir = os.path.relpath(tmp_path, ROOT)
    result = subprocess.run([sys.executable, "-c", script, workdir], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "step 2/2" in result.stdout and "eval at step 2" in result.stdout
    for name in ["metrics.jsonl", "config.json", "summary.json", "curves.png", "parameters.txt"]:
        assert (tmp_path / name).exists(), name
    assert list(tmp_path.glob("events.out.tfevents.*"))
    assert (tmp_path / "checkpoints" / "2").is_dir()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["split"] == "train"] == [1, 2]
    assert json.loads((tmp_path / "config.json").read_text())["model"] == "vit_nano_patch7_28"


def test_eval_counts_every_example_once_with_uneven_last_batch(tmp_path):
    """37 examples, global eval batch 16 over 8 devices: the last batch is
    padded, and correct / total covers exactly the 37."""
    config = common.base_config()
    config.model = "vit_nano_patch7_28"
    config.model_kwargs = {"num_layers": 1}
    config.input.channels = 1
    config.input.train_crop = "none"
    config.eval_batch_size = 16
    config.label_smoothing = 0.1  # training only: the loss below is the plain one
    config.noise.update(type="optimal_q", scope="device")
    mesh = train.sharding.create_mesh(config.mesh)
    model = train.build_model(config, mesh)
    tx, _ = optim.make_optimizer(config, 10, 0)
    state, _ = train.create_train_state(config, model, tx, mesh)
    # A random head: the initial zero head predicts class 0 everywhere, which
    # would make the top-1 check below a count of label 0.
    params = jax.tree.map(lambda x: x, state.params)
    params["head"]["kernel"] = jnp.asarray(
        np.random.default_rng(0).normal(size=params["head"]["kernel"].shape), jnp.float32)
    state = state.replace(params=params)
    eval_step = jax.jit(train.make_eval_step(model, config))
    from noisy_flax import input_pipeline
    with tfds.testing.mock_data(num_examples=37):
        batches = list(input_pipeline.eval_batches(config))
        result = train.evaluate(eval_step, state, iter(batches), mesh)
    assert result["count"] == 37
    labels = np.concatenate([b["label"][b["mask"] > 0] for b in batches])
    assert len(labels) == 37
    # Independent count: predictions of the same model, one example at a time,
    # noise off (k = 1 makes optimal Q the identity).
    variables = {"params": state.params}
    plain = model.clone(noise=None)
    images = np.concatenate([b["image"][b["mask"] > 0] for b in batches])
    logits = np.asarray(plain.apply(variables, images, train=False), np.float64)
    predictions = np.argmax(logits, -1)
    assert len(set(predictions.tolist())) > 1
    clean_result = train.evaluate(jax.jit(train.make_eval_step(plain, config)), state,
                                  iter(batches), mesh)
    assert clean_result["top1"] == pytest.approx(np.mean(predictions == labels), abs=1e-9)
    top5 = np.argsort(-logits, axis=-1)[:, :5]
    assert clean_result["top5"] == pytest.approx(np.mean((top5 == labels[:, None]).any(-1)),
                                                 abs=1e-9)
    loss = -np.mean(numpy_log_softmax(logits)[np.arange(37), labels])
    assert clean_result["loss"] == pytest.approx(loss, rel=1e-5)


def test_top5_of_a_three_class_model_holds_every_label():
    """With fewer than five classes, top-5 is top-3 here: every real row is
    counted, padded rows are not; top-1 is numpy's argmax of the logits."""
    config = common.base_config()
    config.model, config.model_kwargs = "vit_nano_patch7_28", {"num_layers": 1}
    config.input.channels, config.num_classes = 1, 3
    mesh = train.sharding.create_mesh(config.mesh)
    model = train.build_model(config, mesh)
    state, _ = train.create_train_state(config, model, optim.make_optimizer(config, 10, 0)[0],
                                        mesh)
    rng = np.random.default_rng(0)
    params = jax.device_get(state.params)
    params["head"]["kernel"] = rng.normal(size=params["head"]["kernel"].shape).astype(np.float32)
    batch = {"image": rng.normal(size=(8, 28, 28, 1)).astype(np.float32),
             "label": rng.integers(0, 3, 8).astype(np.int32),
             "mask": np.array([1, 1, 1, 1, 1, 1, 0, 0], np.float32)}
    out = jax.jit(train.make_eval_step(model, config))(
        params, state.batch_stats, train.sharding.global_batch(batch, mesh), jax.random.key(0))
    assert float(out["count"]) == float(out["correct_top5"]) == 6
    logits = np.asarray(model.apply({"params": params}, batch["image"], train=False))
    assert float(out["correct_top1"]) == np.sum((np.argmax(logits, -1) == batch["label"])[:6])


def test_summarize_eval_reports_both_metrics():
    per_batch = [{"correct_top1": 9.0, "correct_top5": 10.0, "loss_sum": 1.0, "count": 10.0},
                 {"correct_top1": 1.0, "correct_top5": 2.0, "loss_sum": 2.0, "count": 2.0}]
    result = train.summarize_eval(per_batch)
    assert result["top1"] == pytest.approx(10 / 12)          # correct / total
    assert result["batch_mean_top1"] == pytest.approx((0.9 + 0.5) / 2)  # published running mean
    assert result["top5"] == pytest.approx(1.0)
    assert result["loss"] == pytest.approx(3.0 / 12)  # per example, not per batch
    # A batch of padding only (a process with fewer examples) counts nowhere.
    padded = train.summarize_eval(per_batch + [{"correct_top1": 0.0, "correct_top5": 0.0,
                                                "loss_sum": 0.0, "count": 0.0}])
    assert padded == result


def test_warmup_from_zero_then_cosine():
    config = common.base_config()
    config.lr, config.end_lr, config.warmup_init_lr = 1e-3, 1e-5, 0.0
    schedule = optim.learning_rate_schedule(config, total_steps=110, warmup_steps=10)
    assert float(schedule(0)) == 0.0  # the published ViT run trains its first steps at lr 0
    assert float(schedule(5)) == pytest.approx(5e-4)
    assert float(schedule(10)) == pytest.approx(1e-3)
    # Cosine: halfway through the decay, lr = end + (lr - end) / 2.
    assert float(schedule(60)) == pytest.approx(1e-5 + (1e-3 - 1e-5) / 2, rel=1e-5)
    assert float(schedule(110)) == pytest.approx(1e-5, rel=1e-4)


def test_schedule_per_epoch_holds_each_epochs_first_value():
    """The published ViT run: timm's scheduler stepped per epoch, 10 warm-up
    epochs from 0, so all of epoch 0 trains at lr 0 and epoch e < 10 at e/10."""
    config = common.base_config()
    config.lr, config.end_lr, config.warmup_init_lr = 1e-6, 1e-7, 0.0
    config.schedule_unit = "epoch"
    spe = 100
    schedule = optim.learning_rate_schedule(config, total_steps=50 * spe, warmup_steps=10 * spe,
                                            steps_per_epoch=spe)
    lr = lambda count: float(schedule(count))
    assert lr(0) == lr(50) == lr(spe - 1) == 0.0
    assert lr(spe) == lr(2 * spe - 1) == pytest.approx(1e-7)
    assert lr(9 * spe + 99) == pytest.approx(9e-7)
    assert lr(10 * spe) == lr(11 * spe - 1) == pytest.approx(1e-6)
    # Epoch 30 holds the cosine's value 20 of its 40 epochs in: halfway.
    assert lr(30 * spe + 42) == pytest.approx(1e-7 + (1e-6 - 1e-7) / 2, rel=1e-5)
    config.schedule_unit = "steps"
    with pytest.raises(ValueError, match="unknown config.schedule_unit 'steps'"):
        optim.learning_rate_schedule(config, total_steps=10, warmup_steps=0)


def test_linear_decay_ends_at_end_lr_and_warmup_starts_at_warmup_init_lr():
    config = common.base_config()
    config.lr, config.end_lr, config.warmup_init_lr = 1e-3, 1e-4, 2e-4
    config.schedule = "linear"
    schedule = optim.learning_rate_schedule(config, total_steps=110, warmup_steps=10)
    assert float(schedule(0)) == pytest.approx(2e-4)
    assert float(schedule(5)) == pytest.approx((2e-4 + 1e-3) / 2)
    assert float(schedule(60)) == pytest.approx((1e-3 + 1e-4) / 2)
    assert float(schedule(110)) == pytest.approx(1e-4)


def test_evaluation_interval_in_steps_or_epochs():
    config = common.base_config()
    assert train.eval_interval(config, 80_072) == 0  # at the end only
    config.eval_every = 500
    assert train.eval_interval(config, 80_072) == 500
    config.eval_every, config.eval_every_epochs = 0, 1.0  # the published runs: every epoch
    assert train.eval_interval(config, 80_072) == 80_072
    config.eval_every_epochs = 0.5
    assert train.eval_interval(config, 7) == 4  # round(3.5): half-even gives 4
    config.eval_every = 10
    with pytest.raises(ValueError, match="both give the evaluation interval"):
        train.eval_interval(config, 7)


def test_an_evaluation_interval_under_one_step_evaluates_every_step():
    """0.05 epochs of 7 steps is 0.35 steps: rounded to 0 it would mean 'at
    the end only', the opposite of what so frequent an interval asks."""
    config = common.base_config()
    config.eval_every_epochs = 0.05
    assert train.eval_interval(config, 7) == 1


def test_eval_batch_per_device_becomes_the_global_eval_batch():
    """2 per device on the 8 test devices is 16; an eval_batch_size of 16
    says the same and is accepted, a missing one is filled in."""
    config = common.base_config()
    config.eval_batch_per_device = 2
    config.eval_batch_size = None
    train.resolve_eval_batch_size(config)
    assert config.eval_batch_size == 2 * 8
    config.eval_batch_size = 16
    train.resolve_eval_batch_size(config)
    assert config.eval_batch_size == 16
    config.eval_batch_per_device, config.eval_batch_size = 0, None
    with pytest.raises(ValueError, match="eval_batch_size is unset"):
        train.resolve_eval_batch_size(config)


def test_schedule_without_warmup_prefix_is_timms_cosine_over_the_whole_run():
    """timm's CosineLRScheduler(t_initial=50, lr_min=1e-7, warmup_t=10), the
    published ViT schedule: from epoch 10 on, lr = lr_min + (lr - lr_min)
    (1 + cos(pi t / 50)) / 2 at the absolute epoch t; before, the linear warm-up."""
    config = common.base_config()
    config.lr, config.end_lr, config.warmup_init_lr = 1e-6, 1e-7, 0.0
    config.schedule_unit, config.warmup_prefix = "epoch", False
    spe = 100
    schedule = optim.learning_rate_schedule(config, total_steps=50 * spe, warmup_steps=10 * spe,
                                            steps_per_epoch=spe)
    timm = lambda t: 1e-7 + 0.5 * (1e-6 - 1e-7) * (1 + np.cos(np.pi * t / 50))
    for epoch in (10, 20, 30, 49):
        assert float(schedule(epoch * spe + 7)) == pytest.approx(timm(epoch), rel=1e-5)
    assert float(schedule(10 * spe)) == pytest.approx(9.1406e-7, rel=1e-4)  # below the peak
    for epoch in (0, 3, 9):  # the warm-up is unchanged: e / 10 of the peak
        assert float(schedule(epoch * spe + 50)) == pytest.approx(epoch * 1e-7, abs=1e-12)


def test_config_without_the_newer_schedule_keys_steps_per_step_after_the_warmup():
    """A config made before schedule_unit and warmup_prefix existed gets the
    rate of every step (not held per epoch) and the decay after the warm-up."""
    config = common.base_config()
    config.lr, config.end_lr, config.warmup_init_lr = 1e-3, 1e-5, 0.0
    del config["schedule_unit"], config["warmup_prefix"]
    schedule = optim.learning_rate_schedule(config, total_steps=110, warmup_steps=10,
                                            steps_per_epoch=10)
    assert float(schedule(5)) == pytest.approx(5e-4)  # not epoch 0's rate, 0
    # Halfway through the 100 decay steps: lr = end + (lr - end) / 2.
    assert float(schedule(60)) == pytest.approx(1e-5 + (1e-3 - 1e-5) / 2, rel=1e-5)


def test_a_warmup_as_long_as_the_run_is_all_linear_warmup():
    """train.schedule_lengths caps the warm-up at the run's length, which
    leaves no steps for the cosine."""
    config = common.base_config()
    config.lr, config.end_lr, config.warmup_init_lr = 1e-3, 1e-5, 0.0
    schedule = optim.learning_rate_schedule(config, total_steps=10, warmup_steps=10)
    for step in range(10):
        assert float(schedule(step)) == pytest.approx(step * 1e-4, rel=1e-6, abs=1e-12)


@pytest.mark.parametrize("key, value", [("schedule", "cosin"), ("optimizer", "adam"),
                                        ("wd_mask", "none")])
def test_unknown_optimizer_settings_are_refused_not_replaced(key, value):
    # Otherwise 'adam' would train with SGD and 'cosin' at a constant rate.
    config = common.base_config()
    config[key] = value
    with pytest.raises(ValueError, match=f"unknown config.{key} '{value}'"):
        optim.make_optimizer(config, total_steps=10, warmup_steps=0)


def test_weight_decay_mask_skips_biases_norms_and_embeddings():
    params = {"embedding": {"kernel": np.ones((4, 4, 1, 8)), "bias": np.ones(8)},
              "cls": np.ones((1, 1, 8)),
              "Transformer": {"posembed_input": {"pos_embedding": np.ones((1, 5, 8))},
                              "encoder_norm": {"scale": np.ones(8)}},
              "head": {"kernel": np.ones((8, 10))}}
    mask = optim.decay_mask(params)
    assert mask["embedding"]["kernel"] and mask["head"]["kernel"]
    assert not mask["embedding"]["bias"] and not mask["cls"]
    assert not mask["Transformer"]["posembed_input"]["pos_embedding"]
    assert not mask["Transformer"]["encoder_norm"]["scale"]


@pytest.mark.parametrize("model", ["vit_nano_patch7_28", "resnet18_small"])
def test_weight_decay_mask_on_a_real_model_decays_kernels_only(model):
    """timm's rule (no decay on any bias or norm): the attention's q/k/v
    biases are 2-D, (heads, head_dim), and must not be decayed."""
    from noisy_flax.models import create_model
    net = create_model(model, num_classes=10)
    params = jax.eval_shape(lambda: net.init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)),
                                             train=False))["params"]
    flat = flax.traverse_util.flatten_dict(optim.decay_mask(params), sep="/")
    decayed = {name for name, on in flat.items() if on}
    expected = {name for name in flat if name.rsplit("/", 1)[-1] == "kernel"}
    assert decayed == expected
    # Known names, from the architectures' layouts.
    if model.startswith("vit"):
        attention = "Transformer/encoderblock_0/MultiHeadDotProductAttention_1"
        assert {f"{attention}/query/kernel", "head/kernel", "embedding/kernel"} <= decayed
        assert flat[f"{attention}/query/bias"] is False and params["Transformer"][
            "encoderblock_0"]["MultiHeadDotProductAttention_1"]["query"]["bias"].ndim == 2
        assert not flat["cls"] and not flat["Transformer/posembed_input/pos_embedding"]
    else:
        assert {"conv1/kernel", "fc/kernel"} <= decayed and not flat["bn1/scale"]


def test_gradient_accumulation_averages_the_micro_batches():
    """With BatchNorm, each micro-batch normalises by its own statistics, so
    accumulating over rows 0::2 and 1::2 equals the average of two separate
    steps on those rows, and differs from one step on all 16 rows."""
    config = common.base_config()
    config.model = "resnet18_small"
    config.model_kwargs = {"width": 4}
    config.input.channels = 1
    mesh = train.sharding.create_mesh(config.mesh)
    model = train.build_model(config, mesh)
    tx = optax.sgd(1.0)
    schedule = optax.constant_schedule(1.0)
    state, _ = train.create_train_state(config, model, tx, mesh)
    rng = np.random.default_rng(0)
    batch = {"image": rng.normal(size=(16, 28, 28, 1)).astype(np.float32),
             "label": rng.integers(0, 10, 16).astype(np.int32)}
    single = jax.jit(train.make_train_step(model, tx, schedule, config))
    one = single(state, batch)[0]
    halves = [single(state, {k: v[j::2] for k, v in batch.items()})[0] for j in (0, 1)]
    config.grad_accum_steps = 2
    two = jax.jit(train.make_train_step(model, tx, schedule, config))(state, batch)[0]
    # SGD(1): p - (g0 + g1) / 2 is the mean of the two separate steps' results.
    jax.tree.map(lambda a, b, c: np.testing.assert_allclose(a, (b + c) / 2, rtol=2e-4, atol=2e-6),
                 two.params, halves[0].params, halves[1].params)
    differences = jax.tree.leaves(jax.tree.map(lambda a, b: float(np.abs(a - b).max()),
                                               one.params, two.params))
    assert max(differences) > 1e-3  # the big batch's statistics differ


def test_label_smoothed_cross_entropy_by_hand():
    logits = np.array([[2.0, 0.5, -1.0], [0.0, 0.0, 3.0]])
    labels = np.array([0, 1])
    log_p = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    targets = 0.9 * np.eye(3)[labels] + 0.1 / 3  # smoothing 0.1 over 3 classes
    got = train.cross_entropy(jnp.asarray(logits), jnp.asarray(labels), 3, smoothing=0.1)
    np.testing.assert_allclose(got, -(targets * log_p).sum(axis=1), rtol=1e-6)
    plain = train.cross_entropy(jnp.asarray(logits), jnp.asarray(labels), 3)
    np.testing.assert_allclose(plain, -log_p[[0, 1], labels], rtol=1e-6)


def _optimizer_config(**overrides):
    c = common.base_config()
    c.update(dict(lr=0.01, schedule="constant", warmup_steps=0, grad_clip_norm=0.0,
                  b1=0.8, b2=0.95, eps=1e-6, weight_decay=0.1, wd_mask="kernels",
                  momentum=0.7, nesterov=False))
    c.update(overrides)
    return c


def _run_optimizer(config, params, grads):
    tx, _ = optim.make_optimizer(config, total_steps=10, warmup_steps=0)
    state = tx.init(params)
    for g in grads:
        updates, state = tx.update(g, state, params)
        params = optax.apply_updates(params, updates)
    return params


def _optimizer_problem():
    rng = np.random.default_rng(0)
    params = {"dense": {"kernel": rng.normal(size=(3, 2)), "bias": rng.normal(size=2)}}
    grads = [jax.tree.map(lambda p: rng.normal(size=p.shape), params) for _ in range(3)]
    to32 = lambda tree: jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), tree)  # noqa: E731
    return params, grads, to32


def test_adamw_steps_match_numpy():
    """Three AdamW steps written out: bias-corrected moments, eps outside the
    square root, decoupled decay of kernels only (wd_mask='kernels')."""
    params, grads, to32 = _optimizer_problem()
    got = _run_optimizer(_optimizer_config(optimizer="adamw"), to32(params), [to32(g) for g in grads])
    for name, decays in (("kernel", True), ("bias", False)):
        p, m, v = params["dense"][name].copy(), 0.0, 0.0
        for t, g in enumerate((g["dense"][name] for g in grads), start=1):
            m, v = 0.8 * m + 0.2 * g, 0.95 * v + 0.05 * g ** 2
            step = (m / (1 - 0.8 ** t)) / (np.sqrt(v / (1 - 0.95 ** t)) + 1e-6)
            p = p - 0.01 * (step + (0.1 * p if decays else 0.0))
        np.testing.assert_allclose(got["dense"][name], p, rtol=1e-5, atol=1e-6)


def test_adamw_eps_is_added_outside_the_square_root():
    """A constant gradient g = eps = 1e-6: the bias-corrected moments are g and
    g^2, so every step is g / (|g| + eps) = 0.5 (eps under the root, or
    optax's default 1e-8, would give about 0.001 or 0.99)."""
    params = {"dense": {"kernel": jnp.ones((2, 2)), "bias": jnp.zeros(2)}}
    grads = [jax.tree.map(lambda p: jnp.full_like(p, 1e-6), params)] * 3
    got = _run_optimizer(_optimizer_config(optimizer="adamw", weight_decay=0.0), params, grads)
    np.testing.assert_allclose(got["dense"]["kernel"], 1 - 3 * 0.01 * 0.5, rtol=1e-6)
    np.testing.assert_allclose(got["dense"]["bias"], -3 * 0.01 * 0.5, rtol=1e-5)


@pytest.mark.parametrize("optimizer", ("adamw", "sgd"))
def test_wd_mask_all_decays_biases_too(optimizer):
    """Zero gradients: one step only decays, p (1 - lr wd) = 0.999 p, for the
    bias as well as the kernel."""
    params = {"dense": {"kernel": jnp.full((2, 2), 2.0), "bias": jnp.full(2, 3.0)}}
    grads = [jax.tree.map(jnp.zeros_like, params)]
    for mask, bias_factor in (("all", 0.999), ("kernels", 1.0)):
        got = _run_optimizer(_optimizer_config(optimizer=optimizer, wd_mask=mask), params, grads)
        np.testing.assert_allclose(got["dense"]["kernel"], 2.0 * 0.999, rtol=1e-6)
        np.testing.assert_allclose(got["dense"]["bias"], 3.0 * bias_factor, rtol=1e-6)


@pytest.mark.parametrize("nesterov", (False, True))
def test_sgd_steps_match_numpy(nesterov):
    """Weight decay added to the gradient (kernels only), then heavy-ball or
    Nesterov momentum as PyTorch's SGD: b = mu b + g; step g + mu b or b."""
    params, grads, to32 = _optimizer_problem()
    got = _run_optimizer(_optimizer_config(optimizer="sgd", nesterov=nesterov), to32(params),
                         [to32(g) for g in grads])
    for name, decays in (("kernel", True), ("bias", False)):
        p, b = params["dense"][name].copy(), 0.0
        for g in (g["dense"][name] for g in grads):
            g = g + (0.1 * p if decays else 0.0)
            b = 0.7 * b + g
            p = p - 0.01 * (g + 0.7 * b if nesterov else b)
        np.testing.assert_allclose(got["dense"][name], p, rtol=1e-5, atol=1e-6)


def _noisy_vit(noise_type="gaussian"):
    config = common.base_config()
    config.model = "vit_nano_patch7_28"
    config.model_kwargs = {"num_layers": 1}
    config.input.channels = 1
    config.noise.update(type=noise_type, site="attn_input", scope="global")
    mesh = train.sharding.create_mesh(config.mesh)
    model = train.build_model(config, mesh)
    tx, _ = optim.make_optimizer(config, 10, 0)
    state, _ = train.create_train_state(config, model, tx, mesh)
    rng = np.random.default_rng(0)
    params = jax.device_get(state.params)  # a zero head would hide the noise in equal logits
    params["head"]["kernel"] = rng.normal(size=params["head"]["kernel"].shape).astype(np.float32)
    state = state.replace(params=jax.device_put(params, train.sharding.replicated(mesh)))
    batch = {"image": rng.normal(size=(16, 28, 28, 1)).astype(np.float32),
             "label": rng.integers(0, 10, 16).astype(np.int32),
             "mask": np.ones(16, np.float32)}
    return config, mesh, model, state, batch


def test_train_step_logs_the_smoothed_loss_over_micro_batches_and_the_rate_it_used():
    """No noise, no dropout: training mode computes the eval-mode logits, so
    the logged loss is numpy's label-smoothed cross-entropy over all 16 rows
    (two equal micro-batches average to it), and the logged rate is the one
    the first update used, schedule(0)."""
    config, _, model, state, batch = _noisy_vit("none")
    config.label_smoothing, config.grad_accum_steps = 0.1, 2
    schedule = optax.linear_schedule(0.5, 1.0, 10)
    tx = optax.sgd(schedule)
    state = state.replace(opt_state=tx.init(state.params))
    step = jax.jit(train.make_train_step(model, tx, schedule, config))
    _, metrics = step(state, {"image": batch["image"], "label": batch["label"]})
    logits = np.asarray(model.apply({"params": state.params}, batch["image"], train=False),
                        np.float64)
    log_p = numpy_log_softmax(logits)
    targets = 0.9 * np.eye(10)[batch["label"]] + 0.1 / 10
    assert float(metrics["loss"]) == pytest.approx(-(targets * log_p).sum(-1).mean(), rel=1e-5)
    assert float(metrics["accuracy"]) == pytest.approx(np.mean(np.argmax(logits, -1) ==
                                                               batch["label"]))
    assert float(metrics["lr"]) == pytest.approx(0.5)


def test_each_train_step_draws_new_noise():
    """The step's key is folded with the step: with the parameters held still
    (SGD at rate 0), the same batch at steps 0 and 1 meets other Gaussian noise."""
    config, _, model, state, batch = _noisy_vit()
    step = jax.jit(train.make_train_step(model, optax.sgd(0.0), optax.constant_schedule(0.0),
                                         config))
    state = state.replace(opt_state=optax.sgd(0.0).init(state.params))
    after_one, first = step(state, batch)
    _, second = step(after_one, batch)
    jax.tree.map(np.testing.assert_array_equal, after_one.params, state.params)
    assert abs(float(first["loss"]) - float(second["loss"])) > 1e-6


def test_each_eval_batch_draws_new_noise():
    """Batch i's key is fold_in(PRNGKey(seed + 1), i): the same batch twice
    meets other Gaussian noise, as a loop over the eval step shows."""
    config, mesh, model, state, batch = _noisy_vit()
    config.noise.eval = True
    eval_step = jax.jit(train.make_eval_step(model, config))
    result = train.evaluate(eval_step, state, iter([batch, batch]), mesh, seed=3)
    base = jax.random.PRNGKey(4)
    sums = [float(eval_step(state.params, state.batch_stats,
                            train.sharding.global_batch(batch, mesh),
                            jax.random.fold_in(base, i))["loss_sum"]) for i in (0, 1)]
    assert abs(sums[0] - sums[1]) > 1e-6
    assert result["loss"] == pytest.approx(sum(sums) / 32, rel=1e-6)


def test_evaluation_is_deterministic_and_independent_of_the_batch_split():
    """Noise on in training only: an evaluation must run the model as at test
    time, so the same state scores the same in one order of batches of 16 and
    in reversed batches of 8, and as the noise-free model (numpy metrics)."""
    config, mesh, _, state, _ = _noisy_vit()
    config.noise.update(train=True, eval=False)
    model = train.build_model(config, mesh)
    rng = np.random.default_rng(1)
    images = rng.normal(size=(32, 28, 28, 1)).astype(np.float32)
    labels = rng.integers(0, 10, 32).astype(np.int32)
    split = lambda size, order: [{"image": images[i:i + size], "label": labels[i:i + size],
                                  "mask": np.ones(size, np.float32)}
                                 for i in order(range(0, 32, size))]
    eval_step = jax.jit(train.make_eval_step(model, config))
    runs = [train.evaluate(eval_step, state, iter(split(16, list)), mesh),
            train.evaluate(eval_step, state, iter(split(16, list)), mesh),
            train.evaluate(eval_step, state, iter(split(8, reversed)), mesh)]
    logits = np.asarray(model.clone(noise=None).apply({"params": state.params}, images,
                                                      train=False), np.float64)
    log_p = numpy_log_softmax(logits)
    for result in runs:
        assert result["count"] == 32
        assert result["top1"] == np.mean(np.argmax(logits, -1) == labels)
        assert result["loss"] == pytest.approx(-np.mean(log_p[np.arange(32), labels]), rel=1e-5)
    assert runs[0] == runs[1]
    # eval_max_examples=16 at batch 16 scores the first batch only.
    capped = train.evaluate(eval_step, state, iter(split(16, list)), mesh, max_batches=1)
    assert capped["count"] == 16
    assert capped["top1"] == np.mean(np.argmax(logits[:16], -1) == labels[:16])


def test_gradients_are_clipped_before_the_optimizer_scales_them():
    """Global norm 10 clipped to 1, then SGD at 0.01: p - 0.01 g / 10. Clipping
    the update instead would leave -0.01 g (norm 0.1) unclipped: -0.06, -0.08."""
    g = {"w": jnp.asarray([6.0, 8.0])}
    config = _optimizer_config(optimizer="sgd", momentum=0.0, weight_decay=0.0,
                               grad_clip_norm=1.0, lr=0.01)
    got = _run_optimizer(config, {"w": jnp.zeros(2)}, [g])
    np.testing.assert_allclose(got["w"], [-0.006, -0.008], rtol=1e-6)


def test_an_epoch_is_the_whole_batches_the_stream_yields():
    """1,000 examples in batches of 128: the stream drops the last 104, so an
    epoch is 7 steps and two epochs 14."""
    config = common.base_config()
    config.batch_size, config.num_epochs, config.total_steps = 128, 2.0, 0
    assert train.schedule_lengths(config, 1000)[:2] == (1000 // 128, 2 * (1000 // 128))


def test_fractional_epochs_and_a_warmup_longer_than_the_run():
    """7 steps an epoch: 1.5 epochs train 11 steps (10.5 rounded up, never
    short of the asked epochs), 0.5 warm-up epochs are round(3.5) = 4 steps,
    and a warm-up longer than the run ends with it."""
    config = common.base_config()
    config.batch_size, config.num_epochs, config.total_steps = 128, 1.5, 0
    config.warmup_epochs = 0.5
    assert train.schedule_lengths(config, 1000) == (7, 11, 4)
    config.warmup_epochs, config.warmup_steps = 0.0, 50
    assert train.schedule_lengths(config, 1000) == (7, 11, 11)


def test_warmup_epochs_round_to_the_nearest_step():
    """7 steps an epoch: 0.2 warm-up epochs are 1.4 steps, 1 to the nearest
    step (rounding up would give 2), and 0.3 are 2.1, so 2."""
    config = common.base_config()
    config.batch_size, config.num_epochs, config.total_steps = 128, 3.0, 0
    config.warmup_epochs = 0.2
    assert train.schedule_lengths(config, 1000) == (7, 21, 1)
    config.warmup_epochs = 0.3
    assert train.schedule_lengths(config, 1000) == (7, 21, 2)


def test_a_train_split_smaller_than_a_batch_is_one_step_an_epoch():
    """100 examples in batches of 128: the stream runs on across epochs, so
    a batch still fills; an epoch counts as 1 step, not 0 (which would make
    two epochs a run of no steps)."""
    config = common.base_config()
    config.batch_size, config.num_epochs, config.total_steps = 128, 2.0, 0
    config.warmup_epochs = 1.0
    assert train.schedule_lengths(config, 100) == (1, 2, 1)


def test_gradient_accumulation_gives_each_micro_batch_its_own_noise():
    """Micro-batch j (rows j::2) draws its noise from fold_in(step key, j); the
    step is SGD(1) on the mean of their gradients, here computed again with
    jax.grad on each micro-batch alone."""
    config, _, model, state, batch = _noisy_vit()
    tx = optax.sgd(1.0)
    state = state.replace(opt_state=tx.init(state.params))
    config.grad_accum_steps = 2
    step = jax.jit(train.make_train_step(model, tx, optax.constant_schedule(1.0), config))
    new, _ = step(state, {"image": batch["image"], "label": batch["label"]})
    step_key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)

    def loss(params, images, labels, key):
        rngs = dict(zip(("dropout", "noise"), jax.random.split(key)))
        logits = model.apply({"params": params}, images, train=True, rngs=rngs)
        return train.cross_entropy(logits, labels, config.num_classes).mean()

    grads = [jax.grad(loss)(state.params, batch["image"][j::2], batch["label"][j::2],
                            jax.random.fold_in(step_key, j)) for j in (0, 1)]
    jax.tree.map(lambda got, p, a, b: np.testing.assert_allclose(got, p - (a + b) / 2,
                                                                 rtol=1e-4, atol=1e-6),
                 new.params, state.params, *grads)


def test_train_records_and_evaluations_every_nth_step_and_at_the_last(tmp_path):
    """5 steps, log_every=2, eval_every=2, a checkpoint every 3: steps 2 and 4
    log and evaluate, and so does step 5, the last; step 3's checkpoint logs
    nothing. eval_max_examples=20 in batches of 16 scores whole batches up
    to at least 20 examples: 2 batches, 32 of the 32 test examples."""
    data_dir, idx_dir = tiny_run.data_dirs(tmp_path)
    config = tiny_run.tiny_config(data_dir, idx_dir, total_steps=5, log_every=2,
                                  eval_every=2, checkpoint_every=3, eval_batch_size=16,
                                  eval_max_examples=20, async_checkpoints=False)
    started = time.perf_counter()
    summary = train.train_and_evaluate(config, str(tmp_path / "run"))
    wall = time.perf_counter() - started
    # Images, not steps, per second: 5 steps of 16 within at most the wall
    # time (the summary rounds to 0.1).
    assert summary["images_per_second"] >= 5 * 16 / wall - 0.05
    assert summary["images_per_second"] == pytest.approx(5 * 16 / summary["train_seconds"],
                                                         rel=0.25)  # seconds rounded to 0.1
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    assert [r["step"] for r in records if r["split"] == "train"] == [2, 4, 5]
    evals = [r for r in records if r["split"] == "eval"]
    assert [r["step"] for r in evals] == [2, 4, 5]
    assert [r["count"] for r in evals] == [2 * 16] * 3


def test_a_divergence_between_log_steps_is_caught_before_its_checkpoint(tmp_path):
    """log_every=50, a checkpoint every step: step 1 trains at lr 0 (warm-up
    from 0), step 2 at 1e30 overflows; that step is checked before it is
    saved although it logs nothing, so only step 1 is kept."""
    data_dir, idx_dir = tiny_run.data_dirs(tmp_path)
    config = tiny_run.tiny_config(data_dir, idx_dir, total_steps=3, lr=1e30,
                                  warmup_steps=1, warmup_init_lr=0.0, checkpoint_every=1,
                                  log_every=50, async_checkpoints=False)
    with pytest.raises(train.TrainingError, match=r"diverged at step 2 .*\(step 1\) is kept"):
        train.train_and_evaluate(config, str(tmp_path / "run"))
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["1"]
