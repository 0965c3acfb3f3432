"""Shared by the reliability and bad-input tests (and tests/crash_worker.py):
a tiny Fashion-MNIST stand-in, a seconds-long training config, and a
snapshot of a directory tree to prove that a refused run changed nothing."""
from __future__ import annotations

import contextlib
import gzip
import os
import pathlib
import sys

import ml_collections
import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from configs import fashion_mnist  # noqa: E402
from noisy_flax.datasets import fashion_mnist_local  # noqa: E402

TRAIN_SIZE, TEST_SIZE = 96, 32


def write_idx(path: pathlib.Path, array: np.ndarray) -> None:
    """The idx format: 0, 0, type 0x08, ndim, big-endian dims, then the bytes."""
    header = bytes([0, 0, 0x08, array.ndim]) + np.asarray(array.shape, ">u4").tobytes()
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def write_fake_fashion_mnist(directory: pathlib.Path) -> pathlib.Path:
    """Four small idx files with learnable images (brightness tells the class)."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for split, n in (("train", TRAIN_SIZE), ("test", TEST_SIZE)):
        labels = np.arange(n) % 10
        images = rng.integers(0, 40, (n, 28, 28)) + labels[:, None, None] * 20
        images_name, labels_name = fashion_mnist_local.IDX_FILES[split]
        write_idx(directory / (images_name + ".gz"), images)
        write_idx(directory / (labels_name + ".gz"), labels)
    return directory


def tiny_config(data_dir: str, idx_dir: str, **overrides) -> ml_collections.ConfigDict:
    """runlocal Fashion-MNIST with a one-block nano ViT; ``overrides`` use
    dotted keys, e.g. ``**{'noise.type': 'gaussian'}``."""
    config = fashion_mnist.get_config("runlocal")
    # Pinned, not the experiment's defaults: those change with the recipe.
    config.model = "vit_nano_patch4_28"
    config.noise.type, config.noise.site, config.noise.layer = "optimal_q", "attn_input", -1
    config.lr = 1e-3
    config.data_dir = str(data_dir)
    config.input.local_dir = str(idx_dir)
    config.input.shuffle_buffer = 32
    config.model_kwargs = ml_collections.ConfigDict({"num_layers": 1})
    config.eval_every = 0
    config.plot = False
    for key, value in overrides.items():
        set_dotted(config, key, value)
    return config


def crash_config(data_dir: str, idx_dir: str, total_steps: int) -> ml_collections.ConfigDict:
    """What the crash trials train: a checkpoint every other step, a line every step."""
    return tiny_config(data_dir, idx_dir, total_steps=total_steps, checkpoint_every=2,
                       log_every=1, keep_checkpoints=3)


def set_dotted(config: ml_collections.ConfigDict, key: str, value) -> None:
    *parents, leaf = key.split(".")
    node = config
    for name in parents:
        node = node[name]
    with config.unlocked() if leaf not in node else contextlib.nullcontext():
        node[leaf] = value


def snapshot(path: pathlib.Path) -> dict[str, tuple]:
    """Every entry under ``path`` (and ``path`` itself): kind, size, mtime in ns."""
    path = pathlib.Path(path)
    if not path.exists():
        return {}
    entries = {}
    for entry in [path, *sorted(path.rglob("*"))]:
        stat = entry.lstat()
        kind = "dir" if entry.is_dir() else "file"
        entries[str(entry.relative_to(path))] = (kind, 0 if kind == "dir" else stat.st_size,
                                                 stat.st_mtime_ns)
    return entries


def data_dirs(base: pathlib.Path) -> tuple[str, str]:
    """(tfds data_dir, idx dir), created once under ``base``."""
    idx_dir = base / "idx"
    if not idx_dir.exists():
        write_fake_fashion_mnist(idx_dir)
    data_dir = base / "tfds"
    data_dir.mkdir(exist_ok=True)
    return os.fspath(data_dir), os.fspath(idx_dir)
