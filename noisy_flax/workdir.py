"""The workdir: checks that only read it, then the one place that creates it.

Everything here that can fail runs before training writes anything, so a
refused run leaves the workdir exactly as it was.
"""
from __future__ import annotations

import json
import os
from typing import Any, Mapping

import ml_collections

CONFIG_FILE = "config.json"

# Keys whose change does not alter what a resumed run computes (where data
# lives, how often to log, evaluate or save, how to place arrays). Any other
# difference from the saved config refuses a resume, new keys included.
HARMLESS_KEYS = (
    "data_dir", "download", "input.local_dir", "input.prefetch", "input.cache",
    "eval_every", "eval_every_epochs", "eval_max_examples", "eval_batch_size", "eval_batch_per_device", "eval_split",
    "eval_order",
    "log_every", "checkpoint_every", "keep_checkpoints", "async_checkpoints", "save_best", "plot",
    "init_from", "init_dont_load", "init_required", "mesh", "sharding", "remat", "cpu_ynnpack",
    "runlocal", "allow_config_change",
)

# Keys added after runs were saved without them, with the value that does what
# the code did before the key existed: a saved config without the key equals a
# new one holding that value, so such runs still resume.
ADDED_KEYS = {"warmup_prefix": True}


def is_remote(workdir: str) -> bool:
    """gs:// and friends: orbax and clu write there directly."""
    return "://" in workdir


def open_file(path: str, mode: str = "r"):
    """A workdir file, local or remote: tf.io.gfile reads and writes both."""
    import tensorflow as tf  # already loaded by the input pipeline and clu
    return tf.io.gfile.GFile(path, mode)


def file_exists(path: str) -> bool:
    import tensorflow as tf
    return tf.io.gfile.exists(path)


def replace_file(path: str, text: str) -> None:
    """Writes a whole new file next to ``path``, then renames it over ``path``:
    a crash leaves the old file or the new one, never half of one."""
    import tensorflow as tf
    with open_file(path + ".tmp", "w") as f:
        f.write(text)
    tf.io.gfile.rename(path + ".tmp", path, overwrite=True)


def check_workdir(workdir: str) -> None:
    """Refuses a workdir that is a file or that cannot be written; creates nothing."""
    if is_remote(workdir):
        return
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise ValueError(f"--workdir {workdir} is a file; give a directory")
    for name in ("checkpoints", "best"):  # where orbax saves; it would fail only when saving
        inside = os.path.join(workdir, name)
        if os.path.exists(inside) and not os.path.isdir(inside):
            raise ValueError(f"{inside} is a file, where the run keeps its {name} checkpoints; "
                             "move it away, or use another --workdir")
    existing = _nearest_existing(workdir)
    if not os.path.isdir(existing):
        raise ValueError(f"--workdir {workdir} cannot be created: {existing} is a file; "
                         "choose another directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        what = ("is not writable" if existing == os.path.abspath(workdir)
                else f"cannot be created ({existing} is not writable)")
        raise ValueError(f"--workdir {workdir} {what}; choose a writable directory")


def _nearest_existing(path: str) -> str:
    """The path itself, or its closest ancestor that exists."""
    path = os.path.abspath(path)
    while not os.path.exists(path):
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return path


def prepare_workdir(workdir: str) -> None:
    """Creates the workdir; call only after every check has passed."""
    if is_remote(workdir):  # object stores have no directories to refuse
        import tensorflow as tf
        tf.io.gfile.makedirs(workdir)
        return
    try:
        os.makedirs(workdir, exist_ok=True)
    except OSError as error:
        raise ValueError(f"--workdir {workdir} cannot be created ({error.strerror}); "
                         "choose a writable directory") from None


# ---------------------------------------------------------------------------
# The saved config
# ---------------------------------------------------------------------------
def config_as_json(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The config as config.json holds it (tuples become lists, and so on)."""
    return json.loads(config.to_json_best_effort())


def write_config(workdir: str, config: ml_collections.ConfigDict) -> None:
    replace_file(os.path.join(workdir, CONFIG_FILE), config.to_json_best_effort(indent=2))


def read_saved_config(workdir: str, file_name: str = CONFIG_FILE) -> dict[str, Any] | None:
    """The config.json (or ``file_name``) of an earlier run, or None when there is none."""
    import tensorflow as tf
    path = os.path.join(workdir, file_name)
    if not file_exists(path):
        return None
    try:
        with open_file(path) as f:
            return json.load(f)
    except (OSError, tf.errors.OpError, json.JSONDecodeError) as error:
        raise ValueError(f"{path} cannot be read ({error}); restore it, or pass "
                         "--config.allow_config_change=True to replace it") from None


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'noise': {'type': 'x'}} -> {'noise.type': 'x'}."""
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def config_differences(saved: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """'key: old -> new' for every key that differs and matters, sorted."""
    old, now = flatten(saved), flatten(new)
    missing = object()
    changes = []
    for key in sorted(set(old) | set(now)):
        if _is_harmless(key):
            continue
        before, after = old.get(key, missing), now.get(key, missing)
        if before is missing and key in ADDED_KEYS and after == ADDED_KEYS[key]:
            continue
        if before != after:
            changes.append(f"{key}: {_show(before, missing)} -> {_show(after, missing)}")
    return changes


def _is_harmless(key: str) -> bool:
    return any(key == h or key.startswith(h + ".") for h in HARMLESS_KEYS)


def _show(value: Any, missing: object) -> str:
    return "(absent)" if value is missing else json.dumps(value)


def check_config_unchanged(workdir: str, config: ml_collections.ConfigDict, *,
                           file_name: str = CONFIG_FILE, what: str = "run") -> None:
    """Refuses to resume a workdir whose saved config differs in what matters
    (``what``: the run, or the study whose finished runs would be reused)."""
    saved = read_saved_config(workdir, file_name)
    if saved is None or config.get("allow_config_change", False):
        return
    changes = config_differences(saved, config_as_json(config))
    if changes:
        raise ValueError(
            f"--workdir {workdir} holds a {what} with another config ({'; '.join(changes)}); "
            "use a new --workdir, or pass --config.allow_config_change=True to continue "
            f"this {what} with the new config")
