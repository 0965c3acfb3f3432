"""orbax-checkpoint wrapper: asynchronous, atomic saves; restore that skips
a damaged checkpoint instead of using or deleting it."""
from __future__ import annotations

import logging
import os
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp
from etils import epath

log = logging.getLogger(__name__)

FORMAT_VERSION = 1  # bumped when the saved state's layout changes


class CheckpointError(RuntimeError):
    """No usable checkpoint, or one written by an incompatible version."""


class Checkpointer:
    """Saves every ``save_every`` steps (and when forced), keeps the last ``keep``.

    orbax writes each step to a temporary directory and renames it when
    complete, so a crash mid-save never leaves a half-written step that
    looks finished.
    """

    def __init__(self, directory: str, *, keep: int = 3, save_every: int = 1000,
                 async_save: bool = True):
        self.directory = epath.Path(directory)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, save_interval_steps=max(save_every, 1),
            enable_async_checkpointing=async_save, create=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def latest_step(self) -> Optional[int]:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, *, force: bool = False) -> bool:
        saved = self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            meta=ocp.args.JsonSave({"format_version": FORMAT_VERSION, "step": int(step)})),
            force=force)
        return bool(saved)

    def restore_latest(self, abstract_state: Any) -> tuple[Optional[int], Any]:
        """Restores the newest intact checkpoint; (None, None) when there is none.

        A checkpoint that fails to restore is reported by name and skipped,
        never deleted, so that it can still be inspected.
        """
        for step in reversed(self.all_steps()):
            try:
                return step, self.restore(step, abstract_state)
            except CheckpointError:
                raise
            except Exception as error:  # orbax raises many types for damaged files
                log.warning("checkpoint %s is damaged and was skipped (%s: %s); "
                            "restoring an older one", self.directory / str(step),
                            type(error).__name__, str(error).splitlines()[0][:200])
        return None, None

    def restore(self, step: int, abstract_state: Any) -> Any:
        meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        version = meta["format_version"]
        if version > FORMAT_VERSION:
            raise CheckpointError(
                f"checkpoint {self.directory / str(step)} has format version {version}, this "
                f"noisy_flax reads up to {FORMAT_VERSION}; upgrade noisy_flax or use another workdir")
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state)))
        return restored["state"]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def abstract_with_shardings(tree: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs that tell orbax where each restored array goes."""
    return jax.tree.map(lambda leaf, sharding: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype,
                                                                      sharding=sharding),
                        tree, shardings)


def save_variables(path: str, variables: Any) -> None:
    """Writes plain model variables (used by ``pretrained convert``)."""
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(os.path.abspath(path), variables)
    checkpointer.wait_until_finished()
