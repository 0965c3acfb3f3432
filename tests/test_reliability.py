"""Crash safety: SIGKILL at random moments and SIGTERM resume bitwise like
an uninterrupted run; damaged checkpoints are named, set aside and skipped;
a workdir refuses a changed config. CPU only, fake Fashion-MNIST."""
from __future__ import annotations

import asyncio
import gc
import json
import logging
import os
import pathlib
import queue
import random
import re
import signal
import subprocess
import sys
import threading
import time
import types

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

import tiny_run
from noisy_flax import checkpointing, train, workdir as workdir_lib

TESTS = pathlib.Path(__file__).resolve().parent
# The five SIGKILL trials moved the run 22-26 steps in all (a 'time' trial up
# to 10), the SIGTERM 2 more: room to spare, so the SIGTERM never meets the end.
TOTAL_STEPS = 48
PROCESS_TIMEOUT = 240  # seconds; a start costs ~15 s of imports here
# Five SIGKILLs ('save': while an asynchronous checkpoint is being written;
# 'time': at a random moment), then a SIGTERM, then a run to the end. Each
# SIGKILL trial first waits for one new finished checkpoint, so the runs move
# on; the SIGTERM comes at the first step after its resume.
TRIALS = ("save", "time", "save", "time", "time", "sigterm")


# ---------------------------------------------------------------------------
# The worker process
# ---------------------------------------------------------------------------
class Worker:
    """tests/crash_worker.py in a child process, its stdout read line by line."""

    def __init__(self, workdir, data_dir, idx_dir):
        self.process = subprocess.Popen(
            [sys.executable, str(TESTS / "crash_worker.py"), str(workdir), data_dir, idx_dir,
             str(TOTAL_STEPS)],
            cwd=TESTS, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: queue.Queue = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.process.stdout:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def wait_for(self, predicate) -> str:
        """The first line that satisfies ``predicate``; fails on exit or timeout."""
        deadline = time.monotonic() + PROCESS_TIMEOUT
        while True:
            line = self.lines.get(timeout=max(deadline - time.monotonic(), 0.1))
            if line is None:
                pytest.fail("worker ended early:\n" + "\n".join(self.seen[-30:]))
            self.seen.append(line)
            if predicate(line):
                return line

    def wait_until(self, condition) -> None:
        """Polls ``condition()`` (e.g. a file appeared) while reading the output."""
        deadline = time.monotonic() + PROCESS_TIMEOUT
        while not condition():
            try:
                line = self.lines.get(timeout=0.005)
            except queue.Empty:
                line = ""
            if line is None:
                pytest.fail("worker ended early:\n" + "\n".join(self.seen[-30:]))
            if line:
                self.seen.append(line)
            if time.monotonic() > deadline:
                pytest.fail("worker made no progress:\n" + "\n".join(self.seen[-30:]))

    def finish(self) -> int:
        code = self.process.wait(timeout=PROCESS_TIMEOUT)
        while (line := self.lines.get(timeout=10)) is not None:
            self.seen.append(line)
        return code

    def kill(self, sig=signal.SIGKILL) -> None:
        os.kill(self.process.pid, sig)


def _is_step_line(line: str) -> bool:
    return line.startswith("step ") and "/" in line


def _step_of(line: str) -> int:
    return int(line.split()[1].split("/")[0])


def train_reference(workdir: pathlib.Path, data_dir: str, idx_dir: str) -> None:
    """The uninterrupted run, in this process: it has the workers' 8 CPU
    devices already, and compiles like them (see crash_worker.py)."""
    previous = jax.config.values["jax_disable_most_optimizations"]
    jax.config.update("jax_disable_most_optimizations", True)
    try:
        train.train_and_evaluate(tiny_run.crash_config(data_dir, idx_dir, TOTAL_STEPS),
                                 str(workdir))
    finally:
        jax.config.update("jax_disable_most_optimizations", previous)


# ---------------------------------------------------------------------------
# Reading checkpoints back
# ---------------------------------------------------------------------------
def restore_state(checkpoint_dir: pathlib.Path, step: int):
    manager = ocp.CheckpointManager(checkpoint_dir)
    try:
        restored = manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(), meta=ocp.args.JsonRestore()))
    finally:
        manager.close()
    return restored["state"], restored["meta"]


def finished_steps(checkpoint_dir: pathlib.Path) -> list[int]:
    if not checkpoint_dir.is_dir():
        return []
    return sorted(int(p.name) for p in checkpoint_dir.iterdir() if p.name.isdigit())


def writes_in_flight(checkpoint_dir: pathlib.Path) -> list[pathlib.Path]:
    """orbax's temporary directories: a save that has started, not finished."""
    if not checkpoint_dir.is_dir():
        return []
    return list(checkpoint_dir.glob(f"*{checkpointing.TMP_SUFFIX}"))


def assert_bitwise_equal(left, right) -> None:
    left_leaves, left_tree = jax.tree.flatten_with_path(left)
    right_leaves, right_tree = jax.tree.flatten_with_path(right)
    assert [p for p, _ in left_leaves] == [p for p, _ in right_leaves]
    for (path, a), (_, b) in zip(left_leaves, right_leaves):
        a, b = np.asarray(a), np.asarray(b)
        assert a.dtype == b.dtype and a.shape == b.shape, jax.tree_util.keystr(path)
        assert a.tobytes() == b.tobytes(), f"{jax.tree_util.keystr(path)} differs"


# ---------------------------------------------------------------------------
# Crash trials
# ---------------------------------------------------------------------------
def test_sigkill_and_sigterm_resume_bitwise_like_an_uninterrupted_run(tmp_path):
    data_dir, idx_dir = tiny_run.data_dirs(tmp_path)
    workdir = tmp_path / "crashed"
    checkpoints = workdir / "checkpoints"
    rng = random.Random(int(os.environ.get("CRASH_SEED", "8")))
    log = []
    cut_saves = 0
    for trial in TRIALS:
        worker = Worker(workdir, data_dir, idx_dir)
        start = (finished_steps(checkpoints) or [0])[-1]
        assert start < TOTAL_STEPS - 4, log  # room left for this trial and the SIGTERM's
        if trial == "sigterm":
            # At the first step after the resume: a stop that waited for a new
            # checkpoint could land on the last step, leaving nothing to resume.
            worker.wait_for(lambda line: _is_step_line(line) and _step_of(line) > start)
        else:
            worker.wait_until(lambda: (finished_steps(checkpoints) or [0])[-1] > start)
        if trial == "save":
            worker.wait_until(lambda: bool(writes_in_flight(checkpoints)))
            time.sleep(rng.uniform(0, 0.01))
            worker.kill()
        elif trial == "time":
            time.sleep(rng.uniform(0.0, 1.0))
            worker.kill()
        else:
            worker.kill(signal.SIGTERM)
        code = worker.finish()
        if trial == "sigterm":
            stop = [l for l in worker.seen if l.startswith("Stop requested")]
            assert code == 0, "\n".join(worker.seen[-20:])
            assert stop, "\n".join(worker.seen[-20:])
            saved_at = int(stop[0].split("step ")[1].split(";")[0])
            assert finished_steps(checkpoints)[-1] == saved_at < TOTAL_STEPS
        else:
            assert code == -signal.SIGKILL
            cut_saves += bool(writes_in_flight(checkpoints))
        log.append((trial, start, finished_steps(checkpoints)))

    last = Worker(workdir, data_dir, idx_dir)
    assert last.finish() == 0, "\n".join(last.seen[-30:])
    assert "DONE" in last.seen
    resumed = [l for l in last.seen if l.startswith("Resumed from")]
    assert resumed and resumed[0].endswith(f"/{saved_at}"), resumed
    train_reference(tmp_path / "reference", data_dir, idx_dir)

    # Same final state, bit for bit: params, optimizer state, PRNG, step.
    final, meta = restore_state(checkpoints, TOTAL_STEPS)
    expected, _ = restore_state(tmp_path / "reference" / "checkpoints", TOTAL_STEPS)
    assert int(final["step"]) == TOTAL_STEPS and meta["format_version"] == 1
    assert_bitwise_equal(final, expected)

    # Every checkpoint left behind restores; what was set aside are only
    # interrupted writes, never a finished checkpoint.
    for step in finished_steps(checkpoints):
        restore_state(checkpoints, step)
    set_aside = list((workdir / "checkpoints.damaged").glob("*")) \
        if (workdir / "checkpoints.damaged").exists() else []
    assert all(checkpointing.TMP_SUFFIX in p.name for p in set_aside), set_aside
    assert cut_saves >= 1  # at least one kill really cut a write
    print(f"trials (kind, resumed at, steps on disk): {log}; "
          f"saves cut mid-write: {cut_saves}; set aside: {[p.name for p in set_aside]}")


# ---------------------------------------------------------------------------
# Damaged checkpoints
# ---------------------------------------------------------------------------
ABSTRACT = {"a": jax.ShapeDtypeStruct((1000,), jnp.float32),
            "b": jax.ShapeDtypeStruct((3,), jnp.float32)}


def write_three_steps(directory: pathlib.Path) -> None:
    saver = checkpointing.Checkpointer(str(directory), keep=5, save_every=1)
    for step in (1, 2, 3):
        saver.save(step, {"a": jnp.arange(1000.0) * step, "b": jnp.ones(3) * step})
    saver.close()


def _files(path: pathlib.Path, part: str) -> list[pathlib.Path]:
    return sorted(p for p in path.rglob("*") if p.is_file() and part in str(p.relative_to(path)))


def truncate_array_file(step_dir):
    victim = max(_files(step_dir, "/d/"), key=lambda p: p.stat().st_size)
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])


def delete_array_file(step_dir):
    _files(step_dir, "/d/")[0].unlink()


def delete_commit_marker(step_dir):
    (step_dir / checkpointing.COMMIT_MARKER).unlink()


def truncate_manifest(step_dir):
    for manifest in _files(step_dir, "manifest.ocdbt"):
        manifest.write_bytes(manifest.read_bytes()[:10])


def flip_one_byte(step_dir):
    """Bit rot: the file keeps its size and still decompresses, to other values."""
    victim = max(_files(step_dir, "/d/"), key=lambda p: p.stat().st_size)
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0x10
    victim.write_bytes(bytes(data))


def delete_item_commit_marker(step_dir):
    (step_dir / "state" / checkpointing.COMMIT_MARKER).unlink()


def interrupted_write(step_dir):
    """What a kill mid-save leaves: the step only under its temporary name."""
    step_dir.rename(step_dir.parent / f"{step_dir.name}{checkpointing.TMP_SUFFIX}")


def interrupted_timestamped_write(step_dir):
    """The temporary name with the timestamp other orbax versions append."""
    step_dir.rename(step_dir.parent / f"{step_dir.name}{checkpointing.TMP_SUFFIX}-1700000000")


@pytest.mark.parametrize("damage", [truncate_array_file, delete_array_file, flip_one_byte,
                                    delete_commit_marker, delete_item_commit_marker,
                                    truncate_manifest, interrupted_write,
                                    interrupted_timestamped_write])
def test_damaged_latest_checkpoint_is_named_set_aside_and_skipped(tmp_path, caplog, damage):
    directory = tmp_path / "checkpoints"
    write_three_steps(directory)
    damage(directory / "3")
    damaged = [p for p in directory.iterdir() if p.name.startswith("3")][0]
    files_before = sorted(p.relative_to(damaged) for p in damaged.rglob("*"))

    checkpointer = checkpointing.Checkpointer(str(directory), keep=5, save_every=1)
    with caplog.at_level(logging.WARNING):
        step, state = checkpointer.restore_latest(ABSTRACT)
    assert step == 2 and float(state["a"][1]) == 2.0  # the newest intact one
    warning = " ".join(r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)
    assert str(damaged) in warning and "moved to" in warning
    # Kept for inspection, whole: never deleted.
    kept = list((tmp_path / "checkpoints.damaged").iterdir())
    assert len(kept) == 1 and kept[0].name.startswith(damaged.name)
    assert sorted(p.relative_to(kept[0]) for p in kept[0].rglob("*")) == files_before
    # Training can save step 3 again, and that one restores.
    checkpointer.save(3, {"a": jnp.arange(1000.0) * 3, "b": jnp.ones(3) * 3}, force=True)
    checkpointer.close()
    again = checkpointing.Checkpointer(str(directory), keep=5, save_every=1)
    assert again.restore_latest(ABSTRACT)[0] == 3
    again.close()


@pytest.mark.parametrize("damage", [truncate_array_file, delete_commit_marker,
                                    interrupted_timestamped_write])
def test_a_read_only_restore_skips_damage_and_moves_nothing(tmp_path, damage):
    """Tools that read a run another process may be writing leave it as it is."""
    directory = tmp_path / "checkpoints"
    write_three_steps(directory)
    damage(directory / "3")
    before = tiny_run.snapshot(tmp_path)
    checkpointer = checkpointing.Checkpointer(str(directory), keep=5, save_every=1)
    try:
        step, state = checkpointer.restore_latest(ABSTRACT, read_only=True)
    finally:
        checkpointer.close()
    assert step == 2 and float(state["a"][1]) == 2.0
    assert tiny_run.snapshot(tmp_path) == before


def test_damage_set_aside_within_one_second_keeps_every_copy(tmp_path, monkeypatch):
    monkeypatch.setattr(checkpointing.time, "strftime", lambda *args: "20250101-000000")
    step_dir = tmp_path / "checkpoints" / "3"
    targets = []
    for copy in range(3):
        step_dir.mkdir(parents=True)
        (step_dir / "data").write_text(str(copy))
        targets.append(checkpointing.set_aside(checkpointing.epath.Path(step_dir)))
    assert not step_dir.exists()
    kept = sorted((tmp_path / "checkpoints.damaged").iterdir())
    assert len(kept) == 3 and len(set(targets)) == 3
    assert sorted(p.joinpath("data").read_text() for p in kept) == ["0", "1", "2"]


def test_only_finished_steps_count_as_checkpoints(tmp_path):
    directory = tmp_path / "checkpoints"
    assert not checkpointing.has_checkpoints(str(directory))
    directory.mkdir()
    (directory / f"4{checkpointing.TMP_SUFFIX}").mkdir()
    (directory / "notes.txt").write_text("x")
    assert not checkpointing.has_checkpoints(str(directory))
    (directory / "4").mkdir()
    assert checkpointing.has_checkpoints(str(directory))


def test_only_every_save_every_th_step_is_saved_unless_forced(tmp_path):
    saver = checkpointing.Checkpointer(str(tmp_path / "checkpoints"), keep=5, save_every=3,
                                       async_save=False)
    try:
        saved = [saver.save(step, {"a": jnp.ones(2) * step}) for step in range(1, 8)]
        saved.append(saver.save(8, {"a": jnp.ones(2) * 8}, force=True))
        assert saved == [False, False, True, False, False, True, False, True]
        assert saver.all_steps() == [3, 6, 8]
    finally:
        saver.close()


def test_a_checkpoint_of_other_names_or_shapes_is_refused_and_left_in_place(tmp_path):
    """Another model's healthy checkpoint is not damage: refused, never set aside."""
    directory = tmp_path / "checkpoints"
    write_three_steps(directory)
    before = tiny_run.snapshot(tmp_path)
    other = {"a": jax.ShapeDtypeStruct((999,), jnp.float32),
             "c": jax.ShapeDtypeStruct((3,), jnp.float32)}
    checkpointer = checkpointing.Checkpointer(str(directory), keep=5, save_every=1)
    try:
        with pytest.raises(checkpointing.CheckpointError, match="another model") as error:
            checkpointer.restore_latest(other)
    finally:
        checkpointer.close()
    assert not isinstance(error.value, checkpointing.DamagedCheckpointError)
    assert "3 names or shapes differ" in str(error.value)
    assert tiny_run.snapshot(tmp_path) == before


def test_state_differences_name_every_missing_extra_and_reshaped_leaf():
    saved = {"a": np.zeros((2, 3)), "b": np.zeros(4), "n": {"w": np.zeros(1)}}
    wanted = {"a": jax.ShapeDtypeStruct((3, 2), jnp.float32), "n": {"w": np.zeros(1)},
              "c": jax.ShapeDtypeStruct((5,), jnp.float32)}
    assert checkpointing.state_differences(saved, wanted) == [
        "c: not in the checkpoint", "b: only in the checkpoint",
        "a: checkpoint (2, 3), now (3, 2)"]
    assert checkpointing.state_differences(saved, saved) == []


def test_a_damaged_read_leaves_no_exception_ignored_trace(tmp_path, monkeypatch):
    """orbax's abandoned shard reads raise again when closed, or when
    TensorStore finishes them after orbax closed its event loop; Python
    printed each as "Exception ignored in ..." with its tracebacks, after
    the one-line report of the damage."""
    directory = tmp_path / "checkpoints"
    write_three_steps(directory)
    for step in ("2", "3"):  # four failed reads: whether one abandons another is a race
        truncate_array_file(directory / step)
    unraisable = []
    monkeypatch.setattr(sys, "unraisablehook", unraisable.append)
    checkpointer = checkpointing.Checkpointer(str(directory), keep=5, save_every=1)
    assert checkpointer.restore_latest(ABSTRACT)[0] == 1
    checkpointer.close()
    time.sleep(0.5)  # abandoned reads finish, and are collected, after the restore
    gc.collect()
    assert [u.exc_value for u in unraisable] == []


class _Pending:
    def __await__(self):
        yield


async def _raises_again_when_closed():
    """Suspended, then closed, it raises as orbax's reads do: another module's."""
    try:
        await _Pending()
    except BaseException as error:
        raise Exception("abandoned") from error


def test_only_orbaxs_abandoned_reads_are_dropped(monkeypatch):
    unraisable = []
    monkeypatch.setattr(sys, "unraisablehook", unraisable.append)
    checkpointing._drop_noise_of_abandoned_reads()
    checkpointing._drop_noise_of_abandoned_reads()  # once: not a hook around a hook
    assert sys.unraisablehook.__closure__[0].cell_contents == unraisable.append
    coroutine = _raises_again_when_closed()
    coroutine.send(None)
    del coroutine
    loop = asyncio.new_event_loop()
    loop.close()
    try:
        loop.call_soon_threadsafe(print)
    except RuntimeError as error:
        closed_loop = error
    try:
        raise RuntimeError("other")
    except RuntimeError as error:
        other = error

    def report(error, traceback):
        sys.unraisablehook(types.SimpleNamespace(
            exc_type=type(error), exc_value=error, exc_traceback=traceback, err_msg=None,
            object=None))

    # Dropped: a closed loop woken from outside Python, as TensorStore's thread does
    # (the traceback starts in asyncio). Kept: the same raised from Python code, and others.
    report(closed_loop, closed_loop.__traceback__.tb_next)
    report(closed_loop, closed_loop.__traceback__)
    report(other, other.__traceback__)
    kept = [str(u.exc_value) for u in unraisable]
    assert kept == ["abandoned", "Event loop is closed", "other"]


def test_a_read_that_fails_once_is_tried_again_and_sets_nothing_aside(tmp_path, monkeypatch,
                                                                      caplog):
    """A reset connection is not damage: the newest checkpoint must be used,
    not moved aside for an older one."""
    directory = tmp_path / "checkpoints"
    write_three_steps(directory)
    real_restore = ocp.StandardCheckpointHandler.restore
    failures = []

    def flaky_restore(self, *args, **kwargs):
        if not failures:
            failures.append(1)
            raise OSError("Connection reset by peer")
        return real_restore(self, *args, **kwargs)

    monkeypatch.setattr(ocp.StandardCheckpointHandler, "restore", flaky_restore)
    checkpointer = checkpointing.Checkpointer(str(directory), keep=5, save_every=1)
    with caplog.at_level(logging.WARNING):
        step, state = checkpointer.restore_latest(ABSTRACT)
    checkpointer.close()
    assert failures == [1]
    assert step == 3 and float(state["a"][1]) == 3.0
    assert "trying once more" in caplog.text
    assert not (tmp_path / "checkpoints.damaged").exists()


def test_a_damaged_best_checkpoint_is_set_aside_and_a_new_best_kept(tmp_path, caplog):
    """Its score is read on every resume; a damaged one stopped every rerun."""
    import types
    workdir = tmp_path / "run"
    state = types.SimpleNamespace(params={"w": jnp.ones(3)}, batch_stats={})
    train._save_best(str(workdir), 2, state, 0.9)
    assert train._best_top1_so_far(str(workdir)) == 0.9
    meta = workdir / "best" / "2" / "meta" / "metadata"
    meta.write_text(meta.read_text()[:20])
    with caplog.at_level(logging.WARNING):
        assert train._best_top1_so_far(str(workdir)) == -1.0
    assert "its score cannot be read" in caplog.text and "moved to" in caplog.text
    assert finished_steps(workdir / "best") == []
    assert len(list((workdir / "best.damaged").iterdir())) == 1
    train._save_best(str(workdir), 3, state, 0.5)
    assert train._best_top1_so_far(str(workdir)) == 0.5


def test_a_flipped_byte_is_named_by_the_array_it_changed(tmp_path):
    directory = tmp_path / "checkpoints"
    write_three_steps(directory)
    flip_one_byte(directory / "3")
    checkpointer = checkpointing.Checkpointer(str(directory), keep=5, save_every=1)
    try:
        with pytest.raises(checkpointing.DamagedCheckpointError,
                           match=r"checkpoints/3 is damaged: the values of a differ from the "
                                 r"checksums saved with them"):
            checkpointer.restore(3, ABSTRACT)
        assert float(checkpointer.restore(2, ABSTRACT)["a"][7]) == 14.0
    finally:
        checkpointer.close()


def test_a_checkpoint_saved_without_checksums_still_restores(tmp_path):
    """Checkpoints written before checksums were recorded carry none."""
    directory = tmp_path / "checkpoints"
    write_three_steps(directory)
    meta_file = directory / "3" / "meta" / "metadata"
    meta = json.loads(meta_file.read_text())
    assert set(meta["checksums"]) == {"a", "b"}
    del meta["checksums"]
    meta_file.write_text(json.dumps(meta))
    checkpointer = checkpointing.Checkpointer(str(directory), keep=5, save_every=1)
    try:
        step, state = checkpointer.restore_latest(ABSTRACT)
    finally:
        checkpointer.close()
    assert step == 3 and np.array_equal(state["a"], np.arange(1000.0) * 3)


def test_a_checkpoint_from_a_newer_format_is_refused_not_skipped(tmp_path):
    directory = tmp_path / "checkpoints"
    write_three_steps(directory)
    meta = directory / "3" / "meta" / "metadata"
    meta.write_text(json.dumps({"format_version": checkpointing.FORMAT_VERSION + 1, "step": 3}))
    before = tiny_run.snapshot(tmp_path)
    checkpointer = checkpointing.Checkpointer(str(directory), keep=5, save_every=1)
    with pytest.raises(checkpointing.CheckpointError, match="format version 2.*upgrade"):
        checkpointer.restore_latest(ABSTRACT)
    checkpointer.close()
    assert tiny_run.snapshot(tmp_path) == before


# ---------------------------------------------------------------------------
# A workdir keeps its config
# ---------------------------------------------------------------------------
def saved_workdir(tmp_path, config) -> pathlib.Path:
    workdir = tmp_path / "run"
    workdir.mkdir()
    workdir_lib.write_config(str(workdir), config)
    return workdir


def test_a_changed_config_is_refused_listing_the_keys(tmp_path):
    config = tiny_run.tiny_config("/data", "/idx")
    workdir = saved_workdir(tmp_path, config)
    before = tiny_run.snapshot(workdir)
    changed = tiny_run.tiny_config("/data", "/idx", batch_size=32, model="resnet18_small",
                                   **{"noise.type": "gaussian"})
    with pytest.raises(ValueError) as error:
        workdir_lib.check_config_unchanged(str(workdir), changed)
    message = str(error.value)
    assert "\n" not in message
    for expected in ("batch_size: 16 -> 32", 'model: "vit_nano_patch4_28" -> "resnet18_small"',
                     'noise.type: "optimal_q" -> "gaussian"', "allow_config_change=True"):
        assert expected in message
    assert tiny_run.snapshot(workdir) == before


# Written out here, not imported: what may change on a resume is a decision
# that a change to workdir.HARMLESS_KEYS must repeat.
MAY_CHANGE_ON_RESUME = {
    "data_dir", "download", "input.local_dir", "input.prefetch", "input.cache", "eval_every",
    "eval_every_epochs", "eval_max_examples", "eval_batch_size", "eval_batch_per_device",
    "eval_split", "eval_order", "log_every", "checkpoint_every", "keep_checkpoints",
    "async_checkpoints", "save_best", "plot", "init_from", "init_dont_load", "init_required",
    "mesh", "sharding", "remat", "cpu_ynnpack", "runlocal", "allow_config_change"}


def _leaves(config, prefix=""):
    for key, value in config.items():
        if hasattr(value, "items"):
            yield from _leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def _other_value(value):
    if isinstance(value, bool):
        return not value
    if isinstance(value, (int, float)):
        return value + 1
    if isinstance(value, str):
        return value + "x"
    if isinstance(value, tuple) and value and all(isinstance(v, (int, float)) for v in value):
        return tuple(v + 1 for v in value)
    return None  # None placeholders and nested tuples: not perturbed here


def test_every_key_but_the_listed_ones_refuses_a_resume_when_changed(tmp_path):
    config = tiny_run.tiny_config("/data", "/idx")
    workdir = saved_workdir(tmp_path, config)
    checked = 0
    for key, value in _leaves(config):
        new = _other_value(value)
        if new is None:
            continue
        changed = tiny_run.tiny_config("/data", "/idx")
        tiny_run.set_dotted(changed, key, new)
        if key in MAY_CHANGE_ON_RESUME:
            workdir_lib.check_config_unchanged(str(workdir), changed)
        else:
            with pytest.raises(ValueError, match=rf"another config \({re.escape(key)}: "):
                workdir_lib.check_config_unchanged(str(workdir), changed)
            checked += 1
    assert checked > 40  # the perturbation reached most keys


def test_harmless_changes_and_the_override_are_accepted(tmp_path):
    config = tiny_run.tiny_config("/data", "/idx")
    workdir = saved_workdir(tmp_path, config)
    harmless = tiny_run.tiny_config("/elsewhere", "/idx2", log_every=7, eval_every=3,
                                    checkpoint_every=9, keep_checkpoints=1,
                                    async_checkpoints=not config.async_checkpoints)
    workdir_lib.check_config_unchanged(str(workdir), harmless)
    overridden = tiny_run.tiny_config("/data", "/idx", batch_size=64, allow_config_change=True)
    workdir_lib.check_config_unchanged(str(workdir), overridden)
    # A config without the override key does not override.
    without = type(config)({k: v for k, v in config.items() if k != "allow_config_change"})
    without.batch_size = 64
    with pytest.raises(ValueError, match=r"batch_size: 16 -> 64"):
        workdir_lib.check_config_unchanged(str(workdir), without)


def test_every_key_of_the_config_is_compared(tmp_path):
    """A key this module has never heard of counts as one that matters."""
    saved = {"model": "a", "new_knob": 1, "noise": {"type": "x", "alpha": 0.4}}
    new = {"model": "a", "noise": {"type": "x", "alpha": 0.3}, "log_every": 5}
    assert workdir_lib.config_differences(saved, new) == [
        "new_knob: 1 -> (absent)", "noise.alpha: 0.4 -> 0.3"]
    # A harmless key holding a mapping: its nested keys are harmless too.
    assert workdir_lib.config_differences({"input": {"cache": {"dir": "a"}}},
                                          {"input": {"cache": {"dir": "b"}}}) == []
    # Only the listed names: "plot" is harmless, "plotting" is not.
    assert workdir_lib.config_differences({"plotting": 1}, {"plotting": 2}) == ["plotting: 1 -> 2"]


def test_a_run_saved_before_a_key_existed_resumes_while_the_key_keeps_the_old_behaviour(tmp_path):
    config = tiny_run.tiny_config("/data", "/idx")
    saved = workdir_lib.config_as_json(config)
    del saved["warmup_prefix"]  # as config.json was written before the key existed
    workdir = tmp_path / "run"
    workdir.mkdir()
    (workdir / workdir_lib.CONFIG_FILE).write_text(json.dumps(saved))
    workdir_lib.check_config_unchanged(str(workdir), config)  # True: the old behaviour
    changed = tiny_run.tiny_config("/data", "/idx", warmup_prefix=False)
    with pytest.raises(ValueError, match=r"warmup_prefix: \(absent\) -> false"):
        workdir_lib.check_config_unchanged(str(workdir), changed)
    # A run saved with the key at the other value does not resume with the old one.
    saved["warmup_prefix"] = False
    (workdir / workdir_lib.CONFIG_FILE).write_text(json.dumps(saved))
    with pytest.raises(ValueError, match=r"warmup_prefix: false -> true"):
        workdir_lib.check_config_unchanged(str(workdir), config)


def test_an_unreadable_saved_config_is_one_message_not_a_traceback(tmp_path):
    workdir = tmp_path / "run"
    workdir.mkdir()
    (workdir / workdir_lib.CONFIG_FILE).write_text('{"model": "vit')  # cut by a crash
    with pytest.raises(ValueError, match=r"config.json cannot be read .*allow_config_change=True"):
        workdir_lib.check_config_unchanged(str(workdir), tiny_run.tiny_config("/data", "/idx"))


def test_each_added_key_at_its_listed_value_does_what_its_absence_does():
    """ADDED_KEYS must name the behaviour of configs without the key: here the
    schedule a config without ``warmup_prefix`` gets, value by value."""
    from noisy_flax import optim
    assert set(workdir_lib.ADDED_KEYS) == {"warmup_prefix"}, "add a check for the new key"
    steps = np.arange(0, 40)

    def schedule_values(**overrides):
        config = tiny_run.tiny_config("/data", "/idx", warmup_steps=5, **overrides)
        if "warmup_prefix" not in overrides:
            config = type(config)({k: v for k, v in config.items() if k != "warmup_prefix"})
        assert ("warmup_prefix" in config) == ("warmup_prefix" in overrides)
        _, schedule = optim.make_optimizer(config, total_steps=40, warmup_steps=5)
        return np.asarray([schedule(int(s)) for s in steps])

    absent = schedule_values()
    listed = schedule_values(warmup_prefix=workdir_lib.ADDED_KEYS["warmup_prefix"])
    other = schedule_values(warmup_prefix=not workdir_lib.ADDED_KEYS["warmup_prefix"])
    np.testing.assert_array_equal(listed, absent)
    assert np.abs(other - absent).max() > 1e-5  # the key matters, so the check can fail


def run_with_scripted_scores(tmp_path, monkeypatch, first_run: dict, second_run: dict,
                             crash_at: int, total_steps: int = 4,
                             checkpoint_every: int = 2) -> list[int]:
    """Trains ``total_steps`` (an evaluation every step) with the top-1 of
    each evaluation scripted, crashing at the evaluation of step
    ``crash_at``, then resumes; returns the steps _save_best was asked for."""
    data_dir, idx_dir = tiny_run.data_dirs(tmp_path)
    scores = dict(first_run)
    real_evaluate, real_save_best = train.evaluate, train._save_best
    saved_at = []

    def scripted_evaluate(eval_step, state, *args, **kwargs):
        step = int(state.step)
        if step == crash_at and scores is first_run_scores:
            raise KeyboardInterrupt(f"a crash at step {step}")
        return {**real_evaluate(eval_step, state, *args, **kwargs), "top1": scores[step]}

    def recording_save_best(workdir, step, state, top1):
        saved_at.append(step)
        real_save_best(workdir, step, state, top1)

    first_run_scores = scores
    monkeypatch.setattr(train, "evaluate", scripted_evaluate)
    monkeypatch.setattr(train, "_save_best", recording_save_best)
    config = lambda: tiny_run.tiny_config(data_dir, idx_dir, total_steps=total_steps,
                                          eval_every=1, checkpoint_every=checkpoint_every,
                                          save_best=True, log_every=1, async_checkpoints=False)
    workdir = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        train.train_and_evaluate(config(), str(workdir))
    scores = dict(second_run)
    train.train_and_evaluate(config(), str(workdir))
    return saved_at


def test_the_best_checkpoint_is_only_replaced_by_a_better_one_across_a_resume(tmp_path,
                                                                               monkeypatch):
    """save_best keeps one checkpoint; after a crash and a resume the first
    evaluation must be compared with the kept score, not start from scratch."""
    scores = {1: 0.9, 2: 0.8, 3: 0.3, 4: 0.95}
    saved_at = run_with_scripted_scores(tmp_path, monkeypatch, scores, scores, crash_at=3)
    assert saved_at == [1, 4]  # 0.3 at step 3 lost to the kept 0.9; 0.95 at step 4 won
    assert finished_steps(tmp_path / "run" / "best") == [4]
    # Step 3 ran twice (before the crash and after the resume from step 2):
    # metrics.jsonl keeps one record of it.
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    for split in ("train", "eval"):
        assert [r["step"] for r in records if r["split"] == split] == [1, 2, 3, 4]


def test_a_tied_score_never_replaces_the_best_checkpoint(tmp_path, monkeypatch):
    """Only a strictly higher top-1 replaces the kept best: a tie keeps the
    earlier step, within a run (step 2) and against the score kept across a
    resume (step 4)."""
    scores = {1: 0.9, 2: 0.9, 3: 0.5, 4: 0.9}
    saved_at = run_with_scripted_scores(tmp_path, monkeypatch, scores, scores, crash_at=3)
    assert saved_at == [1]
    assert finished_steps(tmp_path / "run" / "best") == [1]


def test_a_rerun_final_evaluation_that_ties_the_best_keeps_the_earlier_step(tmp_path,
                                                                            monkeypatch):
    """The last step's evaluation crashed; its rerun scores 0.9, as step 3
    did: a tie, so the kept best stays step 3's."""
    saved_at = run_with_scripted_scores(tmp_path, monkeypatch, {1: 0.1, 2: 0.2, 3: 0.9},
                                        {4: 0.9}, crash_at=4, checkpoint_every=10)
    assert saved_at == [1, 2, 3]
    assert finished_steps(tmp_path / "run" / "best") == [3]


def test_a_best_step_kept_before_a_crash_is_not_saved_again(tmp_path, monkeypatch):
    """A crash after step 3's best save and before any checkpoint: the
    resumed run replays step 3; saving best/3 again would fail in orbax on
    every restart."""
    saved_at = run_with_scripted_scores(tmp_path, monkeypatch, {1: 0.5, 2: 0.6, 3: 0.9},
                                        {1: 0.1, 2: 0.2, 3: 0.95, 4: 0.2, 5: 0.1}, crash_at=4,
                                        total_steps=5, checkpoint_every=5)
    assert saved_at == [1, 2, 3, 3]
    assert finished_steps(tmp_path / "run" / "best") == [3]


def test_a_failed_final_evaluation_keeps_the_last_steps_and_reruns_alone(tmp_path, monkeypatch):
    """The last step is saved before its evaluation: when that evaluation
    fails (out of memory, say), rerunning the command evaluates the saved
    step without training any step again."""
    saved_at = run_with_scripted_scores(tmp_path, monkeypatch, {1: 0.1, 2: 0.2, 3: 0.3},
                                        {4: 0.7}, crash_at=4, checkpoint_every=10)
    run = tmp_path / "run"
    assert finished_steps(run / "checkpoints") == [4]
    assert saved_at == [1, 2, 3, 4]  # step 4 evaluated once, on the rerun
    records = [json.loads(line) for line in (run / "metrics.jsonl").open()]
    assert [r["step"] for r in records if r["split"] == "train"] == [1, 2, 3, 4]
    assert [r["step"] for r in records if r["split"] == "eval"] == [1, 2, 3, 4]
    assert json.loads((run / "summary.json").read_text())["eval_top1"] == 0.7


def _four_steps_saved_only_by_a_stop(tmp_path):
    """A config maker: 4 steps, each evaluated; checkpoints are due only
    every 10 steps, so any checkpoint on disk is a stop's."""
    data_dir, idx_dir = tiny_run.data_dirs(tmp_path)
    return lambda: tiny_run.tiny_config(data_dir, idx_dir, total_steps=4,
                                        checkpoint_every=10, eval_every=1,
                                        async_checkpoints=False)


@pytest.mark.parametrize("stop_at", [3, 4])
def test_a_stop_during_an_evaluation_saves_that_step_and_owes_the_evaluation(
        tmp_path, monkeypatch, capsys, stop_at):
    """SIGTERM while step 3 (or the last step, 4) is being evaluated: the
    evaluation is abandoned at its next batch, step 3 is saved at once
    (checkpoints are due only every 10 steps), no summary is written, and
    the rerun resumes there and evaluates the end."""
    config = _four_steps_saved_only_by_a_stop(tmp_path)
    real_evaluate = train.evaluate

    def sigterm_at(eval_step, state, *args, **kwargs):
        if int(state.step) == stop_at:
            os.kill(os.getpid(), signal.SIGTERM)  # the trainer's handler only sets a flag
        return real_evaluate(eval_step, state, *args, **kwargs)

    monkeypatch.setattr(train, "evaluate", sigterm_at)
    workdir = tmp_path / "run"
    train.train_and_evaluate(config(), str(workdir))
    out = capsys.readouterr().out
    assert f"Stop requested during its evaluation: checkpoint saved at step {stop_at}" in out
    assert finished_steps(workdir / "checkpoints") == [stop_at]
    assert not (workdir / "summary.json").exists()
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").open()]
    assert [r["step"] for r in records if r["split"] == "eval"] == list(range(1, stop_at))
    monkeypatch.setattr(train, "evaluate", real_evaluate)
    summary = train.train_and_evaluate(config(), str(workdir))
    assert summary["steps"] == 4 and "eval_top1" in summary
    assert json.loads((workdir / "summary.json").read_text())["eval_top1"] == summary["eval_top1"]


def test_a_stop_during_a_train_step_saves_that_step_and_leaves_unevaluated(
        tmp_path, monkeypatch, capsys):
    """SIGTERM while step 2 trains (checkpoints due every 10 steps, an
    evaluation every step): step 2 is saved at once and the run leaves
    without evaluating it; the rerun resumes there and finishes."""
    config = _four_steps_saved_only_by_a_stop(tmp_path)
    real_jit_train_step = train.jit_train_step

    def sigterm_at_step_2(*args, **kwargs):
        step_fn = real_jit_train_step(*args, **kwargs)

        def step(state, batch):
            if int(state.step) == 1:  # the call that trains step 2
                os.kill(os.getpid(), signal.SIGTERM)  # the trainer's handler only sets a flag
            return step_fn(state, batch)
        return step

    monkeypatch.setattr(train, "jit_train_step", sigterm_at_step_2)
    workdir = tmp_path / "run"
    assert train.train_and_evaluate(config(), str(workdir))["steps"] == 2
    assert "Stop requested: checkpoint saved at step 2" in capsys.readouterr().out
    assert finished_steps(workdir / "checkpoints") == [2]
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").open()]
    assert [r["step"] for r in records if r["split"] == "eval"] == [1]
    monkeypatch.setattr(train, "jit_train_step", real_jit_train_step)
    assert train.train_and_evaluate(config(), str(workdir))["steps"] == 4


def test_a_resume_that_would_regroup_device_scoped_noise_is_refused(tmp_path, monkeypatch):
    """Optimal-Q with scope='device' mixes each device's share of the batch:
    16 examples over 8 devices are groups of 2, over 4 devices groups of 4.
    The mesh is not part of the config comparison, so the checkpoint
    records the devices it was trained on."""
    data_dir, idx_dir = tiny_run.data_dirs(tmp_path)
    config = lambda **kw: tiny_run.tiny_config(  # noqa: E731
        data_dir, idx_dir, total_steps=4, checkpoint_every=2, eval_every=1,
        async_checkpoints=False, **kw)
    real_evaluate = train.evaluate

    def crash_at_step_3(eval_step, state, *args, **kwargs):
        if int(state.step) == 3:
            raise KeyboardInterrupt("a crash at step 3")
        return real_evaluate(eval_step, state, *args, **kwargs)

    monkeypatch.setattr(train, "evaluate", crash_at_step_3)
    workdir = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        train.train_and_evaluate(config(), str(workdir))
    monkeypatch.setattr(train, "evaluate", real_evaluate)
    meta_file = workdir / "checkpoints" / "2" / "meta" / "metadata"
    meta = json.loads(meta_file.read_text())
    assert meta["batch_devices"] == jax.device_count() == 8
    meta_file.write_text(json.dumps({**meta, "batch_devices": 4}))  # as if trained on 4
    with pytest.raises(ValueError, match=r"this run trained with optimal_q noise over each "
                       r"device's 4 examples \(4 devices\), and would now use 2 \(8 devices\); "
                       r"resume on 4 devices, or pass --config.allow_config_change=True"):
        train.train_and_evaluate(config(), str(workdir))
    summary = train.train_and_evaluate(config(allow_config_change=True), str(workdir))
    assert summary["steps"] == 4


def test_a_finished_run_reruns_on_other_devices_as_nothing_is_left_to_train(tmp_path):
    """The device-scoped grouping matters for training steps only: a run
    saved at its last step (as if on 4 devices) reruns on 8 and keeps its
    summary."""
    data_dir, idx_dir = tiny_run.data_dirs(tmp_path)
    config = lambda: tiny_run.tiny_config(data_dir, idx_dir,  # noqa: E731
                                          async_checkpoints=False)
    workdir = tmp_path / "run"
    first = train.train_and_evaluate(config(), str(workdir))
    meta_file = workdir / "checkpoints" / str(first["steps"]) / "meta" / "metadata"
    meta = json.loads(meta_file.read_text())
    assert meta["batch_devices"] == 8
    meta_file.write_text(json.dumps({**meta, "batch_devices": 4}))
    assert train.train_and_evaluate(config(), str(workdir)) == first


def test_a_resume_keeps_the_records_up_to_its_step_and_owes_a_rerun_evaluation(tmp_path):
    """A resume from step 2 drops the records of steps 3 on (they run again)
    and the last line a crash cut short; re-evaluating step 2 drops its eval
    record too. The last train record kept is step 2's."""
    from noisy_flax import reporting
    records = [{"step": s, "split": split, "loss": float(s)}
               for s in (1, 2, 3) for split in ("train", "eval")]
    (tmp_path / "metrics.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in records) + '{"step": 4, "spl')
    reporter = reporting.MetricsReporter(str(tmp_path), start_step=2, reevaluating=True)
    reporter.close()
    kept = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["split"]) for r in kept] == [(1, "train"), (1, "eval"), (2, "train")]
    assert reporter.last_train == {"step": 2, "split": "train", "loss": 2.0}


def test_a_resume_that_does_not_rerun_its_evaluation_keeps_that_record(tmp_path):
    """Step 2's evaluation finished before the crash: only steps 3 on run again."""
    from noisy_flax import reporting
    records = [{"step": s, "split": split, "loss": float(s)}
               for s in (1, 2, 3) for split in ("train", "eval")]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    reporting.MetricsReporter(str(tmp_path), start_step=2).close()
    kept = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["split"]) for r in kept] == [(1, "train"), (1, "eval"), (2, "train"),
                                                       (2, "eval")]


def test_workdir_files_go_through_a_remote_file_system(monkeypatch):
    """gs:// workdirs (what launch/tpu/run.sh asks for): config.json,
    metrics.jsonl, parameters.txt and curves.png through tf.io.gfile, here on
    TensorFlow's in-memory file system, which no built-in open() can reach.
    (clu's TensorBoard writer reaches gs:// through etils, which has no
    in-memory system: it logs instead here.)"""
    from clu import metric_writers
    from noisy_flax import plotting, reporting
    monkeypatch.setattr(reporting.metric_writers, "create_default_writer",
                        lambda *args, **kwargs: metric_writers.LoggingWriter())
    workdir = "ram://bucket/run"
    config = tiny_run.tiny_config("/data", "/idx")
    workdir_lib.prepare_workdir(workdir)
    workdir_lib.write_config(workdir, config)
    assert workdir_lib.read_saved_config(workdir)["model"] == config.model
    changed = tiny_run.tiny_config("/data", "/idx", lr=0.5)
    with pytest.raises(ValueError, match=r"holds a run with another config \(lr: 0.001 -> 0.5\)"):
        workdir_lib.check_config_unchanged(workdir, changed)
    reporter = reporting.MetricsReporter(workdir)
    for step in (1, 2, 3):
        reporter.write(step, "train", {"loss": 1.0 / step, "accuracy": 0.1 * step})
    reporter.close()
    reporting.MetricsReporter(workdir, start_step=2).close()  # a resume from step 2
    assert [s for s, _ in plotting.read_metrics(f"{workdir}/metrics.jsonl")["train"]["loss"]] == [1, 2]
    plotting.plot_curves(f"{workdir}/metrics.jsonl", f"{workdir}/curves.png")
    reporting.write_parameter_overview(workdir, {"w": jnp.zeros((2, 3))})
    with workdir_lib.open_file(f"{workdir}/curves.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    with workdir_lib.open_file(f"{workdir}/parameters.txt") as f:
        assert "(2, 3)" in f.read()


def test_curves_plot_train_and_eval_series_in_their_panels(tmp_path, monkeypatch):
    """Loss panel: train and eval loss; accuracy panel: train accuracy and eval top-1."""
    from noisy_flax import plotting
    records = [{"step": 1, "split": "train", "loss": 2.0, "accuracy": 0.1},
               {"step": 2, "split": "train", "loss": 1.5, "accuracy": 0.3},
               {"step": 2, "split": "eval", "loss": 1.7, "top1": 0.25, "top5": 0.9}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    figures = []
    monkeypatch.setattr(plotting.plt, "close", figures.append)
    plotting.plot_curves(str(tmp_path / "metrics.jsonl"), str(tmp_path / "curves.png"))
    plotted = [{line.get_label(): (list(line.get_xdata()), list(line.get_ydata()))
                for line in ax.lines} for ax in figures[0].axes]
    assert plotted == [{"train loss": ([1, 2], [2.0, 1.5]), "eval loss": ([2], [1.7])},
                       {"train accuracy": ([1, 2], [0.1, 0.3]), "eval top-1": ([2], [0.25])}]
