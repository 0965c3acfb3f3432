"""The bad-input catalogue: each mistake ends in one line that names the
problem and the fix, exit status 2, no traceback, and a workdir exactly as
it was (every entry, size and mtime). Plus the security checks: nothing is
unpickled, torch only with weights_only=True, no network unless asked.

Cases run in this process through ``main.run`` (a process start costs
~15 s here); a few subprocesses check the real command lines.
"""
from __future__ import annotations

import json
import pathlib
import re
import shutil
import socket
import subprocess
import sys
import types

import jax
import numpy as np
import pytest
from flax import traverse_util

import tiny_run
from noisy_flax import checkpointing, main
from noisy_flax.models import create_model

ROOT = pathlib.Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------
# Fixtures and the one assertion every case makes
# ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    return tiny_run.data_dirs(tmp_path_factory.mktemp("data"))


@pytest.fixture
def workdir(tmp_path):
    """An existing workdir with something in it, so 'unchanged' means something."""
    path = tmp_path / "wd"
    path.mkdir()
    (path / "notes.txt").write_text("keep me")
    return path


def expect_refused(capsys, config, workdir, pattern: str) -> str:
    """main.run refuses: status 2, one 'error:' line matching, no traceback,
    the workdir untouched. Returns the line."""
    capsys.readouterr()
    before = tiny_run.snapshot(workdir)
    status = main.run(config, str(workdir))
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert status == main.EXIT_USER_ERROR, err
    assert len(lines) == 1, err
    assert re.search(pattern, lines[0]), lines[0]
    assert "Traceback" not in err
    assert tiny_run.snapshot(workdir) == before
    return lines[0]


def save_npz(path: pathlib.Path, arrays: dict) -> str:
    np.savez(path, **arrays)
    return str(path)


def vit_npz(path: pathlib.Path, num_classes: int, channels: int = 1) -> str:
    """A real (tiny) ViT checkpoint in the vit_jax .npz layout."""
    model = create_model("vit_nano_patch4_28", num_classes=num_classes, num_layers=1)
    images = np.zeros((1, 28, 28, channels), np.float32)
    variables = jax.eval_shape(lambda key: model.init(key, images, train=False), jax.random.key(0))
    flat = traverse_util.flatten_dict(variables["params"], sep="/")
    return save_npz(path, {k: np.zeros(v.shape, v.dtype) for k, v in flat.items()})


# ---------------------------------------------------------------------------
# Config mistakes caught by validate_config, before anything is written
# ---------------------------------------------------------------------------
CASES = {
    "unknown noise type": ({"noise.type": "optimall"},
                           r"unknown noise.type 'optimall' \(did you mean 'optimal_q'\?\)"),
    "unknown noise site": ({"noise.site": "attention"}, r"unknown noise.site 'attention'"),
    "noise layer out of range": ({"noise.layer": 4},
                                 r"noise layer 4 is out of range .* 1 layers; use -1..0"),
    "circulant alpha makes I+Q singular": ({"noise.type": "circulant", "noise.alpha": 0.5},
                                           r"alpha=0.5 .* makes I\+Q singular"),
    "circulant alpha=0.5 on padded evaluation batches of odd size": (
        {"noise.type": "circulant", "noise.alpha": 0.5, "noise.train": False, "eval_batch_size": 24},
        r"alpha=0.5 with padded batches of k=3 rows makes I\+Q singular"),
    "circulant alpha outside [0, 1)": ({"noise.type": "circulant", "noise.alpha": 1.5},
                                       r"alpha=1.5 is outside \[0, 1\)"),
    "within-image circulant alpha=0.5 on an even grid, on in evaluation only": (
        {"noise.type": "within_image", "noise.q": "circulant", "noise.alpha": 0.5,
         "noise.train": False, "image_size": 32, "input.train_crop": "resize"},
        r"within_image circulant alpha=0.5 with an even number of rows \(8, the grid"),
    "noise strength not a number": ({"noise.type": "gaussian", "noise.strength": float("nan")},
                                    r"noise.strength=nan is not a finite number"),
    "batch not divisible by devices": ({"batch_size": 12},
                                       r"batch_size=12 is not divisible by the 8 devices; use a multiple of 8"),
    "eval batch not divisible": ({"eval_batch_size": 20}, r"eval_batch_size=20 is not divisible"),
    "no gradient accumulation steps": ({"grad_accum_steps": 0},
                                       r"config.grad_accum_steps=0 must be >= 1"),
    # 16 rows on 8 devices in 4 micro-batches: half a row per device.
    "batch not divisible by devices x accumulation steps": (
        {"grad_accum_steps": 4},
        r"config.batch_size=16 must be divisible by devices x grad_accum_steps = 32"),
    # Each micro-batch is mixed on its own: 32 / 2 steps / 8 devices = 2 rows.
    "circulant alpha=0.5 on micro-batches of even size": (
        {"noise.type": "circulant", "noise.alpha": 0.5, "noise.scope": "device",
         "noise.eval": False, "batch_size": 32, "grad_accum_steps": 2},
        r"alpha=0.5 with an even batch k=2 makes I\+Q singular"),
    "eval batch and eval batch per device disagree": (
        {"eval_batch_size": 32, "eval_batch_per_device": 2},
        r"eval_batch_size=32 and config.eval_batch_per_device=2 \(16 on 8 devices\) disagree"),
    "zero batch size": ({"batch_size": 0}, r"batch_size=0 must be a positive integer"),
    "negative batch size": ({"batch_size": -16}, r"batch_size=-16 must be a positive integer"),
    "zero learning rate": ({"lr": 0.0}, r"config.lr=0.0 must be positive"),
    "negative learning rate": ({"lr": -0.1}, r"config.lr=-0.1 must be positive"),
    "image size not divisible by patch": ({"image_size": 30},
                                          r"image size 30x30 is not divisible by the patch size 4"),
    "unknown model": ({"model": "vit_nanoo_patch4_28"}, r"unknown model 'vit_nanoo_patch4_28'"),
    "unknown eval order": ({"eval_order": "sorted"},
                           r"unknown config.eval_order 'sorted'; use one of dataset, class_sorted"),
    "unknown CPU YNNPACK choice": ({"cpu_ynnpack": "all"},
                                   r"unknown config.cpu_ynnpack 'all'; use one of reductions, default"),
    "capped evaluation in a batch order": (
        {"eval_order": "shuffled", "eval_max_examples": 100, "runlocal": False},
        r"eval_max_examples=100 with eval_order='shuffled' would score the batches that fill "
        r"first in storage order, a biased subset; set config.eval_max_examples=0"),
    "distinct-class batch larger than the classes": (
        {"eval_order": "distinct_class", "eval_batch_size": 16},
        r"distinct_class' needs eval_batch_size <= num_classes \(10\), got 16"),
    "dataset unknown to tfds": ({"dataset": "fashion_mnistt"},
                                r"unknown tfds dataset 'fashion_mnistt'; did you mean .*fashion_mnist"),
    "num_classes differs from the dataset": ({"num_classes": 5},
                                             r"has 10 classes .*set --config.num_classes=10"),
    "no training length": ({"total_steps": 0, "num_epochs": 0.0},
                           r"set config.total_steps or config.num_epochs to a positive value"),
    "fine-tuning config without init_from": (
        {"init_required": True},
        r"this config fine-tunes pretrained weights but config.init_from is not set; pass "
        r"--config.init_from=.* or --config.init_required=False"),
    "init_from file missing": ({"init_from": "/nonexistent/ViT-B_16.npz"},
                               r"init_from=/nonexistent/ViT-B_16.npz does not exist"),
    "log_every zero": ({"log_every": 0}, r"config.log_every=0 must be >= 1"),
    "no checkpoint kept": ({"keep_checkpoints": 0}, r"config.keep_checkpoints=0 must be >= 1"),
    "checkpoint_every zero": ({"checkpoint_every": 0}, r"config.checkpoint_every=0 must be >= 1"),
    "negative eval_max_examples": ({"eval_max_examples": -1},
                                   r"config.eval_max_examples=-1 must be >= 0"),
    "negative weight decay": ({"weight_decay": -0.1}, r"config.weight_decay=-0.1 must be >= 0"),
    "negative gradient clipping norm": ({"grad_clip_norm": -1.0},
                                        r"config.grad_clip_norm=-1.0 must be >= 0"),
    "negative label smoothing": ({"label_smoothing": -0.1},
                                 r"config.label_smoothing=-0.1 must be >= 0"),
    "negative eval_every": ({"eval_every": -1}, r"config.eval_every=-1 must be >= 0"),
    "negative warm-up": ({"warmup_steps": -3}, r"config.warmup_steps=-3 must be >= 0"),
    "label smoothing of one or more": ({"label_smoothing": 1.5},
                                       r"config.label_smoothing=1.5 must be below 1"),
    # Smoothing 1 makes every target uniform: nothing left to learn.
    "label smoothing of exactly one": ({"label_smoothing": 1.0},
                                       r"config.label_smoothing=1.0 must be below 1"),
    "learning rate not a number": ({"lr": float("nan")}, r"config.lr=nan must be a finite number"),
    "unknown normalisation": ({"input.normalize": "foo"},
                              r"unknown config.input.normalize 'foo'; use one of"),
    "unknown train crop": ({"input.train_crop": "bogus"}, r"unknown config.input.train_crop 'bogus'"),
    "unknown eval resize": ({"input.eval_resize": "bogus"},
                            r"unknown config.input.eval_resize 'bogus'"),
    "two input channels": ({"input.channels": 2}, r"unknown config.input.channels 2"),
    "crop area outside (0, 1]": ({"input.crop_area": (0.5, 2.0)},
                                 r"config.input.crop_area=\(0.5, 2.0\) must be"),
    "empty shuffle buffer": ({"input.shuffle_buffer": 0},
                             r"config.input.shuffle_buffer=0 must be >= 1"),
    "length in steps and in epochs": (
        {"num_epochs": 2.0}, r"config.total_steps=2 and config.num_epochs=2.0 both give the "
                             r"training length; keep one and set the other to 0 "
                             r"\(e.g. --config.num_epochs=0\)"),
    "warm-up in steps and in epochs": (
        {"warmup_epochs": 0.5}, r"config.warmup_steps=1 and config.warmup_epochs=0.5 both give "
                                r"the warm-up"),
    "evaluation interval in steps and in epochs": (
        {"eval_every": 2, "eval_every_epochs": 1.0},
        r"config.eval_every=2 and config.eval_every_epochs=1.0 both give the evaluation interval"),
    "mesh axis of size 0": ({"mesh": (("data", 0),)},
                            r"config.mesh \[\('data', 0\)\]: an axis size must be >= 1"),
    "mesh axis named twice": ({"mesh": (("data", 8), ("data", 1))},
                              r"names an axis twice"),
    "negative final learning rate": ({"end_lr": -0.01}, r"config.end_lr=-0.01 must be >= 0"),
    "negative warm-up start rate": ({"warmup_init_lr": -1e-4},
                                    r"config.warmup_init_lr=-0.0001 must be >= 0"),
    "crop area with one value": ({"input.crop_area": (0.5,)},
                                 r"config.input.crop_area=\(0.5,\) must be a \(min, max\) pair"),
    "RandAugment with one value": ({"input.randaugment": (2,)},
                                   r"config.input.randaugment=\(2,\) must be a \(num_ops, "
                                   r"magnitude\) pair"),
    "image size 0": ({"image_size": 0, "input.train_crop": "resize"},
                     r"config.image_size=0 must be >= 1"),
    "negative prefetch": ({"input.prefetch": -5}, r"config.input.prefetch=-5 must be >= 0"),
    "first moment decay of 2": ({"b1": 2.0}, r"config.b1=2.0 must be in \[0, 1\)"),
    "negative second moment decay": ({"b2": -1.0}, r"config.b2=-1.0 must be in \[0, 1\)"),
    # A decay of exactly 1 never forgets; a dropout rate of 1 drops everything.
    "first moment decay of exactly 1": ({"b1": 1.0}, r"config.b1=1.0 must be in \[0, 1\)"),
    "dropout rate of 1": ({"model_kwargs.dropout_rate": 1.0},
                          r"config.model_kwargs.dropout_rate=1.0 must be in \[0, 1\)"),
    "negative epsilon": ({"eps": -1.0}, r"config.eps=-1.0 must be >= 0"),
    "negative momentum": ({"optimizer": "sgd", "momentum": -3.0},
                          r"config.momentum=-3.0 must be >= 0"),
    "drop-path rate above 1": ({"model_kwargs.drop_path_rate": 1.5},
                               r"config.model_kwargs.drop_path_rate=1.5 must be in \[0, 1\)"),
    "infinite epochs": ({"num_epochs": float("inf"), "total_steps": 0},
                        r"config.num_epochs=inf must be >= 0"),
    "seed beyond 64 bits": ({"seed": 99999999999999999999}, r"config.seed=\d+ must be in \[0, 2\*\*63 - 1\)"),
    # numpy's batch orders refuse it after training; the eval key overflows at seed + 1.
    "negative seed": ({"seed": -1}, r"config.seed=-1 must be in \[0, 2\*\*63 - 1\)"),
    "seed at the 64-bit limit": ({"seed": 2 ** 63 - 1}, r"must be in \[0, 2\*\*63 - 1\)"),
    # --config.mesh=abc arrives as ('a', 'b', 'c')
    "mesh not in pairs": ({"mesh": ("a", "b", "c")},
                          r"config.mesh=\['a', 'b', 'c'\] must be \(name, size\) pairs"),
    "not a regular expression in init_dont_load": (
        {"init_dont_load": ("[",)}, r"config.init_dont_load has '\[', not a regular expression"),
    "stored images of another size without a crop": (
        {"input.train_crop": "none", "image_size": 56},
        r"train_crop='none' needs fashion_mnist images of 56x56, but they are \(28, 28\)"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_config_mistake_is_one_line_and_touches_nothing(case, dirs, workdir, capsys):
    overrides, pattern = CASES[case]
    expect_refused(capsys, tiny_run.tiny_config(*dirs, **overrides), workdir, pattern)


def test_a_distinct_class_batch_of_every_class_once_is_accepted(dirs):
    """eval_batch_size == num_classes is the largest batch the order can build
    (each class once, as batch_order shows); only a larger one is refused."""
    from noisy_flax import batch_order, validation
    config = tiny_run.tiny_config(*dirs, eval_order="distinct_class", eval_batch_size=10)
    validation.check_choices(config)
    labels = np.repeat(np.arange(10), 3)
    for batch in batch_order.batch_indices(labels, "distinct_class", 10, num_classes=10):
        assert sorted(labels[batch]) == list(range(10))


@pytest.mark.parametrize("name", ["checkpoints", "best"])
def test_a_file_where_checkpoints_go_is_refused_before_anything_is_written(
        dirs, trained, tmp_path, capsys, name):
    workdir = copy_of(trained, tmp_path)
    shutil.rmtree(workdir / name, ignore_errors=True)
    (workdir / name).write_text("x")
    expect_refused(capsys, tiny_run.tiny_config(*dirs), workdir,
                   rf"{name} is a file, where the run keeps its {name} checkpoints; move it away")


def test_a_study_config_is_refused_by_the_training_entry_point(tmp_path, capsys):
    from configs import study_fashion_mnist
    config = study_fashion_mnist.get_config("runlocal")
    expect_refused(capsys, config, tmp_path / "wd",
                   r"this is a study config \(it has config.study\); run it with python -m "
                   r"noisy_flax.study")
    assert not (tmp_path / "wd").exists()


def test_a_key_error_from_training_is_one_line(workdir, capsys, monkeypatch):
    """A KeyError (a missing split or feature) is a user error like a ValueError."""
    from configs import common
    from noisy_flax import train

    def missing_split(config, workdir):
        raise KeyError("no split 'tset' in fashion_mnist")
    monkeypatch.setattr(train, "train_and_evaluate", missing_split)
    line = expect_refused(capsys, common.base_config(), workdir, r"^error: no split")
    assert line == "error: no split 'tset' in fashion_mnist"


def test_a_refused_run_does_not_create_its_workdir(dirs, tmp_path, capsys):
    config = tiny_run.tiny_config(*dirs, **{"noise.type": "optimall"})
    expect_refused(capsys, config, tmp_path / "new" / "wd", r"unknown noise.type")
    assert not (tmp_path / "new").exists()


def test_data_dir_that_does_not_exist(dirs, workdir, capsys):
    config = tiny_run.tiny_config("/nonexistent/tfds", dirs[1])
    expect_refused(capsys, config, workdir,
                   r"data_dir /nonexistent/tfds \(from config.data_dir\) does not exist")


def test_dataset_not_prepared_and_downloads_off(dirs, workdir, tmp_path, capsys):
    empty = tmp_path / "empty_tfds"
    empty.mkdir()
    config = tiny_run.tiny_config(str(empty), dirs[1], dataset="mnist")
    expect_refused(capsys, config, workdir,
                   r"dataset 'mnist' is not prepared in .*tfds build mnist.*config.download=True")


def test_manual_dataset_not_prepared_says_how_to_build_it(dirs, workdir, tmp_path, capsys):
    empty = tmp_path / "empty_tfds"
    empty.mkdir()
    config = tiny_run.tiny_config(str(empty), dirs[1], dataset="imagenet2012")
    line = expect_refused(capsys, config, workdir,
                          r"dataset 'imagenet2012' is not prepared in .*tfds build imagenet2012 "
                          r"--manual_dir DIR")
    assert "download=True" not in line  # tfds cannot download ImageNet


# ---------------------------------------------------------------------------
# Pretrained weights
# ---------------------------------------------------------------------------
def test_pretrained_file_for_another_architecture(dirs, workdir, tmp_path, capsys):
    resnet = save_npz(tmp_path / "resnet.npz", {"conv1.weight": np.zeros((8, 3, 3, 3), np.float32),
                                                "layer1.0.bn1.weight": np.zeros(8, np.float32)})
    config = tiny_run.tiny_config(*dirs, init_from=resnet)
    expect_refused(capsys, config, workdir, r"this checkpoint is a ResNet .* the model is a ViT")


def test_wrong_number_of_classes_without_a_head_reset(dirs, workdir, tmp_path, capsys):
    config = tiny_run.tiny_config(*dirs, init_from=vit_npz(tmp_path / "vit5.npz", 5))
    expect_refused(capsys, config, workdir,
                   r"head for 5 classes but config.num_classes=10; .*init_dont_load")


def test_rgb_weights_for_grayscale_input(dirs, workdir, tmp_path, capsys):
    config = tiny_run.tiny_config(*dirs, init_from=vit_npz(tmp_path / "rgb.npz", 10, channels=3))
    expect_refused(capsys, config, workdir, r"the checkpoint does not fit the VisionTransformer: "
                   r"0 missing, 0 unexpected, 1 mis-shaped")


def test_pickled_npz_is_rejected(dirs, workdir, tmp_path, capsys):
    pickled = tmp_path / "pickled.npz"
    np.savez(pickled, **{"Transformer/posembed_input/pos_embedding": np.array([{"x": 1}], object)})
    config = tiny_run.tiny_config(*dirs, init_from=str(pickled))
    expect_refused(capsys, config, workdir, r"pickled Python object, and pickles are never loaded")


def test_truncated_npz_is_named_as_damaged(dirs, workdir, tmp_path, capsys):
    whole = pathlib.Path(vit_npz(tmp_path / "whole.npz", num_classes=10))
    cut = tmp_path / "cut.npz"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])  # a broken download
    config = tiny_run.tiny_config(*dirs, init_from=str(cut))
    expect_refused(capsys, config, workdir, r"cut.npz is a damaged zip archive .* fetch the file again")


def test_torch_files_are_only_read_with_weights_only():
    """Every torch.load in the package passes weights_only=True."""
    calls = []
    for path in (ROOT / "noisy_flax").rglob("*.py"):
        calls += [(path.name, call) for call in re.findall(r"torch\.load\([^)]*\)", path.read_text())]
    assert calls, "expected the pretrained loader to call torch.load"
    assert all("weights_only=True" in call for _, call in calls), calls


# ---------------------------------------------------------------------------
# The workdir
# ---------------------------------------------------------------------------
def test_workdir_that_is_a_file(dirs, tmp_path, capsys):
    path = tmp_path / "a_file"
    path.write_text("x")
    expect_refused(capsys, tiny_run.tiny_config(*dirs), path, r"--workdir .*a_file is a file")


def test_workdir_inside_a_file(dirs, tmp_path, capsys):
    path = tmp_path / "a_file"
    path.write_text("x")
    expect_refused(capsys, tiny_run.tiny_config(*dirs), path / "wd",
                   r"--workdir .*a_file/wd cannot be created: .*a_file is a file")


@pytest.mark.parametrize("denied", ["write", "search"])
def test_workdir_without_write_permission(dirs, workdir, capsys, monkeypatch, denied):
    """Tests run as root, which ignores permissions: os.access is patched to
    say what it would say for another user on a read-only directory, or on
    one without the search (x) bit, in which no file can be created either."""
    real_access = main.os.access
    bit = main.os.W_OK if denied == "write" else main.os.X_OK
    monkeypatch.setattr("os.access", lambda path, mode, **kw: False
                        if str(path) == str(workdir) and mode & bit
                        else real_access(path, mode, **kw))
    expect_refused(capsys, tiny_run.tiny_config(*dirs), workdir,
                   r"--workdir .* is not writable; choose a writable directory")


def test_a_relative_workdir_without_write_permission_is_not_called_uncreatable(
        dirs, workdir, capsys, monkeypatch):
    """It exists: the message must not say it cannot be created."""
    real_access = main.os.access
    monkeypatch.setattr("os.access", lambda path, mode, **kw: False if str(path) == str(workdir)
                        else real_access(path, mode, **kw))
    monkeypatch.chdir(workdir.parent)
    expect_refused(capsys, tiny_run.tiny_config(*dirs), pathlib.Path(workdir.name),
                   r"--workdir wd is not writable; choose a writable directory")


# ---------------------------------------------------------------------------
# Workdirs with a run in them (one real tiny run, no network allowed)
# ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained(dirs, tmp_path_factory):
    """A two-step run; every socket connection attempt is recorded and refused."""
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args[1:] or kwargs)
        raise OSError("network access during a test run")

    patch = pytest.MonkeyPatch()
    patch.setattr(socket.socket, "connect", refuse)
    patch.setattr(socket.socket, "connect_ex", refuse)
    patch.setattr(socket, "create_connection", refuse)
    patch.setattr(socket, "getaddrinfo", refuse)
    workdir = tmp_path_factory.mktemp("trained") / "wd"
    try:
        assert main.run(tiny_run.tiny_config(*dirs), str(workdir)) == 0
    finally:
        patch.undo()
    return workdir, attempts


def test_training_opens_no_network_connection(trained):
    workdir, attempts = trained
    assert (workdir / "checkpoints" / "2").is_dir()
    assert attempts == []


def copy_of(trained, tmp_path) -> pathlib.Path:
    target = tmp_path / "copy"
    shutil.copytree(trained[0], target)
    return target


def test_rerunning_a_finished_run_keeps_its_summary(dirs, trained, tmp_path, capsys):
    workdir = copy_of(trained, tmp_path)
    before = (workdir / "summary.json").read_text()
    assert "eval_top1" in json.loads(before)
    assert main.run(tiny_run.tiny_config(*dirs), str(workdir)) == 0
    assert (workdir / "summary.json").read_text() == before
    assert "Already trained to step 2" in capsys.readouterr().out


def test_a_corrupt_summary_or_a_cut_metrics_line_does_not_stop_a_rerun(dirs, trained, tmp_path,
                                                                       capsys):
    """A crash can cut the last line of metrics.jsonl, or leave summary.json
    unreadable: the rerun drops the cut line and evaluates again."""
    workdir = copy_of(trained, tmp_path)
    good = json.loads((workdir / "summary.json").read_text())
    (workdir / "summary.json").write_text('{"model": "vit')
    metrics = workdir / "metrics.jsonl"
    lines = metrics.read_text().splitlines(keepends=True)
    metrics.write_text("".join(lines) + '{"step": 2, "spl')
    assert main.run(tiny_run.tiny_config(*dirs), str(workdir)) == 0
    again = json.loads((workdir / "summary.json").read_text())
    assert again["eval_top1"] == pytest.approx(good["eval_top1"])
    # The training the rerun did not do keeps its logged loss and is not
    # timed as 0 images/s.
    assert again["final_train_loss"] == pytest.approx(good["final_train_loss"])
    assert "images_per_second" not in again and "train_seconds" not in again
    records = [json.loads(line) for line in metrics.read_text().splitlines()]  # cut line gone
    assert records == [json.loads(line) for line in lines]  # the step-2 evaluation once
    assert "is not JSON; evaluating the last checkpoint again" in capsys.readouterr().out


def test_a_summary_of_fewer_steps_does_not_pass_for_the_end_of_the_run(dirs, trained, tmp_path,
                                                                       capsys):
    """A stopped run writes the summary of the steps it reached; when the
    final evaluation of the resumed run is then killed, a rerun must
    evaluate the last step, not keep the stopped run's summary."""
    workdir = copy_of(trained, tmp_path)
    good = json.loads((workdir / "summary.json").read_text())
    (workdir / "summary.json").write_text(json.dumps({**good, "steps": 1, "eval_top1": 0.0}))
    capsys.readouterr()
    assert main.run(tiny_run.tiny_config(*dirs), str(workdir)) == 0
    assert "Already trained" not in capsys.readouterr().out
    again = json.loads((workdir / "summary.json").read_text())
    assert again["steps"] == 2
    assert again["eval_top1"] == pytest.approx(good["eval_top1"])


def test_a_damaged_metrics_line_before_the_last_is_one_line(dirs, trained, tmp_path, capsys):
    workdir = copy_of(trained, tmp_path)
    metrics = workdir / "metrics.jsonl"
    lines = metrics.read_text().splitlines(keepends=True)
    metrics.write_text("not json\n" + "".join(lines))
    (workdir / "summary.json").unlink()
    capsys.readouterr()
    assert main.run(tiny_run.tiny_config(*dirs), str(workdir)) == main.EXIT_USER_ERROR
    assert "metrics.jsonl line 1 is not JSON; repair or delete that line" in capsys.readouterr().err


def test_a_checkpoint_meta_without_format_version_is_taken_as_damaged(dirs, trained, tmp_path):
    from noisy_flax import evaluate, sharding
    workdir = copy_of(trained, tmp_path)
    checkpoints = workdir / "checkpoints"
    shutil.copytree(checkpoints / "2", checkpoints / "3")
    (checkpoints / "3" / "meta" / "metadata").write_text(json.dumps({"step": 3}))
    config = tiny_run.tiny_config(*dirs)
    _, _, step = evaluate.restore_variables(config, str(workdir), sharding.create_mesh(config.mesh))
    assert step == 2


def test_checkpoint_from_a_newer_format(dirs, trained, tmp_path, capsys):
    workdir = copy_of(trained, tmp_path)
    meta = workdir / "checkpoints" / "2" / "meta" / "metadata"
    meta.write_text(json.dumps({"format_version": checkpointing.FORMAT_VERSION + 1, "step": 2}))
    expect_refused(capsys, tiny_run.tiny_config(*dirs), workdir,
                   r"has format version 2, this noisy_flax reads up to 1; upgrade noisy_flax")


def test_resuming_with_a_changed_config_is_refused(dirs, trained, tmp_path, capsys):
    workdir = copy_of(trained, tmp_path)
    config = tiny_run.tiny_config(*dirs, batch_size=32, **{"noise.type": "gaussian"})
    expect_refused(capsys, config, workdir, r"holds a run with another config \(batch_size: 16 -> "
                   r"32; noise.type: \"optimal_q\" -> \"gaussian\"\).*allow_config_change=True")


def test_another_model_is_refused_even_when_config_changes_are_allowed(dirs, trained, tmp_path,
                                                                      capsys):
    """allow_config_change continues a run; it cannot put another model's
    state into it, and must not take the checkpoint for a damaged one."""
    workdir = copy_of(trained, tmp_path)
    config = tiny_run.tiny_config(*dirs, allow_config_change=True)
    config.model_kwargs.num_layers = 2
    expect_refused(capsys, config, workdir,
                   r"checkpoint .*checkpoints/2 holds the training state of another model, "
                   r"optimizer or input \(\d+ names or shapes differ, e.g. params/Transformer/"
                   r"encoderblock_1/.*: not in the checkpoint.*\); run with the config that wrote it")


def test_evaluate_leaves_a_save_in_progress_and_a_damaged_step_in_place(dirs, trained, tmp_path):
    """evaluate reads a run that training may still be writing: an unfinished
    save is skipped, not moved; so is a damaged step (the older one is read)."""
    from noisy_flax import evaluate, sharding
    workdir = copy_of(trained, tmp_path)
    checkpoints = workdir / "checkpoints"
    (checkpoints / f"4{checkpointing.TMP_SUFFIX}-123").mkdir()
    shutil.copytree(checkpoints / "2", checkpoints / "3")
    (checkpoints / "3" / "meta" / "metadata").write_text("{not json")
    before = tiny_run.snapshot(workdir)
    config = tiny_run.tiny_config(*dirs)
    _, _, step = evaluate.restore_variables(config, str(workdir), sharding.create_mesh(config.mesh))
    assert step == 2
    assert tiny_run.snapshot(workdir) == before


@pytest.mark.parametrize("kwargs, message", [
    ({"orders": ["shufled"]}, r"unknown batch order 'shufled' \(did you mean 'shuffled'\?\)"),
    ({"batch_size": 0}, r"--batch_size=0 must be >= 1"),
    ({"per_class": -1}, r"per_class=-1 and max_examples=0 must be >= 0")])
def test_evaluate_checks_its_options_before_reading_a_checkpoint(dirs, tmp_path, kwargs, message):
    """Checked first: the workdir has no checkpoint, which would be the error otherwise."""
    from noisy_flax import evaluate
    options = {"orders": ["shuffled"], "batch_size": 10, **kwargs}
    with pytest.raises(ValueError, match=message):
        evaluate.run(tiny_run.tiny_config(*dirs), str(tmp_path / "absent"), **options)
    assert not (tmp_path / "absent").exists()


@pytest.mark.parametrize("case", ["another model", "no run"])
def test_evaluate_moves_and_creates_nothing(dirs, trained, tmp_path, case):
    from noisy_flax import evaluate, sharding
    config = tiny_run.tiny_config(*dirs)
    if case == "another model":
        workdir = copy_of(trained, tmp_path)
        config.model_kwargs.num_layers = 2
        message = r"holds the training state of another model"
    else:
        workdir = tmp_path / "absent"
        message = r"no checkpoint in .*absent/checkpoints; train first"
    before = tiny_run.snapshot(workdir)
    with pytest.raises(checkpointing.CheckpointError, match=message):
        evaluate.restore_variables(config, str(workdir), sharding.create_mesh(config.mesh))
    assert tiny_run.snapshot(workdir) == before
    assert not (tmp_path / "absent").exists()


def test_diverging_loss_stops_and_keeps_the_last_good_checkpoint(dirs, tmp_path, capsys):
    """Step 1 trains at lr 0 (warm-up from 0), step 2 at 1e30: the update
    overflows, the run stops before saving it, step 1 stays."""
    config = tiny_run.tiny_config(*dirs, lr=1e30, warmup_steps=1, warmup_init_lr=0.0,
                                  checkpoint_every=1, log_every=1)
    workdir = tmp_path / "wd"
    assert main.run(config, str(workdir)) == main.EXIT_USER_ERROR
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err
    assert re.search(r"training diverged at step 2 .*param_norm inf.*last good checkpoint "
                     r"\(step 1\) is kept\. Lower config.lr", lines[0]), lines[0]
    steps = sorted(p.name for p in (workdir / "checkpoints").iterdir())
    assert steps == ["1"]
    import orbax.checkpoint as ocp
    manager = ocp.CheckpointManager(workdir / "checkpoints")
    state = manager.restore(1, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
    manager.close()
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state["params"]))


# ---------------------------------------------------------------------------
# Command-line parsing: absl's flag state cannot be reset reliably in one
# process, so these run the real entry point (~10 s each).
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("config_arg, extra, expected", [
    ("runlocal", ["--config.lrr=1"],
     "error: unknown config key --config.lrr; did you mean --config.lr? every key must exist "
     "in the config file (check the spelling)"),
    ("runlocal", ["--config.noise.typo=x"],
     "error: unknown config key --config.noise.typo; did you mean --config.noise.type? every "
     "key must exist in the config file (check the spelling)"),
    ("runlocal", ["--config.lr=abc"],
     "error: flag --config.lr=abc: could not convert string to float: 'abc'; fix the value "
     "(see --helpfull)"),
    ("batch=abc", [], "error: config argument batch='abc' does not parse as int; write e.g. "
                      "batch=128"),
    ("runlocal", ["--config.nosie.type=gaussian"],
     "error: unknown config key --config.nosie.type; did you mean --config.noise.type? every "
     "key must exist in the config file (check the spelling)"),
    ("epochs=1", ["--config.runlocal=True"],
     "error: --config.runlocal does not shrink a run; give it as the config's argument instead, "
     "e.g. --config configs/fashion_mnist.py:runlocal"),
    ("runlocal", ["stray"],
     "error: unexpected arguments: stray; every option is a flag such as --workdir=DIR or "
     "--config.lr=1e-3 (see --helpfull)"),
    # A typo in a flag that is not a config key: absl's own words, not a config key.
    ("runlocal", ["--wrkdir=x"],
     "error: Unknown command line flag 'wrkdir'. Did you mean: workdir ?; fix the value "
     "(see --helpfull)"),
], ids=["typo", "nested typo", "bad flag value", "key=value argument", "parent typo",
        "runlocal as a key", "stray argument", "flag typo"])
def test_command_line_mistakes_print_one_line_and_exit_2(tmp_path, config_arg, extra, expected):
    result = subprocess.run(
        [sys.executable, "-m", "noisy_flax.main", "--config",
         f"configs/fashion_mnist.py:{config_arg}", "--workdir", str(tmp_path / "wd"), *extra],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == main.EXIT_USER_ERROR, result.stderr[-2000:]
    assert [line for line in result.stderr.splitlines() if line.startswith("error:")] == [expected]
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "wd").exists()


@pytest.mark.parametrize("module, args, expected", [
    ("noisy_flax.main", ["--config", "configs/nope.py"],
     "error: --config could not be loaded ([Errno 2] No such file or directory: "
     "'configs/nope.py'); give a config file such as configs/default.py, with optional "
     ":arguments"),
    ("noisy_flax.evaluate", ["--config", "configs/fashion_mnist.py:runlocal",
                             "--config.nosie.type=gaussian"],
     "error: unknown config key --config.nosie.type; did you mean --config.noise.type? every "
     "key must exist in the config file (check the spelling)"),
    ("noisy_flax.study", ["--config", "configs/study_fashion_mnist.py:runlocl"],
     "error: unknown config argument 'runlocl' (did you mean 'runlocal'?); this config takes"),
    ("noisy_flax.evaluate", ["--config", "configs/fashion_mnist.py:runlocal", "--per_class=-1"],
     "error: flag --per_class=-1: "),
    ("noisy_flax.main", ["--config", "configs/common.py"],
     "error: --config names a file without get_config() (a helper module?); give an experiment "
     "config such as configs/default.py"),
    ("noisy_flax.main", ["--config", "configs/transfer.py:model=vit_small"],
     "error: model='vit_small' must end in its resolution, e.g. vit_small_patch16_224"),
    # Run from another directory: the config's own repository provides `configs`.
    ("noisy_flax.main", ["--config", str(ROOT / "configs" / "fashion_mnist.py:runlocal"),
                         "--config.lrr=1"],
     "error: unknown config key --config.lrr; did you mean --config.lr?"),
], ids=["main, missing config file", "evaluate, parent typo", "study, bad argument",
        "evaluate, negative per_class", "main, a helper module", "main, transfer without a size",
        "main, from another directory"])
def test_other_entry_points_report_one_line(tmp_path, module, args, expected):
    elsewhere = any(arg.startswith(str(ROOT)) for arg in args)
    result = subprocess.run([sys.executable, "-m", module, *args, "--workdir", str(tmp_path / "wd")],
                            cwd=tmp_path if elsewhere else ROOT, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == main.EXIT_USER_ERROR, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(expected), result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "wd").exists()


@pytest.mark.parametrize("argv", [
    ["main", "--config={repo}/configs/x.py:runlocal", "--workdir", "w"],
    ["main", "--workdir", "w", "--config", "{repo}/configs/x.py:init_from=/data/ckpt"],
], ids=["--config=FILE", "an argument with a path"])
def test_the_config_files_repository_comes_first_on_sys_path(tmp_path, monkeypatch, argv):
    """`from configs import common` must find the config's own repository
    before any `configs` package in the working directory."""
    from noisy_flax import cli
    repo, cwd = tmp_path / "repo", tmp_path / "elsewhere"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    monkeypatch.setattr(sys, "path", ["/lib", str(repo)])
    cli.add_config_roots([a.format(repo=repo) for a in argv])
    assert sys.path == [str(repo), str(cwd), "/lib"]


def test_a_trailing_config_flag_without_a_file_adds_only_the_working_directory(
        tmp_path, monkeypatch):
    from noisy_flax import cli
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", ["/lib"])
    cli.add_config_roots(["main", "--workdir", "w", "--config"])  # absl reports the flag
    assert sys.path == [str(tmp_path), "/lib"]


def test_a_config_outside_a_configs_folder_adds_only_the_working_directory(
        tmp_path, monkeypatch):
    # Its folder's parent holds no `configs` package to import from.
    from noisy_flax import cli
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    monkeypatch.setattr(sys, "path", ["/lib"])
    cli.add_config_roots(["main", f"--config={tmp_path}/experiments/mine.py:runlocal"])
    assert sys.path == [str(cwd), "/lib"]


def test_an_error_is_reported_by_its_first_line():
    from noisy_flax import cli
    assert cli.first_line(KeyError("tset")) == "tset"  # not repr's quotes
    assert cli.first_line(KeyError("no split 'tset'")) == "no split 'tset'"  # but its own
    assert cli.first_line(ValueError("bad value \n  at line 3")) == \
        "bad value (details: --verbosity=1)"
    assert cli.first_line(ValueError(" bad value ")) == "bad value"
    assert cli.first_line(FileNotFoundError()) == "FileNotFoundError"  # no message at all


def test_an_unknown_nested_key_suggests_the_closest_key_under_its_parent():
    from ml_collections import ConfigDict
    from noisy_flax import cli
    holder = types.SimpleNamespace(value=ConfigDict({"lr": 1.0, "noise": {"type": "none"}}))
    assert "did you mean --config.noise.type?" in cli.unknown_key_message(holder, "noise.typ")
    assert "did you mean --config.lr?" in cli.unknown_key_message(holder, "lrr")


@pytest.mark.parametrize("args, expected", [
    (["--num_classes", "0"], "error: --num_classes=0 must be >= 1"),
    (["--num_classes", "-5"], "error: --num_classes=-5 must be >= 1"),
    (["--image_size", "0"], "error: --image_size=0 must be >= 1"),
    (["--dont_load", "["], "error: --dont_load '[' is not a regular expression"),
])
def test_convert_refuses_impossible_options_in_one_line(tmp_path, capsys, args, expected):
    from noisy_flax import pretrained
    status = pretrained.main(["convert", vit_npz(tmp_path / "a.npz", 10), str(tmp_path / "out"),
                              "--model", "vit_nano_patch4_28", *args])
    err = capsys.readouterr().err
    assert status == main.EXIT_USER_ERROR and err.startswith(expected), err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_convert_with_an_unknown_model_is_one_line(tmp_path, capsys):
    from noisy_flax import pretrained
    status = pretrained.main(["convert", vit_npz(tmp_path / "a.npz", 10), str(tmp_path / "out"),
                              "--model", "vit_tny"])
    err = capsys.readouterr().err
    assert status == main.EXIT_USER_ERROR
    assert err.startswith("error: ") and "vit_tny" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()
