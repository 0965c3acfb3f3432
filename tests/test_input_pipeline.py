"""The tf.data input pipeline: idx parsing, the local builder, resume
equality, exact eval, fast failures. Mock data or tiny fake idx files only."""
import gzip
import time

import ml_collections
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from noisy_flax import input_pipeline, preprocess
from noisy_flax.datasets import fashion_mnist_local

TRAIN_SIZE, TEST_SIZE = 13, 11


def make_config(**overrides) -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict({
      "dataset": "fashion_mnist", "data_dir": None, "download": False,
      "train_split": "train", "eval_split": "test", "image_size": 28,
      "batch_size": 4, "eval_batch_size": 4, "seed": 3,
      "input": input_pipeline.default_input_config(),
  })
  inp = overrides.pop("input", {})
  config.update(overrides)
  config.input.update(inp)
  return config


def write_idx(path, array: np.ndarray) -> None:
  """The idx format by its spec: 0, 0, type 0x08, ndim, big-endian dims, bytes."""
  header = bytes([0, 0, 0x08, array.ndim]) + np.asarray(array.shape, ">u4").tobytes()
  with gzip.open(path, "wb") as f:
    f.write(header + array.astype(np.uint8).tobytes())


def fake_images(n: int, offset: int) -> np.ndarray:
  """Image i is constant (offset + i) * 9 except marker pixels: ids survive
  resizes; (1, 0) = 1 tells rows from columns."""
  images = np.repeat(((offset + np.arange(n)) * 9)[:, None, None], 28, 1).repeat(28, 2)
  images[:, 0, 0] = 255
  images[:, 1, 0] = 1
  return images.astype(np.uint8)


@pytest.fixture(scope="module")
def fake_idx_dir(tmp_path_factory):
  directory = tmp_path_factory.mktemp("idx")
  for split, n, offset in (("train", TRAIN_SIZE, 0), ("test", TEST_SIZE, TRAIN_SIZE)):
    images_name, labels_name = fashion_mnist_local.IDX_FILES[split]
    write_idx(directory / (images_name + ".gz"), fake_images(n, offset))
    write_idx(directory / (labels_name + ".gz"), (offset + np.arange(n)) % 10)
  return directory


@pytest.fixture(scope="module")
def local_config(fake_idx_dir, tmp_path_factory):
  """A config reading the fake idx files through the local builder."""
  data_dir = tmp_path_factory.mktemp("tfds")
  return make_config(data_dir=str(data_dir),
                     input={"local_dir": str(fake_idx_dir), "channels": 1,
                            "shuffle_buffer": 8})


# --- idx parsing -----------------------------------------------------------
def test_parse_idx_reads_values_and_shape(tmp_path):
  images = np.arange(2 * 3 * 4).reshape(2, 3, 4)
  write_idx(tmp_path / "x.gz", images)
  got = fashion_mnist_local.parse_idx(
      fashion_mnist_local.read_bytes(tmp_path / "x.gz"), ndim=3)
  assert got.dtype == np.uint8
  np.testing.assert_array_equal(got, images)


def test_parse_idx_rejects_bad_magic_number():
  data = bytes([0, 0, 0x0D, 1]) + np.asarray([2], ">u4").tobytes() + b"\0" * 8
  with pytest.raises(fashion_mnist_local.IdxFormatError, match="magic"):
    fashion_mnist_local.parse_idx(data, ndim=1)
  # The spec's first two bytes are always zero.
  data = bytes([0, 1, 0x08, 1]) + np.asarray([2], ">u4").tobytes() + b"\0" * 2
  with pytest.raises(fashion_mnist_local.IdxFormatError, match="magic"):
    fashion_mnist_local.parse_idx(data, ndim=1)


def test_parse_idx_rejects_a_short_header():
  for data in (b"\0\0", bytes([0, 0, 0x08, 3]) + np.asarray([2], ">u4").tobytes()):
    with pytest.raises(fashion_mnist_local.IdxFormatError, match="short|truncated"):
      fashion_mnist_local.parse_idx(data, ndim=3)


def test_parse_idx_rejects_truncated_payload_and_wrong_rank():
  data = bytes([0, 0, 0x08, 1]) + np.asarray([5], ">u4").tobytes() + b"\1\2"
  with pytest.raises(fashion_mnist_local.IdxFormatError, match="payload"):
    fashion_mnist_local.parse_idx(data, ndim=1)
  with pytest.raises(fashion_mnist_local.IdxFormatError, match="dimensions"):
    fashion_mnist_local.parse_idx(data, ndim=3)


def test_idx_labels_must_be_fashion_mnist_classes_one_per_image(tmp_path):
  images_name, labels_name = fashion_mnist_local.IDX_FILES["train"]
  write_idx(tmp_path / (images_name + ".gz"), fake_images(3, 0))
  write_idx(tmp_path / (labels_name + ".gz"), np.array([0, 9, 10]))  # ten classes: 0..9
  with pytest.raises(fashion_mnist_local.IdxFormatError, match="label 10 out of range"):
    fashion_mnist_local.load_idx_split(tmp_path, "train")
  for labels in ([0, 9], [0, 9, 1, 2]):
    write_idx(tmp_path / (labels_name + ".gz"), np.array(labels))
    with pytest.raises(fashion_mnist_local.IdxFormatError,
                       match=f"3 images but {len(labels)} labels"):
      fashion_mnist_local.load_idx_split(tmp_path, "train")


def test_uncompressed_idx_files_are_read_too(tmp_path):
  for split, n in (("train", 3), ("test", 2)):
    for name, array in zip(fashion_mnist_local.IDX_FILES[split],
                           (fake_images(n, 0), np.arange(n))):
      write_idx(tmp_path / "packed.gz", array)
      (tmp_path / name).write_bytes(gzip.decompress((tmp_path / "packed.gz").read_bytes()))
  (tmp_path / "packed.gz").unlink()
  assert fashion_mnist_local.missing_idx_files(tmp_path) == []
  images, labels = fashion_mnist_local.load_idx_split(tmp_path, "train")
  np.testing.assert_array_equal(images, fake_images(3, 0))
  np.testing.assert_array_equal(labels, [0, 1, 2])


def test_missing_idx_files_names_each_absent_file(tmp_path):
  for name in fashion_mnist_local.IDX_FILES["train"]:
    write_idx(tmp_path / (name + ".gz"), np.zeros([1], np.uint8))
  # The published file names of the test split.
  assert fashion_mnist_local.missing_idx_files(tmp_path) == [
      "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"]


def test_idx_directory_argument_then_environment_then_debian_path(monkeypatch):
  monkeypatch.setenv("FASHION_MNIST_DIR", "/from/env")
  assert str(fashion_mnist_local.default_local_dir("/from/config")) == "/from/config"
  assert str(fashion_mnist_local.default_local_dir()) == "/from/env"
  monkeypatch.delenv("FASHION_MNIST_DIR")
  # Where Debian's dataset-fashion-mnist package installs the files.
  assert str(fashion_mnist_local.default_local_dir()) == "/usr/share/datasets/fashion-mnist"


@pytest.mark.skipif(not fashion_mnist_local.find_idx_file(
    "/usr/share/datasets/fashion-mnist", "t10k-labels-idx1-ubyte"),
                    reason="dataset-fashion-mnist is not installed")
def test_installed_fashion_mnist_has_the_published_test_split():
  # Xiao et al. 2017: 10,000 test images of 28x28, 1,000 of each class.
  images, labels = fashion_mnist_local.load_idx_split("/usr/share/datasets/fashion-mnist", "test")
  assert images.shape == (10000, 28, 28) and labels.shape == (10000,)
  np.testing.assert_array_equal(np.bincount(labels, minlength=10), [1000] * 10)


def test_local_class_names_are_tfds_fashion_mnist_names(tmp_path):
  # tfds's own builder knows its label names without any data prepared.
  names = tfds.builder("fashion_mnist", data_dir=str(tmp_path)).info.features["label"].names
  assert list(fashion_mnist_local.CLASS_NAMES) == names


def test_corrupt_gzip_is_a_clear_error(tmp_path):
  (tmp_path / "bad.gz").write_bytes(b"not gzip at all")
  with pytest.raises(fashion_mnist_local.IdxFormatError, match="bad.gz"):
    fashion_mnist_local.read_bytes(tmp_path / "bad.gz")


# --- local Fashion-MNIST builder ---------------------------------------------
def test_local_builder_prepares_once_and_yields_the_idx_contents(local_config):
  builder = input_pipeline.get_builder(local_config)
  assert builder.name == "fashion_mnist_local"
  assert builder.info.splits["train"].num_examples == TRAIN_SIZE
  assert builder.info.splits["test"].num_examples == TEST_SIZE
  assert builder.info.features["label"].names[0] == "T-shirt/top"
  # tfds stores examples in key-hash order; the pixel value names the example.
  examples = list(tfds.as_numpy(builder.as_dataset(split="test", shuffle_files=False)))
  want = fake_images(TEST_SIZE, TRAIN_SIZE)
  ids = sorted(int(ex["image"][14, 14, 0]) // 9 for ex in examples)
  assert ids == list(range(TRAIN_SIZE, TRAIN_SIZE + TEST_SIZE))
  for example in examples:
    i = int(example["image"][14, 14, 0]) // 9
    np.testing.assert_array_equal(example["image"][..., 0], want[i - TRAIN_SIZE])
    assert example["label"] == i % 10
  # A second call finds it prepared (no idx files needed any more).
  again = make_config(data_dir=local_config.data_dir,
                      input={"local_dir": "/nonexistent"})
  assert input_pipeline.get_builder(again).name == "fashion_mnist_local"


def test_dataset_info_counts_and_shape(local_config):
  info = input_pipeline.dataset_info(local_config)
  assert info.num_classes == 10
  assert (info.num_train_examples, info.num_eval_examples) == (TRAIN_SIZE, TEST_SIZE)
  assert info.image_shape == (28, 28, 1)


# --- train stream --------------------------------------------------------------
def _take(iterator, n):
  return [next(iterator) for _ in range(n)]


def _assert_same_batches(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x["image"], y["image"])
    np.testing.assert_array_equal(x["label"], y["label"])


@pytest.mark.parametrize("process_index,process_count", [(0, 1), (1, 2)])
def test_resume_from_start_step_equals_uninterrupted_stream(
    local_config, process_index, process_count):
  # 13 examples in batches of 4 (2 per process): the 8 steps cross several
  # epoch boundaries, and the resume point falls inside an epoch.
  config = make_config(data_dir=local_config.data_dir,
                       input={"local_dir": local_config.input.local_dir,
                              "shuffle_buffer": 8, "crop_area": (0.3, 1.0)})
  kwargs = dict(process_index=process_index, process_count=process_count)
  straight = _take(input_pipeline.train_iterator(config, **kwargs), 8)
  resumed = _take(input_pipeline.train_iterator(config, start_step=5, **kwargs), 3)
  _assert_same_batches(straight[5:], resumed)
  # The stream is really augmented and shuffled, not constant.
  assert not np.array_equal(straight[0]["image"], straight[5]["image"])


def test_resume_equality_under_mock_data_with_randaugment():
  config = make_config(dataset="cifar10", image_size=16,
                       input={"randaugment": (2, 9), "shuffle_buffer": 4})
  with tfds.testing.mock_data(num_examples=6):
    straight = _take(input_pipeline.train_iterator(config), 5)
    resumed = _take(input_pipeline.train_iterator(config, start_step=2), 3)
  _assert_same_batches(straight[2:], resumed)


def test_each_epoch_is_a_permutation_of_the_process_slice(local_config):
  config = make_config(data_dir=local_config.data_dir, batch_size=13,
                       input={"local_dir": local_config.input.local_dir,
                              "train_crop": "none", "flip": False,
                              "channels": 1, "shuffle_buffer": 16})
  first, second = _take(input_pipeline.train_iterator(config), 2)
  for batch in (first, second):
    assert sorted(batch["label"].tolist()) == sorted((np.arange(13) % 10).tolist())
  assert first["label"].tolist() != second["label"].tolist()  # reshuffled


def test_train_processes_read_equal_disjoint_slices(local_config):
  # 13 examples over 2 processes: each process gets 6 (one left out), so
  # every epoch of either process has the same length; batches of 6 per
  # process are exactly one epoch, i.e. the same set each time.
  config = make_config(data_dir=local_config.data_dir, batch_size=12,
                       input={"local_dir": local_config.input.local_dir,
                              "train_crop": "none", "flip": False, "channels": 1})
  slices = []
  for p in range(2):
    batches = _take(input_pipeline.train_iterator(config, process_index=p, process_count=2), 3)
    ids = [set(_example_ids(b).tolist()) for b in batches]
    assert all(len(i) == 6 for i in ids) and ids[0] == ids[1] == ids[2]
    slices.append(ids[0])
  assert not slices[0] & slices[1]
  assert slices[0] | slices[1] < set(range(TRAIN_SIZE))


def test_each_example_draws_its_own_flip(local_config):
  # The marker pixel (0, 0) ends up in column 27 when an example is flipped;
  # with a seed per example, one epoch of 13 holds both cases.
  config = make_config(data_dir=local_config.data_dir, batch_size=13,
                       input={"local_dir": local_config.input.local_dir,
                              "train_crop": "none", "flip": True, "channels": 1})
  images = next(input_pipeline.train_iterator(config))["image"][..., 0]
  marker = 255 / 127.5 - 1
  flipped = images[:, 0, 27] == marker
  assert np.all(flipped | (images[:, 0, 0] == marker))
  assert 0 < flipped.sum() < 13


def test_train_batch_shapes_dtypes_and_range(local_config):
  batch = next(input_pipeline.train_iterator(local_config, process_count=2))
  assert batch["image"].shape == (2, 28, 28, 1) and batch["image"].dtype == np.float32
  assert batch["label"].shape == (2,) and batch["label"].dtype == np.int32
  assert -1.0 <= batch["image"].min() and batch["image"].max() <= 1.0


# --- eval pass ------------------------------------------------------------------
def _example_ids(batch):
  """Recovers the fake image ids from normalised pixels (x / 127.5 - 1)."""
  pixels = (batch["image"][:, 14, 14, 0] + 1.0) * 127.5
  return np.round(pixels / 9).astype(int)


def test_eval_sees_every_example_once_across_two_processes(local_config):
  # 11 test examples, global eval batch 4 -> 2 per process; slices of 6 and 5
  # -> 3 batches each, the last ones partly padded.
  config = make_config(data_dir=local_config.data_dir, eval_batch_size=4,
                       input={"local_dir": local_config.input.local_dir, "channels": 1})
  per_process = [list(input_pipeline.eval_batches(config, process_index=p, process_count=2))
                 for p in range(2)]
  assert [len(b) for b in per_process] == [3, 3]
  assert input_pipeline.num_eval_batches(config, process_count=2) == 3
  seen = []
  for batches in per_process:
    for batch in batches:
      assert batch["image"].shape == (2, 28, 28, 1)
      real = batch["mask"] > 0
      seen += _example_ids(batch)[real].tolist()
      np.testing.assert_array_equal(batch["label"][real],
                                    _example_ids(batch)[real] % 10)
      assert set(np.unique(batch["mask"])) <= {0.0, 1.0}
  assert sorted(seen) == list(range(TRAIN_SIZE, TRAIN_SIZE + TEST_SIZE))
  masked = sum(int((b["mask"] == 0).sum()) for bs in per_process for b in bs)
  assert masked == 3 * 4 - TEST_SIZE
  assert input_pipeline.num_eval_examples(config, process_count=2) == TEST_SIZE


def test_eval_fully_masked_batches_pad_the_shorter_process(local_config):
  # 11 examples over 2 processes with local batch 5: slices of 6 and 5, so
  # process 0 needs 2 batches and process 1 gets a fully masked second batch.
  config = make_config(data_dir=local_config.data_dir, eval_batch_size=10,
                       input={"local_dir": local_config.input.local_dir})
  batches = list(input_pipeline.eval_batches(config, process_index=1, process_count=2))
  assert len(batches) == 2
  assert input_pipeline.num_eval_batches(config, process_count=2) == 2  # ceil(6 / 5)
  assert batches[0]["mask"].sum() == 5 and batches[1]["mask"].sum() == 0
  assert batches[0]["image"].shape == (5, 28, 28, 3)  # grayscale tiled to RGB


def test_eval_counts_are_exact_under_mock_data():
  config = make_config(dataset="cifar10", image_size=32, eval_batch_size=4,
                       input={"channels": 1, "eval_resize": "resize_crop",
                              "normalize": "imagenet"})
  with tfds.testing.mock_data(num_examples=7):
    batches = list(input_pipeline.eval_batches(config))
    count = input_pipeline.num_eval_examples(config)
  assert count == 7 and len(batches) == 2
  assert sum(b["mask"].sum() for b in batches) == 7
  assert batches[0]["image"].shape == (4, 32, 32, 1)  # RGB -> grayscale


# --- failures --------------------------------------------------------------------
def test_missing_dataset_fails_fast_naming_dataset_and_directory(tmp_path):
  config = make_config(dataset="cifar10", data_dir=str(tmp_path))
  start = time.monotonic()
  with pytest.raises(input_pipeline.DataError) as error:
    next(input_pipeline.train_iterator(config))
  assert time.monotonic() - start < 10
  message = str(error.value)
  assert "cifar10" in message and str(tmp_path) in message
  assert "tfds build cifar10" in message and "download" in message
  assert "\n" not in message


def test_missing_fashion_mnist_says_how_to_install_it(tmp_path):
  config = make_config(data_dir=str(tmp_path), input={"local_dir": str(tmp_path / "none")})
  start = time.monotonic()
  with pytest.raises(input_pipeline.DataError,
                     match="apt-get install dataset-fashion-mnist.*FASHION_MNIST_DIR"):
    input_pipeline.dataset_info(config)
  assert time.monotonic() - start < 10


def test_missing_data_dir_is_a_clear_error(tmp_path):
  config = make_config(dataset="cifar10", data_dir=str(tmp_path / "nowhere"))
  with pytest.raises(input_pipeline.DataError, match="does not exist"):
    input_pipeline.get_builder(config)


def test_unknown_dataset_lists_close_matches(tmp_path):
  config = make_config(dataset="cifar_10", data_dir=str(tmp_path))
  with pytest.raises(input_pipeline.DataError, match="unknown.*cifar10"):
    input_pipeline.get_builder(config)


def test_mock_data_bypasses_the_prepared_check(tmp_path):
  # Unprepared, even in an empty data_dir: under mock_data it must still load.
  config = make_config(dataset="oxford_iiit_pet", data_dir=str(tmp_path),
                       image_size=24, batch_size=2)
  with tfds.testing.mock_data(num_examples=3):
    assert input_pipeline.get_builder(config).name == "oxford_iiit_pet"
    batch = next(input_pipeline.train_iterator(config))
  assert batch["image"].shape == (2, 24, 24, 3)


def test_tensorflow_sees_no_gpu():
  assert tf.config.get_visible_devices("GPU") == []


def test_default_input_config_is_complete():
  inp = input_pipeline.default_input_config()
  assert inp.randaugment is None and inp.local_dir is None
  for key in ("channels", "train_crop", "crop_area", "flip", "eval_resize",
              "crop_fraction", "normalize", "shuffle_buffer", "cache", "prefetch"):
    assert key in inp


def test_default_crop_settings_are_torchvision_and_timm_defaults():
  inp = input_pipeline.default_input_config()
  assert tuple(inp.crop_area) == (0.08, 1.0)  # RandomResizedCrop(scale=(0.08, 1.0))
  assert inp.crop_fraction == 0.875  # timm DEFAULT_CROP_PCT


def test_a_crop_fraction_of_one_is_accepted():
  # crop_pct = 1.0 (timm's setting for e.g. ViT at 384): resize, no crop margin.
  input_pipeline.check_input_config(make_config(input={"crop_fraction": 1.0}))


def test_input_config_bounds():
  check = lambda **inp: input_pipeline.check_input_config(make_config(input=inp))
  check(randaugment=(2, 30), prefetch=-1)  # bin 30 of 31; -1 is tf.data.AUTOTUNE
  with pytest.raises(ValueError, match="magnitude in 0..30"):
    check(randaugment=(2, 31))
  with pytest.raises(ValueError, match="0 < min"):
    check(crop_area=(0.0, 1.0))  # a window of no pixels


@pytest.mark.parametrize("eval_resize", ["resize", "resize_crop"])
def test_eval_preprocess_uses_the_configured_interpolation_and_crop_fraction(eval_resize):
  """Nearest-neighbour upscaling by 2 repeats every pixel twice. 'resize':
  8x8 -> 16x16. 'resize_crop' at crop_fraction 0.5 to 8: the shorter side
  becomes 8 / 0.5 = 16, so 8x12 -> 16x24, and the centre keeps rows 4:12,
  cols 8:16."""
  width = 8 if eval_resize == "resize" else 12
  image = np.random.default_rng(2).integers(0, 256, (8, width, 1), dtype=np.uint8)
  size = 16 if eval_resize == "resize" else 8
  config = make_config(dataset="cifar10", image_size=size, input={
      "channels": 1, "eval_resize": eval_resize, "crop_fraction": 0.5,
      "interpolation": "nearest", "normalize": "minus_one_to_one"})
  eval_preprocess = input_pipeline.make_eval_preprocess(config, 1)
  got = eval_preprocess({"image": tf.constant(image), "label": tf.constant(3)})["image"].numpy()
  doubled = image.repeat(2, axis=0).repeat(2, axis=1).astype(np.float32)
  expected = doubled if eval_resize == "resize" else doubled[4:12, 8:16]
  np.testing.assert_allclose(got, expected / 127.5 - 1, atol=1e-6)


def test_channels_are_converted_before_imagenet_normalisation():
  """Grayscale tiled to RGB gets each channel's own statistics (torchvision's
  Grayscale(3) then Normalize); RGB made grayscale gets their means."""
  mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
  rgb = np.array([200.0, 40.0, 90.0])
  for stored, channels, pixel, want in (
      (1, 3, [100.0], (100 / 255 - mean) / std),
      (3, 1, rgb, [(rgb @ [0.299, 0.587, 0.114] / 255 - mean.mean()) / std.mean()])):
    config = make_config(dataset="cifar10", image_size=4,
                         input={"channels": channels, "normalize": "imagenet"})
    image = tf.constant(np.tile(np.array(pixel, np.uint8), (4, 4, 1)))
    got = input_pipeline.make_eval_preprocess(config, stored)(
        {"image": image, "label": tf.constant(0)})["image"].numpy()
    np.testing.assert_allclose(got, np.broadcast_to(want, (4, 4, channels)), atol=2e-3)


@pytest.mark.parametrize("before_crop", [False, True])
def test_randaugment_before_or_after_the_crop(before_crop):
  """The published NoisyViT augments the whole image, then crops; timm and
  big_vision crop first. Both orders, on an image of unknown size."""
  image = np.random.default_rng(0).integers(0, 256, (37, 53, 3), dtype=np.uint8)
  config = make_config(dataset="cifar10", image_size=16, input={
      "randaugment": (2, 9), "randaugment_before_crop": before_crop, "flip": False,
      "crop_area": (0.2, 0.5), "normalize": "minus_one_to_one"})
  train_preprocess = input_pipeline.make_train_preprocess(config, 3)
  seed = tf.constant([4, 7], tf.int64)
  got = tf.function(
      lambda pixels: train_preprocess(seed, {"image": pixels, "label": tf.constant(1)})["image"],
      input_signature=[tf.TensorSpec([None, None, 3], tf.uint8)])(image).numpy()

  crop_seed, _, augment_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 3))
  crop = lambda x: preprocess.random_resized_crop(x, 16, crop_seed, (0.2, 0.5))
  augment = lambda x: preprocess.randaugment(tf.cast(x, tf.float32), augment_seed, 2, 9)
  augment_then_crop = crop(augment(image)).numpy() / 127.5 - 1
  crop_then_augment = augment(crop(image)).numpy() / 127.5 - 1
  expected, other = ((augment_then_crop, crop_then_augment) if before_crop
                     else (crop_then_augment, augment_then_crop))
  np.testing.assert_allclose(got, expected, atol=1e-5)
  assert np.abs(got - other).max() > 0.1


def test_preparing_alongside_another_process_uses_its_copy(fake_idx_dir, tmp_path, monkeypatch):
  """Two processes prepare an empty data dir at once: the one that renames
  its copy second must take the first one's, not fail."""
  builder_class = fashion_mnist_local.FashionMnistLocal
  generate = builder_class._download_and_prepare

  def other_process_finishes_first(self, *args, **kwargs):
    monkeypatch.setattr(builder_class, "_download_and_prepare", generate)
    fashion_mnist_local.prepare(tmp_path, fake_idx_dir)  # the other process, start to end
    return generate(self, *args, **kwargs)

  monkeypatch.setattr(builder_class, "_download_and_prepare", other_process_finishes_first)
  builder = fashion_mnist_local.prepare(tmp_path, fake_idx_dir)
  assert builder.is_prepared()
  assert builder.info.splits["train"].num_examples == TRAIN_SIZE


def test_each_process_augments_and_shuffles_with_its_own_seeds():
    """Two processes at the same position of their streams (same seed, same
    epoch) must not draw the same crops and flips, nor the same shuffle."""
    position = tf.constant(5, tf.int64)
    crops = [input_pipeline._example_seed(0, p, position).numpy() for p in (0, 1)]
    shuffles = [int(input_pipeline._epoch_shuffle_seed(0, p, position)) for p in (0, 1)]
    assert not np.array_equal(*crops) and shuffles[0] != shuffles[1]
