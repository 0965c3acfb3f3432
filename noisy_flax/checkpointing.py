"""orbax-checkpoint wrapper: asynchronous, atomic saves; restore that skips
a damaged checkpoint instead of using or deleting it.

What orbax 0.12 does on its own, and what is added here:

* A save is written to ``<step>.orbax-checkpoint-tmp`` and renamed when
  complete; orbax ignores such a leftover, and the next save of that step
  deletes it silently. Here it is moved aside with a warning.
* orbax writes ``commit_success.txt`` into every item and the step before the
  rename, but restores a step without one. Here a step without its markers
  is unfinished: skipped with a warning and moved aside.
* A truncated or deleted array file, a damaged manifest or metadata file
  makes orbax's restore raise; here the step is reported, moved aside and the
  next older one is tried. Moving it aside (to ``<dir>.damaged/``) keeps it
  for inspection and lets training save that step again.
* orbax keeps no checksum of the values: a flipped bit in an array file
  restores silently as a wrong weight. Here each save records a checksum of
  every array (``noisy_flax.checksum``) with the state, and a restore that
  does not reproduce them is damage like the above.
* With several processes, each reads only its own shards, so one process can
  find a step damaged that another reads fine. Here they agree before going
  on: a step any process cannot read is skipped by all, so every process
  resumes from the same step.
* After a failed read, orbax leaves its other reads of the step behind, and
  Python prints what each raises when it is collected ("Exception ignored
  in ...", with tracebacks) at some later moment. Here those two kinds of
  message are dropped; the damage itself is reported in one line.
* A healthy checkpoint of another model, optimizer or input (the state's
  names or shapes differ) makes orbax's restore raise too; here that is told
  apart from damage by the saved metadata, and refused with the differences,
  leaving the checkpoint where it is.
"""
from __future__ import annotations

import logging
import os
import sys
import time
import traceback
import types
from typing import Any, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

from noisy_flax import checksum, sharding

log = logging.getLogger(__name__)

FORMAT_VERSION = 1  # bumped when the saved state's layout changes
COMMIT_MARKER = "commit_success.txt"  # what orbax writes last, before the rename
TMP_SUFFIX = ".orbax-checkpoint-tmp"
ITEMS = ("state", "meta")


class CheckpointError(RuntimeError):
    """No usable checkpoint, or one written by an incompatible version."""


class DamagedCheckpointError(CheckpointError):
    """A checkpoint whose files cannot be read or whose values differ from
    their saved checksums."""

    def __init__(self, path: epath.Path, problem: str):
        super().__init__(f"checkpoint {path} is damaged: {problem}")
        self.problem = problem


class Checkpointer:
    """Saves every ``save_every`` steps (and when forced), keeps the last ``keep``.

    orbax writes each step to a temporary directory and renames it when
    complete, so a crash mid-save never leaves a half-written step that
    looks finished.
    """

    def __init__(self, directory: str, *, keep: int = 3, save_every: int = 1000,
                 async_save: bool = True):
        # orbax writes through tensorstore, which needs absolute local paths.
        self.directory = epath.Path(directory if "://" in str(directory)
                                    else os.path.abspath(directory))
        every = max(save_every, 1)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, enable_async_checkpointing=async_save, create=True,
            # Only every `every` steps (plus preemption and forced saves):
            # orbax's default would also save the very first step.
            should_save_fn=lambda step, _last: step % every == 0)
        # Handlers named up front, so that a fresh process can read a saved
        # state's metadata before restoring it.
        self.manager = ocp.CheckpointManager(
            self.directory, options=options,
            item_handlers={"state": ocp.StandardCheckpointHandler(),
                           "meta": ocp.JsonCheckpointHandler()})

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def latest_step(self) -> Optional[int]:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, *, force: bool = False,
             meta: Optional[dict] = None) -> bool:
        """``meta``: JSON facts saved with the state, in the same atomic save."""
        meta = {**(meta or {}), "format_version": FORMAT_VERSION, "step": int(step),
                "checksums": checksum.checksums(state)}
        saved = self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=force)
        return bool(saved)

    def latest_meta(self) -> Optional[dict]:
        """The JSON facts of the newest checkpoint; None when there is none."""
        step = self.manager.latest_step()
        return None if step is None else self.meta(step)

    def meta(self, step: int) -> dict:
        """The JSON facts saved with ``step`` (format version, step, ...)."""
        return self.manager.restore(step, args=ocp.args.Composite(
            meta=ocp.args.JsonRestore()))["meta"]

    def restore_latest(self, abstract_state: Any, *, read_only: bool = False
                       ) -> tuple[Optional[int], Any]:
        """Restores the newest intact checkpoint; (None, None) when there is none.

        An unfinished or damaged checkpoint is reported by name, moved aside
        (never deleted, so that it can be inspected; with ``read_only``, for
        tools that read a run another process may be writing, left in place)
        and the next older one is tried. A checkpoint from a newer noisy_flax raises CheckpointError.
        With several processes, all skip the same steps and restore the same one.
        """
        # Everything is listed before anything moves, so that every process
        # sees the same checkpoints whatever the timing.
        unfinished = sorted(self.directory.glob(f"*{TMP_SUFFIX}*"))
        steps = list(reversed(self.all_steps()))
        missing = {step: missing_commit_markers(self.directory / str(step)) for step in steps}
        _sync_processes("noisy_flax checkpoints listed")
        set_aside_any = False
        for path in unfinished:
            if read_only:  # perhaps a save in progress: not ours to judge
                continue
            self._set_aside(path, "it is an interrupted save that was never completed")
            set_aside_any = True
        found = None, None
        for step in steps:
            path = self.directory / str(step)
            if missing[step]:
                self._set_aside(path, f"it lacks its commit marker {missing[step][0]} "
                                      "(an unfinished save)", read_only)
                set_aside_any = True
                continue
            try:
                found = step, self.restore(step, abstract_state)
                break
            except DamagedCheckpointError as error:
                self._set_aside(path, f"it cannot be restored ({error.problem})", read_only)
                set_aside_any = True
        if set_aside_any and not read_only:  # every process lists what process 0 left in place
            _sync_processes("noisy_flax checkpoints set aside")
            self.manager.reload()
        return found

    def set_aside_step(self, step: int, reason: str) -> None:
        """Moves a damaged step out of the way (process 0), as restore_latest does."""
        self._set_aside(self.directory / str(step), reason)
        _sync_processes("noisy_flax step set aside")
        self.manager.reload()

    def _set_aside(self, path: epath.Path, reason: str, read_only: bool = False) -> None:
        if read_only or jax.process_index() != 0:  # one process moves it; others only skip it
            log.warning("checkpoint %s is skipped because %s", path, reason)
            return
        target = set_aside(path)
        log.warning("checkpoint %s is skipped because %s; moved to %s (inspect or delete it); "
                    "resuming from the newest intact checkpoint", path, reason, target)

    def restore(self, step: int, abstract_state: Any) -> Any:
        """The state saved at ``step``, checked against its saved checksums.

        Raises DamagedCheckpointError, on every process alike, when any
        process cannot read its part or the values differ from the checksums;
        CheckpointError when the checkpoint belongs to a newer noisy_flax or
        to another model.
        """
        path = self.directory / str(step)
        try:
            meta = self.meta(step)
            saved = self.manager.item_metadata(step)["state"]
        except Exception as error:  # every process reads these same files: all fail alike
            raise DamagedCheckpointError(path, describe(error)) from error
        if not isinstance(meta, dict) or not isinstance(meta.get("format_version"), int):
            raise DamagedCheckpointError(path, "its meta/metadata has no format_version")
        if meta["format_version"] > FORMAT_VERSION:
            raise CheckpointError(
                f"checkpoint {path} has format version {meta['format_version']}, this "
                f"noisy_flax reads up to {FORMAT_VERSION}; upgrade noisy_flax or use another workdir")
        differences = state_differences(saved.tree, abstract_state) if saved is not None else []
        if differences:
            raise CheckpointError(
                f"checkpoint {path} holds the training state of another "
                f"model, optimizer or input ({len(differences)} names or shapes differ, e.g. "
                f"{'; '.join(differences[:3])}); run with the config that wrote it, or use "
                "another --workdir")
        # Each process reads only its own shards. orbax's manager ends a read
        # with a barrier that a process whose read failed never reaches; the
        # handler reads without one, and the processes agree on the outcome
        # before the checksums' collective runs.
        restored, problem = None, None
        handler = ocp.StandardCheckpointHandler()
        _drop_noise_of_abandoned_reads()
        try:
            # Twice: a transient read error (a reset connection to gs://) is
            # not damage, and must not set a good checkpoint aside.
            for attempt in range(2):
                try:
                    restored, problem = handler.restore(
                        path / "state", args=ocp.args.StandardRestore(abstract_state)), None
                    break
                except Exception as error:  # orbax raises many types for damaged files
                    problem = describe(error)
                    if attempt == 0:
                        log.warning("reading checkpoint %s failed (%s); trying once more",
                                    path, problem)
        finally:
            handler.close()
        problem = _agreed_problem(problem)
        if problem is None and "checksums" in meta:  # older checkpoints have none
            different = checksum.mismatches(meta["checksums"], restored)
            if different:
                more = f" and {len(different) - 3} more arrays" if len(different) > 3 else ""
                problem = (f"the values of {', '.join(different[:3])}{more} differ from "
                           "the checksums saved with them")
        if problem is not None:
            raise DamagedCheckpointError(path, problem)
        return restored

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def state_differences(saved_tree: Any, abstract_state: Any) -> list[str]:
    """Names and shapes in which a checkpoint's saved state (orbax metadata)
    differs from the state to restore into; empty when they agree."""
    saved, wanted = _shapes_by_name(saved_tree), _shapes_by_name(abstract_state)
    return ([f"{n}: not in the checkpoint" for n in wanted if n not in saved]
            + [f"{n}: only in the checkpoint" for n in saved if n not in wanted]
            + [f"{n}: checkpoint {saved[n]}, now {wanted[n]}" for n in wanted
               if n in saved and saved[n] != wanted[n]])


def _shapes_by_name(tree: Any) -> dict[str, tuple]:
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {sharding.path_name(path): tuple(leaf.shape) for path, leaf in leaves}


def _drop_noise_of_abandoned_reads() -> None:
    """Keeps what orbax's abandoned shard reads raise out of the log, for good.

    When one shard read fails, orbax 0.12 stops waiting for the others
    and closes its event loop. Each abandoned read raises again when it is
    closed (orbax wraps the read in ``except BaseException``), and a read
    that TensorStore finishes later tries to wake the closed loop. Python
    prints both as "Exception ignored in ..." with their tracebacks, at any
    later moment, long after the one-line report of the damage. The hook
    installed here drops those two and passes every other unraisable
    exception on; it stays, since the reads outlive the restore.
    """
    previous = sys.unraisablehook
    if getattr(previous, "drops_abandoned_orbax_reads", False):
        return

    def hook(unraisable):
        if not _is_abandoned_orbax_read(unraisable):
            previous(unraisable)

    hook.drops_abandoned_orbax_reads = True
    sys.unraisablehook = hook


def _is_abandoned_orbax_read(unraisable) -> bool:
    error, source = unraisable.exc_value, unraisable.object
    if isinstance(source, types.CoroutineType):  # closed while waiting for its read
        return ("orbax" in source.cr_code.co_filename
                and isinstance(getattr(error, "__cause__", None), GeneratorExit))
    frames = traceback.extract_tb(unraisable.exc_traceback, limit=1)
    return (isinstance(error, RuntimeError) and str(error) == "Event loop is closed"
            and bool(frames) and frames[0].name == "call_soon_threadsafe"
            and "asyncio" in frames[0].filename)


def describe(error: Exception) -> str:
    return f"{type(error).__name__}: {str(error).splitlines()[0][:200] if str(error) else ''}"


def _sync_processes(name: str) -> None:
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def _agreed_problem(problem: Optional[str]) -> Optional[str]:
    """This process's problem with a step, or, when another process had one,
    a problem here too: every process must skip the same steps."""
    if jax.process_count() == 1:
        return problem
    failed = np.asarray(multihost_utils.process_allgather(np.int32(problem is not None)))
    if problem is None and failed.any():
        others = [int(i) for i in np.flatnonzero(failed)]
        problem = f"process {others[0]} could not read its part of it"
    return problem


def missing_commit_markers(step_dir: epath.Path) -> list[str]:
    """Commit markers orbax writes into a completed step and its items."""
    expected = [step_dir / COMMIT_MARKER] + [step_dir / item / COMMIT_MARKER for item in ITEMS]
    return [str(p.relative_to(step_dir)) for p in expected if not p.exists()]


def set_aside(path: epath.Path) -> epath.Path:
    """Moves a checkpoint directory to ``<checkpoints>.damaged/<name>-<time>``."""
    target_dir = path.parent.parent / f"{path.parent.name}.damaged"
    target_dir.mkdir(parents=True, exist_ok=True)
    target = target_dir / f"{path.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    suffix = 0
    while target.exists():
        suffix += 1
        target = target_dir / f"{path.name}-{time.strftime('%Y%m%d-%H%M%S')}-{suffix}"
    path.rename(target)
    return target


def has_checkpoints(directory: str) -> bool:
    """Whether a directory holds any finished step; reads only."""
    path = epath.Path(directory)
    return path.is_dir() and any(p.name.isdigit() for p in path.iterdir())


def abstract_with_shardings(tree: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs that tell orbax where each restored array goes."""
    return jax.tree.map(lambda leaf, sharding: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype,
                                                                      sharding=sharding),
                        tree, shardings)
