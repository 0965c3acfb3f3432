"""The study: a tiny grid end to end on mock data, and resuming."""
import csv
import json
import os

import numpy as np
import pytest
import tensorflow_datasets as tfds

from configs import study_fashion_mnist
from noisy_flax import study, study_report


def _tiny_config():
    c = study_fashion_mnist.get_config("runlocal")
    c.unlock()
    c.study.archs = tuple(a for a in c.study.archs if a["name"] == "vit")
    c.study.noises = tuple(n for n in c.study.noises if n["label"] in ("none", "optimal_q"))
    c.study.seeds = (0,)
    c.study.orders = ("class_sorted", "single")
    c.study.eval_per_class = 2
    c.study.train_examples = 32
    c.lock()
    return c


def test_plan_shares_trainings_between_protocols():
    c = study_fashion_mnist.get_config()
    runs = study.plan(c.study)
    # One model per (seed, arch, training noise): 3 x 2 x 10.
    assert len(runs) == 60
    clean = [r for r in runs if r.train_noise == "none"][0]
    assert clean.evals[0] == ("none", "off") and len(clean.evals) == 10
    noisy = [r for r in runs if r.train_noise == "gaussian_1.0"][0]
    assert noisy.evals == (("gaussian_1.0", "off"), ("gaussian_1.0", "on"))
    # Every (protocol, noise) of the issue's grid is covered for each arch and seed.
    cells = {(r.arch, r.seed, r.train_noise, e) for r in runs for e in r.evals}
    for arch in ("vit", "resnet"):
        for seed in (0, 1, 2):
            for n in [x["label"] for x in c.study.noises if x["label"] != "none"]:
                assert (arch, seed, n, (n, "off")) in cells      # train only
                assert (arch, seed, "none", (n, "on")) in cells  # eval only
                assert (arch, seed, n, (n, "on")) in cells       # both


def test_plan_is_seed_major():
    """A study cut short must still hold whole seeds of every arch: every
    run of seed 0 comes before any run of seed 1."""
    c = study_fashion_mnist.get_config()
    seeds = [r.seed for r in study.plan(c.study)]
    assert seeds == sorted(seeds)
    assert {r.arch for r in study.plan(c.study)[:20]} == {"vit", "resnet"}


def test_plan_trains_only_what_the_chosen_protocols_evaluate():
    """Eval only needs the clean model alone: no noisy training without
    train_only or both; an unknown protocol is refused."""
    c = study_fashion_mnist.get_config()
    c.study.protocols = ("eval_only",)
    runs = study.plan(c.study)
    assert {r.train_noise for r in runs} == {"none"} and len(runs) == 3 * 2
    assert all(len(r.evals) == 10 for r in runs)  # none off + nine noises on
    c.study.protocols = ("eval_only", "test_only")
    with pytest.raises(ValueError, match=r"unknown study protocols \['test_only'\]"):
        study.plan(c.study)


def test_study_runs_reports_and_resumes_without_retraining(tmp_path, monkeypatch, capsys):
    c = _tiny_config()
    workdir = str(tmp_path)
    with tfds.testing.mock_data(num_examples=40):
        paths = study.run_study(c, workdir)
    out = capsys.readouterr().out
    assert "pretrain vit seed0" in out and "train runs/vit/seed0/optimal_q" in out
    report = open(paths["report"]).read()
    assert "| optimal_q | eval only |" in report and "| optimal_q | train + eval |" in report
    for key in ("orders_vit", "strength_eval_only", "entropy"):
        assert os.path.getsize(paths[key]) > 1000
    record = json.load(open(tmp_path / "runs/vit/seed0/none/eval/optimal_q_on.json"))
    assert set(record["orders"]) == set(c.study.orders)
    assert all(o["count"] == record["examples"] for o in record["orders"].values())

    # Second run: everything is there, nothing is trained or evaluated.
    def refuse(*args, **kwargs):
        raise AssertionError("a finished run was recomputed")
    monkeypatch.setattr(study.Trainer, "train", refuse)
    monkeypatch.setattr(study, "evaluate_run", refuse)
    stamp = os.path.getmtime(tmp_path / "runs/vit/seed0/optimal_q/train.json")
    with tfds.testing.mock_data(num_examples=40):
        study.run_study(c, workdir)
    assert "0 units to do (2 runs complete)" in capsys.readouterr().out
    assert os.path.getmtime(tmp_path / "runs/vit/seed0/optimal_q/train.json") == stamp

    # A lost evaluation is redone from the saved variables, without training.
    os.remove(tmp_path / "runs/vit/seed0/optimal_q/eval/optimal_q_on.json")
    monkeypatch.undo()
    monkeypatch.setattr(study.Trainer, "train", refuse)
    with tfds.testing.mock_data(num_examples=40):
        study.run_study(c, workdir)
    redone = json.load(open(tmp_path / "runs/vit/seed0/optimal_q/eval/optimal_q_on.json"))
    assert redone["orders"]["class_sorted"]["count"] == record["examples"]

    # Resuming under another config is refused, before anything is written.
    changed = _tiny_config()
    changed.unlock()
    changed.study.eval_per_class = 3
    with pytest.raises(ValueError, match=r"holds a study with another config "
                                         r"\(study.eval_per_class: 2 -> 3\); .*new --workdir"):
        study.run_study(changed, workdir)
    assert json.load(open(tmp_path / "study_config.json"))["study"]["eval_per_class"] == 2
    # So is a report built from another config than the one that ran.
    with pytest.raises(SystemExit) as stopped:
        study_report.main(["--config", "configs/study_fashion_mnist.py:runlocal",
                           "--workdir", workdir])
    assert stopped.value.code == 2
    assert "--config differs from the study that ran" in capsys.readouterr().err


@pytest.mark.parametrize("change, pattern", [
    ({"orders": ("class_sorted", "shufled")}, r"unknown study.orders entry 'shufled'"),
    ({"orders": ("distinct_class",), "eval_batch_size": 12},
     r"study.eval_batch_size=12 is larger than the 10 classes"),
    ({"noises": ({"label": "none", "type": "none"},
                 {"label": "c", "type": "circulant", "alpha": 1.5})}, r"alpha=1.5 is outside"),
    ({"noises": ({"label": "none", "type": "none"},
                 {"label": "c", "type": "circulant", "alpha": 0.5})},
     r"alpha=0.5 with padded batches"),
    ({"orders": ()}, r"study.orders, study.seeds, study.archs and study.noises each need"),
    ({"warmup_fraction": -5.0}, r"study.warmup_fraction=-5.0 must be in \[0, 1\)"),
    ({"probe_steps": -3}, r"study.probe_steps=-3 must be positive"),
    ({"train_examples": 0}, r"study.train_examples=0 must be positive"),
    ({"warmup_fraction": 1.0}, r"study.warmup_fraction=1.0 must be in \[0, 1\)"),  # no decay left
    ({"probe_steps": 0}, r"study.probe_steps=0 must be positive"),
])
def test_impossible_settings_fail_before_anything_is_written(tmp_path, change, pattern):
    c = _tiny_config()
    c.unlock()
    c.study.update(change)
    workdir = tmp_path / "study"
    with pytest.raises(ValueError, match=pattern):
        study.run_study(c, str(workdir))
    assert not workdir.exists()


def test_distinct_class_accepts_a_test_batch_of_every_class():
    # The published test batch, 10, on Fashion-MNIST's 10 classes: one of each.
    from noisy_flax import sharding
    c = _tiny_config()
    c.unlock()
    c.study.update({"orders": ("distinct_class",), "eval_batch_size": 10})
    study.check_study(c, sharding.create_mesh(c.mesh))


def test_a_workdir_that_is_a_file_is_one_line(tmp_path):
    path = tmp_path / "file"
    path.write_text("x")
    with pytest.raises(ValueError, match=r"--workdir .*file is a file; give a directory"):
        study.run_study(_tiny_config(), str(path))


def test_the_configured_noise_scope_reaches_every_run():
    c = _tiny_config()
    c.unlock()
    c.noise.scope = "global"
    arch = c.study.archs[0]
    assert study.run_config(c, arch, {"type": "optimal_q"}, seed=0).noise.scope == "global"


@pytest.mark.parametrize("scope, devices, expected", [
    ("device", 1, "mixes the whole test batch"),
    ("global", 8, "mixes the whole test batch"),
    ("device", 8, "mixes each device's 2 rows of a test batch separately"),  # ceil(10 / 8)
])
def test_report_says_what_a_batch_mixing_noise_mixes(scope, devices, expected):
    assert expected in study_report._scope_text(scope, devices, 10)


def test_probe_caveat_counts_a_shared_pass_once():
    """Noise off is one pass shared by every order: five orders, one feature set."""
    entries = {("vit", "none", "none", order): [{"file": "runs/vit/seed0/none/eval/none_off.json",
                                                 "pass_": "shared_pass",
                                                 "H_probe_pre_logits": 2.5}]
               for order in ("class_sorted", "shuffled", "single", "same_class", "distinct_class")}
    assert "on 1 of 1 distinct clean feature sets" in study_report._probe_caveat(entries, 2.3)


def test_probe_noise_note_measures_the_identity_noises_on_a_batch_of_one():
    """Optimal Q and circulant Q leave a batch of one as it is: their single
    rows against the clean single rows of the same seed measure the probe's
    own noise (0.02 and 0.05 here); Gaussian noise changes features and is
    left out. Five orders share the clean pass: one fit per site."""
    noises = [{"label": "none", "type": "none"}, {"label": "optimal_q", "type": "optimal_q"},
              {"label": "circulant_0.3", "type": "circulant"},
              {"label": "gaussian_0.1", "type": "gaussian"}]
    clean_file = "runs/vit/seed0/none/eval/none_off.json"

    def entry(file, pass_, probe, capped):
        return {"seed": 0, "file": file, "pass_": pass_, "H_probe_pre_logits": probe,
                "H_gaussian_pre_logits": 1.0, "probe_capped_pre_logits": capped,
                "probe_max_steps": 100}

    c = {("vit", "none", "none", order): [entry(clean_file, "shared_pass", 2.00, True)]
         for order in ("class_sorted", "shuffled", "single")}
    c[("vit", "eval_only", "optimal_q", "single")] = [entry("q.json", 1, 2.02, True)]
    c[("vit", "eval_only", "circulant_0.3", "single")] = [entry("c.json", 1, 1.95, False)]
    c[("vit", "eval_only", "gaussian_0.1", "single")] = [entry("g.json", 1, 3.00, False)]
    c[("vit", "eval_only", "optimal_q", "shuffled")] = [entry("q.json", 2, 4.00, True)]
    note = study_report._probe_noise_note(c, noises)
    assert note.startswith("3 of 5 probe fits stopped at their 100-step cap")
    assert "move by up to 0.050 nats (median 0.035)" in note
    assert "Gaussian estimate's by up to 0." in note


def test_entropy_closed_form_command_refuses_a_batch_of_zero(capsys):
    from noisy_flax import entropy
    with pytest.raises(SystemExit) as stopped:
        entropy.main(["--k", "0"])
    assert stopped.value.code == 2
    assert capsys.readouterr().err == "error: --k takes batch sizes of at least 1, got 0\n"


def _record(seed, train_noise, eval_noise, switch, top1_by_order):
    train_dir = "none" if train_noise == "none" else f"{train_noise}_on"
    name = "none" if switch == "off" else f"{eval_noise}_on"
    return {"run": f"vit/seed{seed}", "arch": "vit", "seed": seed, "train_noise": train_noise,
            "eval_noise": eval_noise, "switch": switch,
            "file": os.path.join("runs", "vit", f"seed{seed}", train_dir, "eval", name + ".json"),
            "orders": {order: {"top1": top1, "top5": 1.0, "batch_mean_top1": top1, "count": 100,
                               "num_batches": 4, "pass_": 1}
                       for order, top1 in top1_by_order.items()}}


def test_each_evaluation_maps_to_its_protocol():
    """Trained without / tested without: none; without / with: eval only;
    with / without: train only; with / with: train + eval."""
    def protocol(train_noise, eval_noise, switch):
        return study_report.protocol_of(_record(0, train_noise, eval_noise, switch, {}))
    assert protocol("none", "none", "off") == "none"
    assert protocol("none", "optimal_q", "on") == "eval_only"
    assert protocol("optimal_q", "optimal_q", "off") == "train_only"
    assert protocol("optimal_q", "optimal_q", "on") == "both"
    with pytest.raises(ValueError, match="another noise"):
        protocol("optimal_q", "gaussian_1.0", "on")


def test_cells_mark_probe_fits_that_ran_into_the_step_cap():
    """500 of 500 steps: stopped by the cap; 40 of 500: by the tolerance."""
    def estimates(steps_run):
        probe = {"value": 1.0, "label_entropy": 2.3, "n_train": 50, "n_test": 50,
                 "settings": {"steps_run": steps_run, "max_steps": 500}}
        return {"probe": probe, "gaussian": {"value": 1.1}}
    record = _record(0, "none", "none", "off", {"shuffled": 0.8})
    record["orders"]["shuffled"]["entropy"] = {"pre_logits": estimates(500),
                                               "noise_site": estimates(40)}
    record["protocol"] = study_report.protocol_of(record)
    (entry,) = study_report.cells([record])[("vit", "none", "none", "shuffled")]
    assert entry["probe_capped_pre_logits"] is True
    assert entry["probe_capped_noise_site"] is False
    assert (entry["H_probe_pre_logits"], entry["H_gaussian_noise_site"]) == (1.0, 1.1)
    assert (entry["H_Y"], entry["n_entropy"]) == (2.3, (50, 50))  # the probe's label entropy


def test_report_tables_hold_the_means_spreads_and_paired_changes_by_hand():
    """Three seeds; clean top-1 80 / 82 / 84 under both orders, optimal Q at
    test time only 79 / 80 / 84 shuffled and 85 / 86 / 90 class-sorted.
    By hand: clean 82.0 ± 2.0; noisy 81.0 ± 2.6 (sd of -2, -1, 3 is sqrt(7))
    and 87.0 ± 2.6; paired changes -1, -2, 0 -> -1.0 ± 1.0 and 5, 4, 6 -> +5.0 ± 1.0."""
    records = []
    for seed, clean, shuffled, sorted_ in ((0, .80, .79, .85), (1, .82, .80, .86),
                                           (2, .84, .84, .90)):
        records.append(_record(seed, "none", "none", "off",
                               {"shuffled": clean, "class_sorted": clean}))
        records.append(_record(seed, "none", "optimal_q", "on",
                               {"shuffled": shuffled, "class_sorted": sorted_}))
    for r in records:
        r["protocol"] = study_report.protocol_of(r)
    c = study_report.cells(records)
    orders, noises = ["shuffled", "class_sorted"], ["none", "optimal_q"]
    accuracy = study_report.accuracy_table(c, "vit", noises, orders).splitlines()
    assert accuracy[2].startswith("| none | no noise | 82.0 ± 2.0 | 82.0 ± 2.0 |")
    assert accuracy[3].startswith("| optimal_q | eval only | 81.0 ± 2.6 | 87.0 ± 2.6 |")
    delta = study_report.delta_table(c, "vit", noises, orders).splitlines()
    assert delta[2:] == ["| optimal_q | eval only | -1.0 ± 1.0 | +5.0 ± 1.0 |"]


def test_report_rows_follow_the_noises_then_the_protocols_and_name_a_single_seed():
    """One seed: clean 80, train only 78, eval only 85, train + eval 83, so
    the paired changes are -2, +5 and +3 points, each from one seed."""
    records = [_record(0, "none", "none", "off", {"shuffled": .80}),
               _record(0, "none", "optimal_q", "on", {"shuffled": .85}),
               _record(0, "optimal_q", "optimal_q", "on", {"shuffled": .83}),
               _record(0, "optimal_q", "optimal_q", "off", {"shuffled": .78})]
    for r in records:
        r["protocol"] = study_report.protocol_of(r)
    c = study_report.cells(records)
    accuracy = study_report.accuracy_table(c, "vit", ["none", "optimal_q"], ["shuffled"])
    assert [line.rsplit(" | ", 1)[0] for line in accuracy.splitlines()[2:]] == [
        "| none | no noise | 80.0 (1 seed)", "| optimal_q | train only | 78.0 (1 seed)",
        "| optimal_q | eval only | 85.0 (1 seed)", "| optimal_q | train + eval | 83.0 (1 seed)"]
    delta = study_report.delta_table(c, "vit", ["none", "optimal_q"], ["shuffled"])
    assert delta.splitlines()[2:] == ["| optimal_q | train only | -2.0 (1 seed) |",
                                      "| optimal_q | eval only | +5.0 (1 seed) |",
                                      "| optimal_q | train + eval | +3.0 (1 seed) |"]


def test_a_cell_names_its_runs_in_seed_order_whatever_order_they_were_read_in():
    # Read as seed10, seed2, ... a directory listing would put 10 before 2.
    records = [_record(seed, "none", "none", "off", {"shuffled": .8}) for seed in (10, 2, 0)]
    for r in records:
        r["protocol"] = study_report.protocol_of(r)
    c = study_report.cells(records)
    line = study_report.accuracy_table(c, "vit", ["none"], ["shuffled"]).splitlines()[2]
    assert line.endswith("| `vit/seed{0,2,10}/none/eval/none` |")


def test_entropy_table_is_in_nats_with_three_decimals():
    """1.234 and 1.240 nats: mean 1.237, sample sd 0.006 / sqrt(2) = 0.0042."""
    c = {("vit", "none", "none", "shuffled"): [{"seed": 0, "H_probe_pre_logits": 1.234},
                                               {"seed": 1, "H_probe_pre_logits": 1.240}]}
    table = study_report.entropy_table(c, "vit", ["none"], ["shuffled"], "pre_logits")
    assert table.splitlines()[2] == "| none | no noise | 1.237 ± 0.004 |"


def test_batch_mean_note_gives_the_largest_gap_in_points():
    """Running average 81.25% against correct / total 80%: 1.25 points."""
    records = [{"orders": {"shuffled": {"top1": 0.80, "batch_mean_top1": 0.8125},
                           "single": {"top1": 0.70, "batch_mean_top1": 0.70}}}]
    assert study_report._batch_mean_note(records).startswith(
        "its largest difference from correct / total over all 2 evaluations is 1.25 points")


def test_csv_keeps_seed_level_entropy_to_five_decimals(tmp_path):
    record = _record(0, "none", "none", "off", {"shuffled": .8})
    record["orders"]["shuffled"]["entropy"] = {"pre_logits": {"probe": {"value": 1.2345678},
                                                              "gaussian": {"value": 0.5}}}
    record["protocol"] = study_report.protocol_of(record)
    study_report.write_csv([record], str(tmp_path / "all_runs.csv"))
    with open(tmp_path / "all_runs.csv") as f:
        (row,) = csv.DictReader(f)
    assert (row["H_probe_pre_logits"], row["H_gaussian_pre_logits"]) == ("1.23457", "0.5")
    assert (row["order"], row["top1"], row["protocol"]) == ("shuffled", "0.8", "none")


def test_report_columns_follow_the_configured_order_of_batch_orders(tmp_path):
    c = _tiny_config()
    c.unlock()
    c.study.orders = ("single", "class_sorted")  # not alphabetical
    record = _record(0, "none", "none", "off", {"class_sorted": .8, "single": .7})
    record.update(examples=100, seconds=1.0)
    path = tmp_path / "runs/vit/seed0/none/eval/none_off.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(record))
    report = open(study_report.write_report(c, str(tmp_path))["report"]).read()
    assert "| noise | protocol | single | class_sorted | runs |" in report
    assert "| none | no noise | 70.0 (1 seed) | 80.0 (1 seed) |" in report


def test_keys_the_study_sets_per_run_are_refused_on_the_command_line():
    for arg in ("--config.lr=-5.0", "--config.batch_size=7", "--config.noise.type=gaussian",
                "--config.seed=3"):
        with pytest.raises(ValueError, match=r"is set for each run by the study"):
            study.check_no_per_run_keys(["study", "--config", "c.py", arg])
    study.check_no_per_run_keys(["study", "--config.noise.scope=global", "--config.study.seeds=(0,)",
                                 "--config.data_dir=/d", "--workdir", "w"])


def test_training_batches_flip_left_right_and_keep_pre_training_and_fine_tuning_apart():
    """Flips mirror the width axis (images are N, H, W, C); stream 0
    (pre-training) and stream 1 (fine-tuning) draw their own orders, each from
    default_rng([seed, 7, stream])."""
    from noisy_flax import evaluate
    images = np.broadcast_to(np.arange(4.0)[None, None, :, None], (64, 3, 4, 1)).copy()
    images += np.arange(64.0)[:, None, None, None] * 10  # each image its own offset
    data = evaluate.EvalData(images, np.arange(64) % 10, 10)
    batch = next(study.train_batches(data, 16, seed=5, flip=True))
    mirrored = 0
    for image in batch["image"]:
        original = images[int(image[0, 0, 0] // 10)]
        assert np.array_equal(image, original) or np.array_equal(image, np.flip(original, axis=1))
        mirrored += not np.array_equal(image, original)
    assert 0 < mirrored < 16
    for stream in (0, 1):
        first = next(study.train_batches(data, 16, seed=5, flip=False, stream=stream))
        expected = np.random.default_rng([5, 7, stream]).permutation(64)[:16]
        np.testing.assert_array_equal(first["label"], data.labels[expected])


def test_training_batches_use_each_example_once_per_epoch_and_flip_half():
    """64 examples in batches of 16: every 4 batches are one permutation. Over
    256 draws a fair coin flips 128 +- 8 (one sd) images."""
    from noisy_flax import evaluate
    images = np.broadcast_to(np.arange(4.0)[None, None, :, None], (64, 3, 4, 1)).copy()
    images += np.arange(64.0)[:, None, None, None] * 10  # image i: 10 i + column
    data = evaluate.EvalData(images, np.arange(64) % 10, 10)
    stream = study.train_batches(data, 16, seed=3, flip=True)
    flipped = 0
    for _ in range(4):
        first_pixels = np.concatenate([next(stream)["image"][:, 0, 0, 0] for _ in range(4)])
        assert sorted((first_pixels // 10).astype(int).tolist()) == list(range(64))
        flipped += int(np.sum(first_pixels % 10 == 3))  # column 3 moved to column 0
    assert 128 - 3 * 8 < flipped < 128 + 3 * 8


def test_paired_changes_pair_by_seed_when_a_seed_is_missing():
    """Clean seeds 0, 1, 2 at 80, 82, 84; noisy seeds 1 and 2 at 83 and 90:
    changes +1 and +6 (seed by seed, not position by position)."""
    entry = lambda seed, top1: {"seed": seed, "top1": top1}  # noqa: E731
    c = {("vit", "none", "none", "shuffled"): [entry(0, .80), entry(1, .82), entry(2, .84)],
         ("vit", "eval_only", "optimal_q", "shuffled"): [entry(1, .83), entry(2, .90)]}
    deltas = study_report.paired_deltas(c, "vit", "eval_only", "optimal_q", "shuffled")
    np.testing.assert_allclose(deltas, [1.0, 6.0], atol=1e-9)


def test_pre_training_warms_up_over_its_own_steps():
    """10% of the 60 pre-training steps, not of the 20 fine-tuning steps."""
    c = study_fashion_mnist.get_config()
    arch = next(a for a in c.study.archs if a["name"] == "vit")
    none = next(n for n in c.study.noises if n["label"] == "none")
    pre = study.run_config(c, arch, none, 0, steps=arch["pretrain_steps"])
    assert (pre.total_steps, pre.warmup_steps) == (60, 6)
    fine = study.run_config(c, arch, none, 0)
    assert (fine.total_steps, fine.warmup_steps) == (20, 2)
    # 10% of 27 steps is 2.7: the nearest whole step, 3.
    assert study.run_config(c, arch, none, 0, steps=27).warmup_steps == 3


def test_run_config_takes_each_run_setting_from_its_arch_noise_and_seed():
    c = _tiny_config()
    arch = dict(name="x", model="vit_nano_patch7_28", model_kwargs=dict(num_layers=2),
                site="block_input", layer=1, stage=3, lr=0.123, pretrain_steps=5, steps=17,
                batch=24)
    run = study.run_config(c, arch, {"label": "c", "type": "circulant", "alpha": 0.3}, seed=4)
    assert (run.seed, run.lr, run.batch_size, run.total_steps) == (4, 0.123, 24, 17)
    assert (run.model, run.model_kwargs.num_layers) == ("vit_nano_patch7_28", 2)
    assert (run.noise.type, run.noise.alpha) == ("circulant", 0.3)
    assert (run.noise.site, run.noise.layer, run.noise.stage) == ("block_input", 1, 3)
    # Trained with its noise (train only, both) and tested with it switched on or off.
    assert run.noise.train and run.noise.eval


@pytest.mark.parametrize("fraction, steps, warmup", [(0.1, 17, 2), (0.25, 40, 10), (0.0, 17, 0)])
def test_run_config_warms_up_for_its_fraction_of_the_steps(fraction, steps, warmup):
    # round(0.1 * 17) = 2; a fraction of 0 means no warm-up step at all.
    c = _tiny_config()
    c.study.warmup_fraction = fraction
    arch = dict(name="x", model="vit_nano_patch7_28", site="block_input", layer=1, stage=3,
                lr=0.1, pretrain_steps=5, steps=steps, batch=24)
    run = study.run_config(c, arch, {"label": "c", "type": "circulant", "alpha": 0.3}, seed=0)
    assert run.warmup_steps == warmup


def test_data_reads_the_configured_train_slice_and_test_examples_per_class(monkeypatch):
    from noisy_flax import evaluate
    calls = []
    monkeypatch.setattr(evaluate, "load_eval_data",
                        lambda config, **kwargs: calls.append(kwargs) or len(calls))
    data = study.Data(_tiny_config())  # train_examples 32, eval_per_class 2
    assert (data.train, data.train, data.eval) == (1, 1, 2)  # each loaded once
    assert calls == [{"split": "train[:32]"}, {"per_class": 2}]


def test_training_batches_are_whole_and_drop_the_remainder():
    """70 examples in batches of 16: four full batches an epoch, the six left
    over wait for the next permutation; 16 examples make one batch of 16."""
    from noisy_flax import evaluate
    data = evaluate.EvalData(np.zeros((70, 2, 2, 1)), np.arange(70) % 10, 10)
    stream = study.train_batches(data, 16, seed=0, flip=False)
    assert [len(next(stream)["label"]) for _ in range(9)] == [16] * 9
    small = evaluate.EvalData(np.zeros((16, 2, 2, 1)), np.arange(16) % 10, 10)
    assert len(next(study.train_batches(small, 16, seed=0, flip=False))["label"]) == 16


def test_evaluate_run_passes_the_study_settings_and_fits_a_shared_pass_once(monkeypatch):
    """Orders scored from one shared pass (noise off) have the same features:
    one entropy fit for all of them; an order with its own pass gets its own."""
    import ml_collections
    from noisy_flax import evaluate
    seen, fits = {}, []

    def setting(model, variables, data, noise_cfg, **kwargs):
        seen.update(kwargs)
        passes = {"class_sorted": "shared_pass", "single": "shared_pass", "shuffled": 1}
        return {o: {"metrics": {"top1": 0.5, "pass_": passes[o]}, "features": {"site": o}}
                for o in kwargs["orders"]}

    def estimates(feats, labels, num_classes, **kwargs):
        fits.append((feats["site"], kwargs))
        return {"fit": len(fits)}

    monkeypatch.setattr(evaluate, "evaluate_setting", setting)
    monkeypatch.setattr(evaluate, "entropy_estimates", estimates)
    s = ml_collections.ConfigDict(dict(orders=("class_sorted", "shuffled", "single"),
                                       eval_batch_size=7, order_seed=11, entropy=True,
                                       probe_steps=13))
    data = evaluate.EvalData(np.zeros((4, 2, 2, 1)), np.arange(4), 4)
    out = study.evaluate_run(None, None, data, None, True, s, None, {})
    assert (seen["batch_size"], seen["seed"], seen["with_features"]) == (7, 11, True)
    assert fits == [("class_sorted", {"probe_steps": 13}), ("shuffled", {"probe_steps": 13})]
    assert out["class_sorted"]["entropy"] is out["single"]["entropy"]
    s.entropy = False
    out = study.evaluate_run(None, None, data, None, True, s, None, {})
    assert seen["with_features"] is False and not any("entropy" in r for r in out.values())


def test_pending_work_counts_missing_trainings_and_evaluations(tmp_path):
    """Clean run trained with one of its two evaluations written; noisy run
    untrained; pre-training done: 1 training and 1 + 2 evaluations to do."""
    runs = study.plan(_tiny_config().study)
    clean, noisy = runs
    for path in ("train.json", "variables.msgpack", "eval/none_off.json"):
        (tmp_path / clean.path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / clean.path / path).write_text("{}")
    pending = study._pending(runs, str(tmp_path))
    assert pending == [(clean, False, (("optimal_q", "on"),)),
                       (noisy, True, (("optimal_q", "off"), ("optimal_q", "on")))]
    (tmp_path / "runs/vit/seed0/_pretrain").mkdir()
    (tmp_path / "runs/vit/seed0/_pretrain/train.json").write_text("{}")
    assert study._count_units(pending, str(tmp_path)) == {("train", "vit"): 1, ("eval", "vit"): 3}


def test_eta_weights_each_kind_by_its_own_mean_time():
    """Train 10 s, vit evaluations 2 s and 4 s (mean 3): 2 trainings and 3
    vit evaluations left, and 4 resnet evaluations that borrow the vit
    evaluation mean: 2 * 10 + 3 * 3 + 4 * 3 = 41 s."""
    progress = study.StudyProgress({("train", "vit"): 3, ("eval", "vit"): 5, ("eval", "resnet"): 4})
    for kind, seconds in (("train", 10.0), ("eval", 2.0), ("eval", 4.0)):
        progress.finished(kind, "vit", seconds, kind)
    assert progress.eta() == pytest.approx(41.0)


def test_a_global_noise_scope_checks_circulant_on_the_whole_test_batch():
    """Scope 'global' mixes all 8 rows of a test batch of 8, even on 8
    devices: alpha = 0.5 is singular there (one row per device would not be)."""
    from noisy_flax import sharding
    c = _tiny_config()
    c.unlock()
    c.noise.scope = "global"
    c.study.update({"eval_batch_size": 8, "noises": (
        {"label": "none", "type": "none"}, {"label": "c", "type": "circulant", "alpha": 0.5})})
    with pytest.raises(ValueError, match=r"alpha=0.5 with padded batches of k=8 rows"):
        study.check_study(c, sharding.create_mesh(c.mesh))
