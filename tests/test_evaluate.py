"""Evaluation under batch orders: metrics by hand, padding and scope against
unsharded references, the feature path, and the CLI on a trained checkpoint."""
import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds
from jax.sharding import Mesh

from configs import common
from noisy_flax import batch_order, evaluate, features, noise, optim, sharding, train


def _config(noise_type="optimal_q", scope="device", model="vit_nano_patch7_28"):
    c = common.base_config()
    c.model = model
    c.model_kwargs = {"num_layers": 1} if model.startswith("vit") else {"width": 4}
    c.input.channels = 1
    c.input.train_crop = "none"
    c.noise.update(type=noise_type, scope=scope,
                   site="attn_input" if model.startswith("vit") else "block_input")
    return c


def _model_and_variables(c, mesh, seed=0):
    model = train.build_model(c, mesh)
    tx, _ = optim.make_optimizer(c, 10, 0)
    c.seed = seed
    state, _ = train.create_train_state(c, model, tx, mesh)
    # A zero-initialised head would make every logit equal; give it weights.
    params = jax.device_get(state.params)
    head = "head" if "head" in params else "fc"
    rng = np.random.default_rng(seed)
    params[head]["kernel"] = rng.normal(size=params[head]["kernel"].shape).astype(np.float32)
    return model, {"params": params, "batch_stats": jax.device_get(state.batch_stats)}


def _data(n_per_class=4, num_classes=10, seed=0):
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(num_classes), n_per_class)
    labels = rng.permutation(labels).astype(np.int32)
    images = rng.normal(size=(len(labels), 28, 28, 1)).astype(np.float32)
    return evaluate.EvalData(images, labels, num_classes)


def test_running_average_metric_by_hand():
    # 5 examples, batches {0,1,2} and {3,4}; predictions right for 0, 1, 3.
    labels = np.array([0, 1, 2, 0, 1])
    logits = np.full((5, 3), -1.0)
    logits[[0, 1, 2, 3, 4], [0, 1, 0, 0, 2]] = 1.0
    batches = [np.array([0, 1, 2]), np.array([3, 4])]
    m = evaluate.order_metrics(logits, labels, batches)
    assert m["top1"] == pytest.approx(3 / 5)
    assert m["batch_mean_top1"] == pytest.approx((2 / 3 + 1 / 2) / 2)
    assert m["correct_top1"] == 3 and m["count"] == 5 and m["num_batches"] == 2
    assert m["top5"] == 1.0  # three classes: top-3 always holds the label
    # Loss: -log softmax of [1, -1, -1] at the right class for 3 examples,
    # at a -1 entry for the other two.
    right = -np.log(np.e / (np.e + 2 / np.e))
    wrong = -np.log((1 / np.e) / (np.e + 2 / np.e))
    assert m["loss"] == pytest.approx((3 * right + 2 * wrong) / 5)


def test_top5_counts_labels_ranked_fifth_but_not_sixth():
    # 8 classes; the label is ranked 1st, 5th, 6th and 8th in the four rows.
    logits = np.tile(np.arange(8, 0, -1, dtype=np.float64), (4, 1))  # class c ranked c+1
    labels = np.array([0, 4, 5, 7])
    m = evaluate.order_metrics(logits, labels, [np.arange(4)])
    assert m["correct_top5"] == 2 and m["top5"] == pytest.approx(0.5)
    assert m["correct_top1"] == 1


def test_top5_breaks_ties_as_top1_does():
    """Equal logits (a zero head): argmax takes class 0, so top-5 must be
    classes 0-4, the lower index first as in jax.lax.top_k (the training
    evaluation's rule); every top-1 hit is then a top-5 hit."""
    labels = np.array([0, 0, 4, 9])
    m = evaluate.order_metrics(np.zeros((4, 10)), labels, [np.arange(4)])
    assert m["correct_top1"] == 2 and m["correct_top5"] == 3


def test_top5_ties_among_a_thousand_classes_follow_lax_top_k():
    """numpy's default sort is not stable beyond a handful of elements: with
    ImageNet's 1000 classes, tied logits must still rank the lower index first."""
    logits = np.tile((np.arange(1000) % 7).astype(np.float64), (6, 1))  # ties at 6, 13, 20, ...
    labels = np.array([6, 13, 20, 27, 34, 41])  # the six lowest-index tied classes
    _, reference = jax.lax.top_k(jnp.asarray(logits, jnp.float32), 5)
    expected = int(np.sum(np.any(np.asarray(reference) == labels[:, None], axis=1)))
    m = evaluate.order_metrics(logits, labels, [np.arange(6)])
    assert expected == 5
    assert m["correct_top5"] == expected and m["correct_top1"] == 1


def test_loss_stays_finite_for_large_logits():
    # log-softmax of [1000, 0, 0]: -log(1 + 2 e^-1000) ~ 0 at class 0, -1000 elsewhere.
    logits = np.array([[1000.0, 0.0, 0.0], [1000.0, 0.0, 0.0]])
    m = evaluate.order_metrics(logits, np.array([0, 1]), [np.arange(2)])
    assert m["loss"] == pytest.approx((0.0 + 1000.0) / 2)


def test_an_empty_batch_does_not_enter_the_running_average():
    labels = np.array([0, 1, 2, 0, 1])
    logits = np.eye(3)[[0, 1, 0, 0, 2]]  # right for 0, 1, 3
    batches = [np.array([0, 1, 2]), np.array([], np.int64), np.array([3, 4])]
    m = evaluate.order_metrics(logits, labels, batches)
    assert m["batch_mean_top1"] == pytest.approx((2 / 3 + 1 / 2) / 2)
    assert m["num_batches"] == 2


def test_markdown_table_cells_by_hand():
    """Percentages with their counts, and the entropy cells under their headers.
    A markdown table splits cells at every unescaped '|' and is only a table
    when the header and the delimiter row have the same number of cells."""
    def estimate(value):
        return {"value": value, "stderr": 0.01, "n_train": 3, "n_test": 2, "label_entropy": 1.0}
    entropy = {"noise_site": {"probe": estimate(0.1), "gaussian": estimate(0.2)},
               "pre_logits": {"probe": estimate(0.3), "gaussian": estimate(0.4)}}
    row = {"order": "shuffled", "noise": "on", "num_batches": 2, "top1": 3 / 5, "top5": 4 / 5,
           "correct_top1": 3, "correct_top5": 4, "count": 5, "batch_mean_top1": 7 / 12,
           "entropy": entropy}
    def cells_of(table):
        return ([c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", line.strip()[1:-1])]
                for line in table.splitlines()[:3])
    plain = {k: v for k, v in row.items() if k != "entropy"}
    assert [len(c) for c in cells_of(evaluate.markdown_table({"rows": [plain]}))] == [6, 6, 6]
    header, delimiter, first = cells_of(evaluate.markdown_table({"rows": [row]}))
    assert len(header) == len(delimiter) == len(first) == 10
    cells = dict(zip(header, first))
    assert cells["top-1"] == "60.00% (3/5)" and cells["top-5"] == "80.00% (4/5)"
    assert cells["batch-mean top-1 (published)"] == "58.33%"
    assert cells["H(Y|Z) probe, site"] == "0.100 ± 0.010"
    assert cells["H(Y|Z) probe, pre-logits"] == "0.300 ± 0.010"
    assert cells["H(Y|Z) gauss, site"] == "0.200 ± 0.010"
    assert cells["H(Y|Z) gauss, pre-logits"] == "0.400 ± 0.010"


@pytest.mark.parametrize("scope", ["device", "global"])
def test_padded_sharded_batches_match_unsharded_reference(scope):
    """Batch 10 on 8 devices is padded to 16. Global scope must mix exactly
    the 10 real rows; device scope each device's 2 rows. Reference: the same
    model applied without mesh, mask or padding to those groups."""
    c = _config(scope=scope)
    mesh = sharding.create_mesh(c.mesh)
    assert mesh.size == 8
    model, variables = _model_and_variables(c, mesh)
    data = _data()
    result = evaluate.evaluate_setting(model, variables, data, c.noise, on=True,
                                       orders=("class_sorted",), batch_size=10, mesh=mesh)
    batches = batch_order.batch_indices(data.labels, "class_sorted", 10)
    # Unsharded host arrays: 'global' is the plain noise over what it is given.
    reference_cfg = c.noise.copy_and_resolve_references()
    reference_cfg.scope = "global"
    plain_noise = features.eval_noise(reference_cfg, on=True, mesh=None)
    reference_model = model.clone(noise=plain_noise)
    group = 10 if scope == "global" else 2
    correct = 0
    for batch in batches:
        for start in range(0, len(batch), group):
            rows = batch[start:start + group]
            logits = reference_model.apply({"params": variables["params"]}, data.images[rows],
                                           train=False)
            correct += int(np.sum(np.argmax(logits, -1) == data.labels[rows]))
    assert result["class_sorted"]["metrics"]["correct_top1"] == correct
    assert result["class_sorted"]["metrics"]["count"] == len(data.labels)


def test_noise_off_is_eval_false_and_orders_share_it():
    c = _config(noise_type="gaussian")
    mesh = sharding.create_mesh(c.mesh)
    model, variables = _model_and_variables(c, mesh)
    data = _data()
    result = evaluate.evaluate_setting(model, variables, data, c.noise, on=False,
                                       orders=batch_order.ORDERS, batch_size=10, mesh=mesh,
                                       with_features=True)
    # Independent: the model built with config.noise.eval=False, one example at a time.
    c.noise.eval = False
    off_model = train.build_model(c, mesh)
    logits = np.concatenate([off_model.apply({"params": variables["params"]}, data.images[i:i + 1],
                                             train=False) for i in range(len(data.labels))])
    expected = int(np.sum(np.argmax(logits, -1) == data.labels))
    for order in batch_order.ORDERS:
        assert result[order]["metrics"]["correct_top1"] == expected
        assert result[order]["metrics"]["pass_"] == "shared_pass"
    # The direct route (batches of 10) gives the same logits as the shared pass.
    forward = jax.jit(features.make_forward(model.clone(noise=features.eval_noise(c.noise, on=False))))
    direct = evaluate.run_batches(forward, variables, data,
                                  batch_order.batch_indices(data.labels, "shuffled", 10), mesh)
    np.testing.assert_allclose(direct["logits"], logits, rtol=1e-4, atol=1e-5)


def test_within_image_noise_is_scored_from_one_shared_pass():
    """within_image mixes the rows of each image alone: the same output in
    any batch, so every order is scored from one pass; batch mixing is not."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(4, 7, 7, 2)).astype(np.float32))
    alone = np.concatenate([np.asarray(noise.within_image_noise(x[i:i + 1])) for i in range(4)])
    np.testing.assert_allclose(np.asarray(noise.within_image_noise(x)), alone, rtol=1e-6, atol=1e-6)
    assert evaluate.order_independent(noise.noise_config(type="within_image"), on=True)
    assert not evaluate.order_independent(noise.noise_config(type="optimal_q"), on=True)
    assert evaluate.order_independent(noise.noise_config(type="optimal_q"), on=False)


@pytest.mark.parametrize("noise_type", ["optimal_q", "gaussian"])
def test_one_device_grouped_path_matches_the_loop(noise_type):
    """On one device, many test batches run per call (vmapped): the path that
    produced the study's numbers. Each vmapped slice must still be one test
    batch with its own key, as in the batch-by-batch loop; 40 examples in
    batches of 7 leave a short last batch, and 3 batches per call a filler."""
    c = _config(noise_type=noise_type, scope="global")
    mesh = Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("data", "fsdp"))
    model, variables = _model_and_variables(c, mesh)
    data = _data()
    noisy = model.clone(noise=features.eval_noise(c.noise, on=True, mesh=mesh))
    forward, grouped = evaluate._forward(noisy, False, None, None)
    batches = batch_order.batch_indices(data.labels, "shuffled", 7, seed=1)
    loop = evaluate.run_batches(forward, variables, data, batches, mesh, seed=3)
    fast = evaluate.run_batches(forward, variables, data, batches, mesh, seed=3,
                                grouped=grouped, group_examples=21)
    np.testing.assert_allclose(fast["logits"], loop["logits"], rtol=1e-5, atol=1e-5)
    clean = model.clone(noise=None).apply({"params": variables["params"]}, data.images,
                                          train=False)
    assert not np.allclose(loop["logits"], clean, atol=1e-3)  # the noise did act


def test_grouped_path_runs_a_batch_larger_than_its_group():
    """A test batch above group_examples (--batch_size 1000 on one GPU) still
    runs, one batch per call. A row-wise forward: the logits are each image's
    first three values."""
    def forward(params, batch_stats, images, mask, key):
        return {"logits": jnp.where(mask[:, None], images.reshape(len(images), -1)[:, :3], 0.0)}
    mesh = Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("data", "fsdp"))
    data = _data()
    batches = batch_order.batch_indices(data.labels, "shuffled", 7, seed=1)
    grouped = jax.jit(jax.vmap(forward, in_axes=(None, None, 0, 0, 0)))
    out = evaluate.run_batches(jax.jit(forward), {"params": {}, "batch_stats": {}}, data, batches,
                               mesh, grouped=grouped, group_examples=5)
    np.testing.assert_allclose(out["logits"], data.images.reshape(len(data.labels), -1)[:, :3])


def test_single_order_makes_optimal_q_the_identity():
    """k = 1: (x + x) / 2 = x, so noise on equals noise off, example by example."""
    c = _config(noise_type="optimal_q", scope="global")
    mesh = sharding.create_mesh(c.mesh)
    model, variables = _model_and_variables(c, mesh)
    data = _data(n_per_class=2)
    on = evaluate.evaluate_setting(model, variables, data, c.noise, on=True, orders=("single",),
                                   batch_size=10, mesh=mesh, with_features=True)
    off = evaluate.evaluate_setting(model, variables, data, c.noise, on=False, orders=("single",),
                                    batch_size=10, mesh=mesh, with_features=True)
    assert on["single"]["metrics"]["pass_"] == "direct"
    for result in (on, off):  # one example per batch, whatever --batch_size says
        assert result["single"]["metrics"]["batch_size"] == 1
        assert result["single"]["metrics"]["num_batches"] == len(data.labels)
    np.testing.assert_allclose(on["single"]["features"]["pre_logits"],
                               off["single"]["features"]["pre_logits"], rtol=1e-5, atol=1e-6)


def test_class_constant_features_give_near_zero_conditional_entropy():
    """Images constant within a class -> features constant within a class
    (a deterministic model, noise off or mixing same-class batches) ->
    H(Y|Z) = 0, which the probe must approach."""
    rng = np.random.default_rng(1)
    prototypes = rng.normal(size=(10, 28, 28, 1)).astype(np.float32)
    labels = np.repeat(np.arange(10), 20).astype(np.int32)
    data = evaluate.EvalData(prototypes[labels], labels, 10)
    c = _config(noise_type="optimal_q", scope="global")
    mesh = sharding.create_mesh(c.mesh)
    model, variables = _model_and_variables(c, mesh)
    for on, order in ((False, "shuffled"), (True, "same_class")):
        result = evaluate.evaluate_setting(model, variables, data, c.noise, on=on,
                                           orders=(order,), batch_size=10, mesh=mesh,
                                           with_features=True)
        feats = result[order]["features"]
        assert feats["noise_site"].shape == (200, 64) and feats["pre_logits"].shape == (200, 64)
        for site in features.FEATURE_SITES:
            per_class = [feats[site][labels == k] for k in range(10)]
            assert max(float(np.ptp(f, axis=0).max()) for f in per_class) < 1e-4
        estimates = evaluate.entropy_estimates(feats, labels, 10)
        for site in features.FEATURE_SITES:
            assert estimates[site]["probe"]["value"] < 0.05, (on, site)
            assert estimates[site]["probe"]["n_test"] == 100


def test_resnet_features_and_orders():
    c = _config(noise_type="circulant", scope="device", model="resnet18_small")
    c.noise.alpha = 0.3
    mesh = sharding.create_mesh(c.mesh)
    model, variables = _model_and_variables(c, mesh)
    data = _data(n_per_class=2)
    result = evaluate.evaluate_setting(model, variables, data, c.noise, on=True,
                                       orders=("distinct_class", "same_class"), batch_size=10,
                                       mesh=mesh, with_features=True)
    for order in ("distinct_class", "same_class"):
        assert result[order]["metrics"]["count"] == 20
        assert result[order]["features"]["noise_site"].shape == (20, 32)  # stage 4: 8 x width
        assert result[order]["features"]["pre_logits"].shape == (20, 32)


@pytest.mark.parametrize("model_name, kwargs", [
    ("resnet18_small", {}), ("vit_nano_patch7_28", {}),
    ("vit_nano_patch7_28", {"representation_size": 8}),
    ("vit_nano_patch7_28", {"last_block_all_tokens": True})])  # class token among all tokens
def test_pre_logits_are_what_the_head_reads(model_name, kwargs):
    """The head applied to the pre-logits features gives the logits back."""
    c = _config(noise_type="gaussian", model=model_name)
    c.model_kwargs.update(kwargs)
    mesh = sharding.create_mesh(c.mesh)
    model, variables = _model_and_variables(c, mesh)
    model = features.model_with_noise(model, features.eval_noise(c.noise, on=True))
    images = jnp.asarray(_data(n_per_class=1).images[:6])
    out = features.make_forward(model)(variables["params"], variables["batch_stats"], images,
                                       jnp.ones(6, jnp.int32), jax.random.PRNGKey(0))
    head = variables["params"]["head" if "head" in variables["params"] else "fc"]
    np.testing.assert_allclose(out["pre_logits"] @ head["kernel"] + head["bias"], out["logits"],
                               rtol=1e-5, atol=1e-5)


def test_noise_site_features_leave_out_the_class_token():
    """ViT tokens: the mean over the patch tokens 1.., not token 0 (which the
    noise never touches); feature maps: the mean over height and width."""
    rng = np.random.default_rng(0)
    c = _config()
    model = train.build_model(c, sharding.create_mesh(c.mesh))
    tokens = rng.normal(size=(3, 17, 8)).astype(np.float32)
    np.testing.assert_allclose(features.pool_site(model, jnp.asarray(tokens)),
                               tokens[:, 1:].mean(axis=1), rtol=1e-6, atol=1e-6)
    maps = rng.normal(size=(3, 4, 5, 8)).astype(np.float32)
    np.testing.assert_allclose(features.pool_site(model, jnp.asarray(maps)),
                               maps.mean(axis=(1, 2)), rtol=1e-6, atol=1e-6)


def test_noise_on_is_applied_at_test_time_even_when_configured_off():
    """'On' evaluates the configured noise whatever its eval switch says
    (a train-only config still has an eval-only-style evaluation)."""
    on = features.eval_noise(noise.noise_config(type="optimal_q", eval=False), on=True)
    off = features.eval_noise(noise.noise_config(type="optimal_q", eval=False), on=False)
    assert on.eval and on.name != "identity"
    assert off.eval and off.name == "identity"


def test_features_refuse_two_sown_noise_outputs():
    tree = {"block0": {"noise_output": (jnp.zeros(2),)}, "block1": {"noise_output": (jnp.ones(2),)}}
    with pytest.raises(ValueError, match="expected one sown 'noise_output', found 2"):
        features.find_sown(tree, "noise_output")
    np.testing.assert_array_equal(features.find_sown({"b": tree["block1"]}, "noise_output"),
                                  np.ones(2))


def test_in_memory_route_refuses_huge_splits(monkeypatch):
    c = _config()
    monkeypatch.setattr(evaluate.input_pipeline, "num_eval_examples", lambda *a, **k: 50_000)
    c.image_size = 384
    c.input.channels = 3
    # float32 images: 50,000 x 384 x 384 x 3 x 4 bytes.
    gib = 50_000 * np.zeros((384, 384, 3), np.float32).nbytes / 2 ** 30
    with pytest.raises(ValueError, match=rf"holds the split in memory.* needs {gib:.1f} GiB > 4 GiB"):
        evaluate.load_eval_data(c)


def test_a_per_device_eval_batch_is_resolved_for_the_in_memory_split():
    """configs/noisyvit_imagenet.py sizes its eval batch per device; only
    training resolved it, so the evaluate CLI met eval_batch_size=None."""
    c = _config()
    c.eval_batch_size = None
    c.eval_batch_per_device = 2
    with tfds.testing.mock_data(num_examples=21):
        data = evaluate.load_eval_data(c)
    assert len(data.labels) == 21
    assert c.eval_batch_size is None  # the caller's config is left as it was


def test_end_to_end_on_a_trained_checkpoint(tmp_path, monkeypatch):
    """runlocal training on mock data, then the evaluate entry point."""
    c = _config(noise_type="optimal_q")
    common.apply_runlocal(c)
    c.eval_max_examples = 0
    c.plot = False
    with tfds.testing.mock_data(num_examples=24):
        train.train_and_evaluate(c, str(tmp_path))
        # Batches of 8: the 24 mock labels hold 9 of the 10 classes, too few
        # for distinct-class batches of 10.
        result = evaluate.run(c, str(tmp_path), orders=batch_order.ORDERS, batch_size=8,
                              with_entropy=True, probe_steps=10)
        monkeypatch.setattr(evaluate, "restore_variables", None)  # refused before the restore
        with pytest.raises(ValueError, match="the labels hold only 9 of the 10"):
            evaluate.run(c, str(tmp_path), orders=batch_order.ORDERS, batch_size=10,
                         name="refused")
    assert result["step"] == 2 and result["examples"] == 24
    rows = {(r["order"], r["noise"]): r for r in result["rows"]}
    assert len(rows) == 10
    for row in rows.values():
        assert row["count"] == 24
        assert 0.0 <= row["top1"] <= row["top5"] <= 1.0
        assert row["entropy"]["pre_logits"]["probe"]["n_train"] + \
            row["entropy"]["pre_logits"]["probe"]["n_test"] == 24
    assert rows[("single", "on")]["num_batches"] == 24
    # Noise off: every order sees the same predictions.
    assert len({rows[(o, "off")]["correct_top1"] for o in batch_order.ORDERS}) == 1
    saved = json.loads((tmp_path / "entropy_orders.json").read_text())
    assert saved["rows"] == json.loads(json.dumps(result["rows"]))
    assert "| class_sorted | on |" in (tmp_path / "entropy_orders.md").read_text()


def test_streamed_ordered_batches_cover_the_split_once():
    c = _config()
    c.eval_batch_size = 16
    c.eval_order = "class_sorted"
    with tfds.testing.mock_data(num_examples=37):
        labels = evaluate.split_labels(c)
        batches = list(evaluate.ordered_eval_batches(c))
        reference = list(evaluate.input_pipeline.eval_batches(c))
        halves = [list(evaluate.ordered_eval_batches(c, process_index=p, process_count=2))
                  for p in (0, 1)]
    assert len(labels) == 37
    # Two processes: each holds its half of every batch, in the same batch order.
    assert len(halves[0]) == len(halves[1]) == len(batches)
    for whole, first, second in zip(batches, *halves):
        for key in whole:
            np.testing.assert_array_equal(np.concatenate([first[key], second[key]]), whole[key])
    # 37 sorted labels in batches of 16: 16 + 16 + 5 real rows, padding masked.
    assert sorted(int(b["mask"].sum()) for b in batches) == [5, 16, 16]
    seen = np.concatenate([b["label"][b["mask"] > 0] for b in batches])
    assert sorted(seen.tolist()) == sorted(labels.tolist())
    for b in batches:
        real = b["label"][b["mask"] > 0]
        assert np.all(np.diff(real) >= 0)
    # Same images as the dataset-order pipeline (a multiset comparison).
    ref_images = np.concatenate([b["image"][b["mask"] > 0] for b in reference])
    got_images = np.concatenate([b["image"][b["mask"] > 0] for b in batches])
    ref, got = (x.reshape(len(x), -1).astype(np.float64) for x in (ref_images, got_images))
    distance = np.abs(got[:, None, :] - ref[None, :, :]).max(axis=-1)
    assert distance.min(axis=1).max() < 1e-5
    assert sorted(distance.argmin(axis=1).tolist()) == list(range(37))  # one to one


def test_streamed_single_order_puts_one_example_in_each_padded_batch():
    c = _config()
    c.eval_batch_size = 8
    c.eval_order = "single"
    with tfds.testing.mock_data(num_examples=5):
        batches = list(evaluate.ordered_eval_batches(c))
        with pytest.raises(ValueError, match="eval_batch_size=8 is not divisible by 3 processes"):
            list(evaluate.ordered_eval_batches(c, process_count=3))
    assert len(batches) == 5
    assert all(b["mask"].shape == (8,) and b["mask"].sum() == 1 for b in batches)


def test_training_evaluates_in_the_configured_order(tmp_path):
    c = _config(noise_type="optimal_q")
    common.apply_runlocal(c)
    c.eval_order = "same_class"
    c.eval_max_examples = 0
    c.plot = False
    with tfds.testing.mock_data(num_examples=24):
        summary = train.train_and_evaluate(c, str(tmp_path))
    assert summary["eval_count"] == 24


@pytest.mark.parametrize("order", ["same_class", "distinct_class"])
def test_entropy_split_is_independent_of_the_batch_order(order):
    """Both draw from seed 0 by default. A split that reused the order's
    stream put whole batches of the same-class and distinct-class orders
    into one half (40 and 50 of 50 here); a 10-example batch drawn
    independently lies in one half of 25 per class with probability ~1e-4."""
    labels = np.repeat(np.arange(10), 50)
    fit, held = evaluate.stratified_halves(labels, seed=0)
    batches = batch_order.batch_indices(labels, order, 10, seed=0, num_classes=10)
    in_fit = np.isin(np.arange(len(labels)), fit)
    one_sided = sum(bool(in_fit[b].all() or (~in_fit[b]).all()) for b in batches)
    assert one_sided <= 1
    assert sorted(np.concatenate([fit, held]).tolist()) == list(range(len(labels)))


def test_the_odd_member_of_a_class_goes_to_the_fit_half():
    labels = np.array([0, 0, 0, 1, 2, 2, 2, 2, 2])  # classes of 3, 1 and 5
    fit, held = evaluate.stratified_halves(labels, seed=4)
    assert np.bincount(labels[fit], minlength=3).tolist() == [2, 1, 3]
    assert np.bincount(labels[held], minlength=3).tolist() == [1, 0, 2]


def test_rows_name_the_noise_setting_that_produced_them(monkeypatch):
    """Each row's 'noise' is the on/off setting whose outputs it reports."""
    def fake_setting(model, variables, data, noise_config, *, on, orders, **kwargs):
        return {o: {"metrics": {"top1": 1.0 if on else 0.0, "pass_": "direct"}, "features": {}}
                for o in orders}
    monkeypatch.setattr(evaluate, "evaluate_setting", fake_setting)
    result = evaluate.evaluate_checkpoint_orders(
        None, {}, _data(n_per_class=1), {"type": "gaussian"}, orders=("shuffled", "single"),
        batch_size=4, mesh=None)
    assert {(r["order"], r["noise"]): r["top1"] for r in result["rows"]} == {
        ("shuffled", "on"): 1.0, ("single", "on"): 1.0,
        ("shuffled", "off"): 0.0, ("single", "off"): 0.0}


def test_an_example_left_out_of_the_batches_is_an_error_not_class_zero():
    c = _config(noise_type="optimal_q", scope="global")
    mesh = Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("data", "fsdp"))
    model, variables = _model_and_variables(c, mesh)
    data = _data()
    forward, grouped = evaluate._forward(model, False, None, None)
    batches = batch_order.batch_indices(data.labels, "class_sorted", 10)
    for fast in (None, grouped):
        with pytest.raises(ValueError, match="exactly once: 10 never evaluated, 0 evaluated"):
            evaluate.run_batches(forward, variables, data, batches[:-1], mesh, grouped=fast)
        with pytest.raises(ValueError, match="0 never evaluated, 10 evaluated more than once"):
            evaluate.run_batches(forward, variables, data, batches + batches[:1], mesh,
                                 grouped=fast)


def test_per_class_keeps_the_first_examples_of_each_class_in_split_order():
    c = _config()
    c.eval_batch_size = 16
    with tfds.testing.mock_data(num_examples=40):
        everything = evaluate.load_eval_data(c)
        kept = evaluate.load_eval_data(c, per_class=2)
    expected = np.sort(np.concatenate([np.flatnonzero(everything.labels == k)[:2]
                                       for k in np.unique(everything.labels)]))
    np.testing.assert_array_equal(kept.labels, everything.labels[expected])
    np.testing.assert_array_equal(kept.images, everything.images[expected])


def test_max_examples_keeps_the_first_examples_in_split_order():
    c = _config()
    c.eval_batch_size = 16
    with tfds.testing.mock_data(num_examples=40):
        everything = evaluate.load_eval_data(c)
        kept = evaluate.load_eval_data(c, max_examples=7)
        with pytest.raises(ValueError, match="max_examples=-1 must be >= 0"):
            evaluate.load_eval_data(c, max_examples=-1)
    np.testing.assert_array_equal(kept.labels, everything.labels[:7])
    np.testing.assert_array_equal(kept.images, everything.images[:7])
