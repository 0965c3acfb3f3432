"""Fashion-MNIST from local idx files, as a tfds builder.

Debian's `dataset-fashion-mnist` package installs the four original idx
files under /usr/share/datasets/fashion-mnist/. This builder turns them into
a prepared tfds dataset (`fashion_mnist_local`) with the same features and
class names as tfds's own `fashion_mnist`, so that the rest of the pipeline
cannot tell the two apart and nothing is downloaded.
"""
from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
from etils import epath
import tensorflow_datasets as tfds

DEFAULT_DIR = "/usr/share/datasets/fashion-mnist"
DIR_ENV_VAR = "FASHION_MNIST_DIR"

# Same order as tfds fashion_mnist (and the original dataset's labels).
CLASS_NAMES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)

# split -> (images file, labels file), names as published.
IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}

_IDX_UBYTE = 0x08  # the idx type code for unsigned bytes


class IdxFormatError(ValueError):
  """An idx file is truncated, corrupt or not the kind we expected."""


def default_local_dir(local_dir: str | os.PathLike | None = None) -> Path:
  """The idx directory: the argument, else $FASHION_MNIST_DIR, else Debian's."""
  return Path(local_dir or os.environ.get(DIR_ENV_VAR) or DEFAULT_DIR)


def find_idx_file(directory: str | os.PathLike, stem: str) -> Path | None:
  """Returns `stem.gz` or an already uncompressed `stem` in directory."""
  for name in (stem + ".gz", stem):
    path = Path(directory) / name
    if path.is_file():
      return path
  return None


def missing_idx_files(directory: str | os.PathLike) -> list[str]:
  """Names of the idx files (as .gz) that are not in directory."""
  stems = [stem for pair in IDX_FILES.values() for stem in pair]
  return [s + ".gz" for s in stems if find_idx_file(directory, s) is None]


def read_bytes(path: str | os.PathLike) -> bytes:
  """File contents, gunzipped when the name ends in .gz."""
  path = Path(path)
  try:
    if path.suffix == ".gz":
      with gzip.open(path, "rb") as f:
        return f.read()
    return path.read_bytes()
  except (OSError, EOFError) as e:  # gzip raises these on corrupt data
    raise IdxFormatError(f"{path}: cannot read ({e})") from e


def parse_idx(data: bytes, *, ndim: int, source: str = "idx data") -> np.ndarray:
  """Parses an idx byte string (unsigned-byte payload) into a uint8 array.

  Layout: two zero bytes, a type code (0x08 = ubyte), the number of
  dimensions, one big-endian uint32 per dimension, then the payload.
  """
  if len(data) < 4:
    raise IdxFormatError(f"{source}: {len(data)} bytes, too short for an idx header")
  zero0, zero1, type_code, file_ndim = data[:4]
  if zero0 or zero1 or type_code != _IDX_UBYTE:
    magic = int.from_bytes(data[:4], "big")
    raise IdxFormatError(
        f"{source}: bad idx magic number 0x{magic:08x}; expected "
        f"0x{0x800 + ndim:08x} (unsigned bytes, {ndim} dimensions)")
  if file_ndim != ndim:
    raise IdxFormatError(f"{source}: {file_ndim} dimensions, expected {ndim}")
  header_len = 4 + 4 * ndim
  if len(data) < header_len:
    raise IdxFormatError(f"{source}: truncated idx header")
  shape = tuple(int(d) for d in np.frombuffer(data[4:header_len], dtype=">u4"))
  payload = np.frombuffer(data, dtype=np.uint8, offset=header_len)
  if payload.size != int(np.prod(shape)):
    raise IdxFormatError(
        f"{source}: payload has {payload.size} bytes, header shape {shape} "
        f"needs {int(np.prod(shape))}")
  return payload.reshape(shape)


def load_idx_split(directory: str | os.PathLike,
                   split: str) -> tuple[np.ndarray, np.ndarray]:
  """(images uint8 [N, 28, 28], labels uint8 [N]) of one split."""
  image_stem, label_stem = IDX_FILES[split]
  paths = [find_idx_file(directory, s) for s in (image_stem, label_stem)]
  for stem, path in zip((image_stem, label_stem), paths):
    if path is None:
      raise FileNotFoundError(f"{Path(directory) / (stem + '.gz')} not found")
  images = parse_idx(read_bytes(paths[0]), ndim=3, source=str(paths[0]))
  labels = parse_idx(read_bytes(paths[1]), ndim=1, source=str(paths[1]))
  if len(images) != len(labels):
    raise IdxFormatError(
        f"{directory}: {len(images)} images but {len(labels)} labels in {split}")
  if labels.size and labels.max() >= len(CLASS_NAMES):
    raise IdxFormatError(f"{paths[1]}: label {labels.max()} out of range")
  return images, labels


class FashionMnistLocal(tfds.core.GeneratorBasedBuilder):
  """Fashion-MNIST prepared from idx files on disk (the tfds `manual_dir`)."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Prepared from the original idx files."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      "Install Debian's dataset-fashion-mnist (idx files in "
      f"{DEFAULT_DIR}) or point manual_dir / ${DIR_ENV_VAR} at a directory "
      "holding the four Fashion-MNIST idx .gz files.")

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    # tfds's own lookup imports `importlib_resources`, which tfds 4.9.10 does
    # not declare as a dependency; this file is the answer anyway.
    return epath.Path(__file__)

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        description="Fashion-MNIST (Xiao et al. 2017) from local idx files.",
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(28, 28, 1)),
            "label": tfds.features.ClassLabel(names=list(CLASS_NAMES)),
        }),
        supervised_keys=("image", "label"),
        homepage="https://github.com/zalandoresearch/fashion-mnist",
    )

  def _split_generators(self, dl_manager):
    directory = dl_manager.manual_dir
    return {split: self._generate_examples(directory, split) for split in IDX_FILES}

  def _generate_examples(self, directory, split):
    images, labels = load_idx_split(directory, split)
    for index, (image, label) in enumerate(zip(images, labels)):
      yield index, {"image": image[..., None], "label": int(label)}


def prepare(data_dir: str | os.PathLike,
            local_dir: str | os.PathLike | None = None) -> FashionMnistLocal:
  """Prepares `fashion_mnist_local` into data_dir once; returns the builder."""
  builder = FashionMnistLocal(data_dir=os.fspath(data_dir))
  if not builder.is_prepared():
    config = tfds.download.DownloadConfig(
        manual_dir=os.fspath(default_local_dir(local_dir)))
    try:
      builder.download_and_prepare(download_config=config)
    except FileExistsError:
      # Another process (a second host on shared storage, a parallel run)
      # prepared the same data meanwhile and won the final rename: use its copy.
      builder = FashionMnistLocal(data_dir=os.fspath(data_dir))
      if not builder.is_prepared():
        raise
  return builder
