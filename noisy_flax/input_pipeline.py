"""tfds + tf.data input pipeline: numpy batches, one slice per process.

Train: each process reads its own even slice of the train split, shuffles it
once per epoch with a seed derived from (seed, process, epoch), and augments
every example with stateless ops seeded by (seed, process, position in the
stream). So the stream is a pure function of the config and the position,
and `train_iterator(..., start_step=s)` yields exactly the batches an
uninterrupted iterator yields from step s on. Resuming skips whole epochs
for free and the rest of one epoch as raw (still encoded) records.

Eval: every example exactly once; each process pads its slice with fully
masked examples so that all processes run the same number of batches.

Missing data fails at once with a `DataError` that says how to get it:
tfds left alone retries a dead download for minutes.
"""
from __future__ import annotations

import difflib
import math
import os
from collections.abc import Iterator
from typing import NamedTuple

import ml_collections
from ml_collections import config_dict
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from tensorflow_datasets.core import dataset_builder as tfds_dataset_builder

from noisy_flax import preprocess
from noisy_flax.datasets import fashion_mnist_local


def _hide_accelerators_from_tensorflow() -> None:
  """TF must not grab GPU memory that JAX needs (TPUs are not TF's here)."""
  try:
    tf.config.set_visible_devices([], "GPU")
  except RuntimeError:  # TF already initialised its devices: check instead.
    if tf.config.get_visible_devices("GPU"):
      raise RuntimeError(
          "TensorFlow was initialised with visible GPUs before "
          "noisy_flax.input_pipeline was imported; import it first.") from None


_hide_accelerators_from_tensorflow()


class DataError(ValueError):
  """A dataset cannot be read; the message says what is missing and how to get it."""


# ---------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------
def default_input_config() -> ml_collections.ConfigDict:
  """Defaults for `config.input`; experiment configs start from this."""
  return ml_collections.ConfigDict({
      # Channels the model expects: 1 or 3 (grayscale is tiled to RGB,
      # RGB becomes luma).
      "channels": 3,
      # Train geometry: 'random_resized' (inception crop) | 'resize' | 'none'
      # (the stored image must already be image_size x image_size).
      "train_crop": "random_resized",
      "crop_area": (0.08, 1.0),
      "flip": True,
      # Eval geometry: 'resize' (plain resize to image_size, as the published
      # NoisyViT eval does) | 'resize_crop' (shorter side to
      # image_size / crop_fraction, then centre crop).
      "eval_resize": "resize",
      "crop_fraction": 0.875,
      "interpolation": "bilinear",  # any tf.image.resize method
      "normalize": "minus_one_to_one",  # | 'imagenet'
      # None or (num_ops, magnitude), e.g. (2, 9) = torchvision's default.
      "randaugment": config_dict.placeholder(tuple),
      # False: crop, flip, then RandAugment (timm's and big_vision's order).
      # True: RandAugment on the whole decoded image, then crop and flip (the
      # published NoisyViT transforms: RandAugment() before RandomResizedCrop).
      "randaugment_before_crop": False,
      "shuffle_buffer": 10_000,
      "cache": False,  # cache encoded train records / decoded eval examples in memory
      "prefetch": 2,
      # Fashion-MNIST idx directory: None -> $FASHION_MNIST_DIR ->
      # /usr/share/datasets/fashion-mnist.
      "local_dir": config_dict.placeholder(str),
  })


TRAIN_CROPS = ("random_resized", "resize", "none")
EVAL_RESIZES = ("resize", "resize_crop")
NORMALIZATIONS = ("minus_one_to_one", "imagenet")
INTERPOLATIONS = ("bilinear", "nearest", "bicubic", "area", "lanczos3", "lanczos5",
                  "gaussian", "mitchellcubic")  # tf.image.resize's methods


def check_input_config(config: ml_collections.ConfigDict) -> None:
  """config.input's values, checked before training: inside tf.data a bad
  one fails mid-run, wrapped in TensorFlow's "in user code" traceback."""
  inp = _input_config(config)
  for key, choices in (("train_crop", TRAIN_CROPS), ("eval_resize", EVAL_RESIZES),
                       ("normalize", NORMALIZATIONS), ("interpolation", INTERPOLATIONS),
                       ("channels", (1, 3))):
    if inp[key] not in choices:
      raise ValueError(f"unknown config.input.{key} {inp[key]!r}; use one of {choices}")
  if len(inp.crop_area) != 2:
    raise ValueError(f"config.input.crop_area={tuple(inp.crop_area)} must be a (min, max) pair, "
                     "e.g. (0.08, 1.0)")
  low, high = inp.crop_area
  if not 0 < low <= high <= 1:
    raise ValueError(f"config.input.crop_area={tuple(inp.crop_area)} must be (min, max) with "
                     "0 < min <= max <= 1, e.g. (0.08, 1.0)")
  if not 0 < inp.crop_fraction <= 1:
    raise ValueError(f"config.input.crop_fraction={inp.crop_fraction} must be in (0, 1], "
                     "e.g. 0.875")
  if inp.prefetch < 0 and inp.prefetch != -1:  # -1: tf.data.AUTOTUNE
    raise ValueError(f"config.input.prefetch={inp.prefetch} must be >= 0 batches, or -1 for "
                     "tf.data's autotuning")
  if inp.shuffle_buffer < 1:
    raise ValueError(f"config.input.shuffle_buffer={inp.shuffle_buffer} must be >= 1 "
                     "(1 = no shuffling)")
  if inp.randaugment and len(inp.randaugment) != 2:
    raise ValueError(f"config.input.randaugment={tuple(inp.randaugment)} must be a "
                     "(num_ops, magnitude) pair, e.g. (2, 9)")
  if inp.randaugment:
    num_ops, magnitude = inp.randaugment
    if num_ops < 0 or not 0 <= magnitude < preprocess.RANDAUGMENT_BINS:
      raise ValueError(f"config.input.randaugment={tuple(inp.randaugment)} must be (num_ops >= 0, "
                       f"magnitude in 0..{preprocess.RANDAUGMENT_BINS - 1}), e.g. (2, 9)")


def _input_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """config.input on top of the defaults, so hand-written configs may omit keys."""
  merged = default_input_config().to_dict()
  merged.update(dict(config.get("input") or {}))
  return ml_collections.ConfigDict(merged)


def _local_batch_size(global_batch: int, process_count: int, what: str) -> int:
  if global_batch % process_count:
    raise ValueError(
        f"{what}={global_batch} is not divisible by process_count={process_count}")
  return global_batch // process_count


# ---------------------------------------------------------------------------
# Finding the dataset (fast, clear failures; no downloads unless asked)
# ---------------------------------------------------------------------------
def _tfds_is_mocked() -> bool:
  """True inside tfds.testing.mock_data, which replaces download_and_prepare."""
  method = tfds_dataset_builder.DatasetBuilder.download_and_prepare
  return getattr(method, "__module__", None) != tfds_dataset_builder.__name__


def _resolve_data_dir(config: ml_collections.ConfigDict) -> str:
  """config.data_dir, else $TFDS_DATA_DIR, else tfds's default directory.

  A directory named explicitly must exist (unless downloading will create it);
  tfds's default is created on demand.
  """
  explicit = config.get("data_dir") or os.environ.get("TFDS_DATA_DIR")
  if not explicit:
    return os.fspath(tfds.core.constants.DATA_DIR)
  if not config.get("download", False) and not tf.io.gfile.isdir(explicit):
    source = "config.data_dir" if config.get("data_dir") else "$TFDS_DATA_DIR"
    raise DataError(
        f"data_dir {explicit} (from {source}) does not exist; create it, fix the "
        f"path, or leave data_dir unset to use {tfds.core.constants.DATA_DIR}")
  return explicit


def _unknown_dataset_error(name: str) -> DataError:
  known = tfds.list_builders(with_community_datasets=False)
  base = name.split("/")[0].split(":")[0]
  close = difflib.get_close_matches(base, known, n=5, cutoff=0.6)
  hint = f"; did you mean {', '.join(close)}?" if close else ""
  return DataError(f"unknown tfds dataset {name!r}{hint}")


def _tfds_builder(name: str, data_dir: str) -> tfds.core.DatasetBuilder:
  try:
    return tfds.builder(name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError:
    raise _unknown_dataset_error(name) from None


def _not_prepared_error(builder: tfds.core.DatasetBuilder, data_dir: str,
                        extra_hint: str = "") -> DataError:
  name = builder.name
  if getattr(builder, "MANUAL_DOWNLOAD_INSTRUCTIONS", None):  # e.g. ImageNet: no download
    fix = (f"put its archives in a folder DIR and run `tfds build {name} --manual_dir DIR "
           f"--data_dir {data_dir}` (launch/README.md)")
  else:
    fix = (f"run `tfds build {name} --data_dir {data_dir}` on a machine with internet "
           "and copy it here, or set config.download=True")
  return DataError(
      f"dataset {name!r} is not prepared in {data_dir} (looked for "
      f"{builder.data_dir}); {fix}{extra_hint}")


def _fashion_mnist_builder(config, data_dir: str) -> tfds.core.DatasetBuilder:
  """tfds's fashion_mnist if prepared, else the local idx builder (prepared once)."""
  # tfds warns about a missing version folder when asked for a builder of a
  # dataset it has never prepared here: look for tfds's own copy only if it is there.
  if tf.io.gfile.isdir(os.path.join(data_dir, "fashion_mnist")):
    own = tfds.builder("fashion_mnist", data_dir=data_dir)
    if own.is_prepared():
      return own
  local = fashion_mnist_local.FashionMnistLocal(data_dir=data_dir)
  if local.is_prepared():
    return local
  idx_dir = fashion_mnist_local.default_local_dir(_input_config(config).local_dir)
  missing = fashion_mnist_local.missing_idx_files(idx_dir)
  if not missing:
    tf.io.gfile.makedirs(data_dir)
    try:
      return fashion_mnist_local.prepare(data_dir, idx_dir)
    except fashion_mnist_local.IdxFormatError as e:
      raise DataError(f"Fashion-MNIST idx files in {idx_dir} are unusable: {e}") from e
  own = tfds.builder("fashion_mnist", data_dir=data_dir)
  if config.get("download", False):
    own.download_and_prepare()
    return own
  raise _not_prepared_error(
      own, data_dir,
      f"; or `apt-get install dataset-fashion-mnist`, or point "
      f"${fashion_mnist_local.DIR_ENV_VAR} (or config.input.local_dir) at the "
      f"four idx .gz files ({idx_dir} lacks {', '.join(missing)})")


def get_builder(config: ml_collections.ConfigDict) -> tfds.core.DatasetBuilder:
  """The prepared tfds builder for config.dataset, or a DataError in milliseconds."""
  name = config.dataset
  if _tfds_is_mocked():  # mock_data fakes every dataset; nothing to check.
    return tfds.builder(name, data_dir=config.get("data_dir"))
  data_dir = _resolve_data_dir(config)
  if name == "fashion_mnist":
    return _fashion_mnist_builder(config, data_dir)
  builder = _tfds_builder(name, data_dir)
  if not builder.is_prepared():
    if not config.get("download", False):
      raise _not_prepared_error(builder, data_dir)
    builder.download_and_prepare()
  return builder


# ---------------------------------------------------------------------------
# Reading and counting
# ---------------------------------------------------------------------------
def _process_split(split: str, process_index: int, process_count: int,
                   drop_remainder: bool):
  return tfds.even_splits(split, n=process_count,
                          drop_remainder=drop_remainder)[process_index]


def _read(builder: tfds.core.DatasetBuilder, split) -> tf.data.Dataset:
  """{'image': encoded bytes, 'label'} in file order; decoding comes later."""
  # Read only image and label (other features, e.g. masks, cost time and
  # some break mock_data), and leave the image encoded.
  decoders = tfds.decode.PartialDecoding(
      {"image": True, "label": True},
      decoders={"image": tfds.decode.SkipDecoding()})
  return builder.as_dataset(split=split, shuffle_files=False, decoders=decoders)


def _count(builder: tfds.core.DatasetBuilder, split) -> int:
  """Examples in a (sub)split: the dataset's cardinality, else the metadata.

  Cardinality is what mock_data reports, so counts stay exact under mocking.
  """
  cardinality = int(_read(builder, split).cardinality())
  if cardinality >= 0:
    return cardinality
  return int(builder.info.splits[split].num_examples)


def _process_counts(builder, split: str, process_count: int,
                    drop_remainder: bool) -> list[int]:
  return [_count(builder, _process_split(split, p, process_count, drop_remainder))
          for p in range(process_count)]


def num_eval_examples(config: ml_collections.ConfigDict, split: str | None = None,
                      *, process_count: int = 1) -> int:
  """Real (unpadded) examples one pass of eval_batches covers, over all processes."""
  split = split or config.eval_split
  return sum(_process_counts(get_builder(config), split, process_count, False))


def num_eval_batches(config: ml_collections.ConfigDict, split: str | None = None,
                     *, process_count: int = 1) -> int:
  """Batches every process yields in one pass of eval_batches."""
  split = split or config.eval_split
  local_batch = _local_batch_size(config.eval_batch_size, process_count,
                                  "eval_batch_size")
  counts = _process_counts(get_builder(config), split, process_count, False)
  return math.ceil(max(counts) / local_batch)


class DatasetSummary(NamedTuple):
  num_classes: int
  num_train_examples: int  # whole train split, all processes
  num_eval_examples: int  # whole eval split, all processes
  image_shape: tuple[int, int, int]  # what the model sees: (size, size, channels)


def dataset_info(config: ml_collections.ConfigDict,
                 builder: tfds.core.DatasetBuilder | None = None) -> DatasetSummary:
  """Small facts the trainer needs (classes, steps per epoch, input shape);
  ``builder``: config's, when the caller already has it."""
  builder = builder or get_builder(config)
  size, channels = config.image_size, _input_config(config).channels
  return DatasetSummary(
      num_classes=int(builder.info.features["label"].num_classes),
      num_train_examples=_count(builder, config.train_split),
      num_eval_examples=_count(builder, config.eval_split),
      image_shape=(size, size, channels),
  )


# ---------------------------------------------------------------------------
# Per-example preprocessing
# ---------------------------------------------------------------------------
def _stored_channels(builder: tfds.core.DatasetBuilder) -> int:
  channels = builder.info.features["image"].shape[-1]
  return channels or 3  # unknown: decode as RGB


def _decode(example, stored_channels: int) -> tf.Tensor:
  image = preprocess.decode_image(example["image"], stored_channels)
  image.set_shape([None, None, stored_channels])
  return image


def _finish(image: tf.Tensor, label: tf.Tensor, inp) -> dict[str, tf.Tensor]:
  image = preprocess.to_channels(image, inp.channels)
  image = preprocess.normalize(image, inp.normalize)
  return {"image": image, "label": tf.cast(label, tf.int32)}


def make_train_preprocess(config: ml_collections.ConfigDict, stored_channels: int):
  """(seed[2], example) -> {'image', 'label'}: decode, crop, flip, augment."""
  inp = _input_config(config)
  size = config.image_size

  def train_preprocess(seed, example):
    crop_seed, flip_seed, augment_seed = tf.unstack(
        tf.random.experimental.stateless_split(seed, 3))
    image = _decode(example, stored_channels)
    if inp.randaugment and inp.randaugment_before_crop:
      image = _randaugment(image, augment_seed, inp)
    if inp.train_crop == "random_resized":
      image = preprocess.random_resized_crop(
          image, size, crop_seed, tuple(inp.crop_area), inp.interpolation)
    elif inp.train_crop == "resize":
      image = preprocess.resize(image, size, inp.interpolation)
    elif inp.train_crop == "none":
      image = tf.cast(image, tf.float32)
      image.set_shape([size, size, stored_channels])
    else:
      raise ValueError(f"unknown input.train_crop={inp.train_crop!r}")
    if inp.flip:
      image = preprocess.random_flip(image, flip_seed)
    if inp.randaugment and not inp.randaugment_before_crop:
      image = _randaugment(image, augment_seed, inp)
    return _finish(image, example["label"], inp)

  return train_preprocess


def _randaugment(image: tf.Tensor, seed: tf.Tensor, inp) -> tf.Tensor:
  num_ops, magnitude = inp.randaugment
  return preprocess.randaugment(tf.cast(image, tf.float32), seed, num_ops, magnitude)


def make_eval_preprocess(config: ml_collections.ConfigDict, stored_channels: int):
  """example -> {'image', 'label'}: decode, resize (and centre crop)."""
  inp = _input_config(config)
  size = config.image_size

  def eval_preprocess(example):
    image = _decode(example, stored_channels)
    if inp.eval_resize == "resize":
      image = preprocess.resize(image, size, inp.interpolation)
    elif inp.eval_resize == "resize_crop":
      image = preprocess.resize_and_central_crop(
          image, size, inp.crop_fraction, inp.interpolation)
      image.set_shape([size, size, stored_channels])
    else:
      raise ValueError(f"unknown input.eval_resize={inp.eval_resize!r}")
    return _finish(image, example["label"], inp)

  return eval_preprocess


def check_train_crop(config, builder) -> None:
  """'none' feeds stored images as they are, so they must have the model's size."""
  if _input_config(config).train_crop != "none":
    return
  stored = tuple(builder.info.features["image"].shape[:2])
  if stored != (config.image_size, config.image_size):
    raise DataError(
        f"input.train_crop='none' needs {config.dataset} images of "
        f"{config.image_size}x{config.image_size}, but they are {stored}; "
        f"use train_crop='resize' or 'random_resized'")


# ---------------------------------------------------------------------------
# Train stream
# ---------------------------------------------------------------------------
def _epoch_shuffle_seed(seed: int, process_index: int, epoch: tf.Tensor) -> tf.Tensor:
  """A scalar int64 shuffle seed, different for each (seed, process, epoch)."""
  key = tf.random.experimental.stateless_fold_in(
      tf.constant([seed, process_index], tf.int64), epoch)
  return tf.random.stateless_uniform([], key, minval=None, maxval=None,
                                     dtype=tf.int64)


def _example_seed(seed: int, process_index: int, position: tf.Tensor) -> tf.Tensor:
  """The augmentation seed of the example at `position` in this process's stream."""
  key = tf.constant([seed, process_index], tf.int64)
  return tf.random.experimental.stateless_fold_in(key, position)


def train_dataset(config: ml_collections.ConfigDict, *, process_index: int = 0,
                  process_count: int = 1, start_step: int = 0) -> tf.data.Dataset:
  """The endless, batched train stream of one process, from start_step on."""
  inp = _input_config(config)
  local_batch = _local_batch_size(config.batch_size, process_count, "batch_size")
  builder = get_builder(config)
  check_train_crop(config, builder)
  split = _process_split(config.train_split, process_index, process_count,
                         drop_remainder=True)
  examples_per_epoch = _count(builder, split)
  if examples_per_epoch == 0:
    raise DataError(f"{config.dataset} split {config.train_split!r} is empty "
                    f"for process {process_index} of {process_count}")

  records = _read(builder, split)
  if inp.cache:
    records = records.cache()

  def one_epoch(epoch):
    shuffle_seed = _epoch_shuffle_seed(config.seed, process_index, epoch)
    return records.shuffle(inp.shuffle_buffer, seed=shuffle_seed,
                           reshuffle_each_iteration=False)

  # Skip whole epochs by starting the epoch counter late, then the rest of
  # one epoch as encoded records (before any decoding or augmentation).
  first_position = start_step * local_batch
  start_epoch, offset_in_epoch = divmod(first_position, examples_per_epoch)
  ds = tf.data.Dataset.range(start_epoch, np.iinfo(np.int64).max).flat_map(one_epoch)
  ds = ds.skip(offset_in_epoch).enumerate(start=first_position)

  train_preprocess = make_train_preprocess(config, _stored_channels(builder))
  ds = ds.map(
      lambda position, example: train_preprocess(
          _example_seed(config.seed, process_index, position), example),
      num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  ds = ds.batch(local_batch, drop_remainder=True)
  return ds.prefetch(inp.prefetch)


def train_iterator(config: ml_collections.ConfigDict, *, process_index: int = 0,
                   process_count: int = 1, start_step: int = 0) -> Iterator[dict]:
  """Endless numpy batches {'image': f32 [b,H,W,C], 'label': i32 [b]}, b = batch/processes."""
  ds = train_dataset(config, process_index=process_index,
                     process_count=process_count, start_step=start_step)
  return ds.as_numpy_iterator()


# ---------------------------------------------------------------------------
# Eval pass
# ---------------------------------------------------------------------------
def _padding_example(element_spec) -> dict[str, tf.Tensor]:
  """An all-zero example with mask 0, shaped like the real ones."""
  return {key: tf.zeros(spec.shape, spec.dtype) for key, spec in element_spec.items()}


def eval_dataset(config: ml_collections.ConfigDict, *, split: str | None = None,
                 process_index: int = 0, process_count: int = 1) -> tf.data.Dataset:
  """One pass over this process's slice, padded to the common batch count."""
  inp = _input_config(config)
  split = split or config.eval_split
  local_batch = _local_batch_size(config.eval_batch_size, process_count,
                                  "eval_batch_size")
  builder = get_builder(config)
  counts = _process_counts(builder, split, process_count, drop_remainder=False)
  num_batches = math.ceil(max(counts) / local_batch)
  padding = num_batches * local_batch - counts[process_index]

  eval_preprocess = make_eval_preprocess(config, _stored_channels(builder))
  ds = _read(builder, _process_split(split, process_index, process_count, False))
  ds = ds.map(lambda ex: {**eval_preprocess(ex), "mask": tf.constant(1.0)},
              num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  if inp.cache:
    ds = ds.cache()
  pad = tf.data.Dataset.from_tensors(_padding_example(ds.element_spec))
  ds = ds.concatenate(pad.repeat(padding))
  ds = ds.batch(local_batch, drop_remainder=True)
  return ds.prefetch(inp.prefetch)


def eval_batches(config: ml_collections.ConfigDict, *, split: str | None = None,
                 process_index: int = 0, process_count: int = 1) -> Iterator[dict]:
  """One eval pass of numpy batches {'image', 'label', 'mask': f32 1 real / 0 pad}.

  Every example of the split appears exactly once over all processes, and
  every process yields num_eval_batches(...) batches.
  """
  ds = eval_dataset(config, split=split, process_index=process_index,
                    process_count=process_count)
  return ds.as_numpy_iterator()
