"""Image ops of noisy_flax.preprocess against numpy and closed forms."""
import math

import numpy as np
import pytest
import tensorflow as tf

from noisy_flax import input_pipeline  # noqa: F401  (hides GPUs from TF first)
from noisy_flax import preprocess


def _seed(i):
  return tf.constant([17, i], tf.int64)


def _random_image(h, w, c, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (h, w, c)).astype(np.float32)


# --- normalisation ---------------------------------------------------------
def test_minus_one_to_one_matches_numpy():
  image = _random_image(5, 4, 3)
  got = preprocess.normalize(tf.constant(image), "minus_one_to_one").numpy()
  np.testing.assert_allclose(got, image / 127.5 - 1.0, rtol=1e-6, atol=1e-6)
  assert got.min() >= -1.0 and got.max() <= 1.0


def test_imagenet_normalisation_matches_numpy():
  image = _random_image(5, 4, 3, seed=1)
  mean = np.array([0.485, 0.456, 0.406])  # torchvision's published statistics
  std = np.array([0.229, 0.224, 0.225])
  got = preprocess.normalize(tf.constant(image), "imagenet").numpy()
  np.testing.assert_allclose(got, (image / 255.0 - mean) / std, rtol=1e-5, atol=1e-5)


def test_imagenet_normalisation_of_one_channel_uses_mean_statistics():
  image = _random_image(3, 3, 1)
  got = preprocess.normalize(tf.constant(image), "imagenet").numpy()
  want = (image / 255.0 - np.mean([0.485, 0.456, 0.406])) / np.mean([0.229, 0.224, 0.225])
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_unknown_normalisation_is_rejected():
  with pytest.raises(ValueError, match="normalize"):
    preprocess.normalize(tf.zeros([2, 2, 3]), "zero_one")


# --- channels --------------------------------------------------------------
def test_grayscale_to_rgb_tiles_the_channel():
  image = _random_image(4, 6, 1)
  got = preprocess.to_channels(tf.constant(image), 3).numpy()
  np.testing.assert_array_equal(got, np.repeat(image, 3, axis=-1))


def test_rgb_to_grayscale_uses_itu_r_601_luma():
  image = _random_image(4, 6, 3)
  got = preprocess.to_channels(tf.constant(image), 1).numpy()
  want = image @ np.array([0.299, 0.587, 0.114])  # ITU-R BT.601
  assert got.shape == (4, 6, 1)
  np.testing.assert_allclose(got[..., 0], want, atol=0.1)


def test_rgba_drops_alpha_first():
  image = _random_image(4, 6, 4)
  got = preprocess.to_channels(tf.constant(image), 3).numpy()
  np.testing.assert_array_equal(got, image[..., :3])
  gray = preprocess.to_channels(tf.constant(image), 1).numpy()
  np.testing.assert_allclose(gray[..., 0], image[..., :3] @ np.array([0.299, 0.587, 0.114]),
                             atol=0.1)


def test_matching_channels_pass_through():
  image = _random_image(2, 2, 3)
  np.testing.assert_array_equal(preprocess.to_channels(tf.constant(image), 3), image)


# --- crops -----------------------------------------------------------------
def _fallback_window(height, width):
  """torchvision's window when no draw fits: the whole image, its ratio
  clamped to [3/4, 4/3]."""
  if width / height > 4 / 3:
    return height, round(height * 4 / 3)
  if width / height < 3 / 4:
    return round(width / (3 / 4)), width
  return height, width


# min_checked: drawn windows (not the fallback) out of 200; measured 199,
# 200 and 104, so a crop that always fell back cannot pass.
@pytest.mark.parametrize("height,width,area,min_checked", [(48, 64, (0.08, 1.0), 150),
                                                           (48, 64, (0.25, 0.5), 180),
                                                           (97, 31, (0.3, 0.9), 70)])
def test_inception_crop_window_respects_area_and_aspect_bounds(height, width, area, min_checked):
  lo, hi = area
  checked = 0
  for i in range(200):
    top, left, h, w = (int(v) for v in preprocess.random_resized_crop_window(
        tf.constant(height), tf.constant(width), _seed(i), area))
    assert 0 <= top and top + h <= height and 0 <= left and left + w <= width
    # Rounding each side to whole pixels moves the area by < (h + w) / 2 + 1/4.
    slack = (h + w) / 2 + 0.25
    if (h, w) != _fallback_window(height, width):
      checked += 1
      assert lo * height * width - slack <= h * w <= hi * height * width + slack
      ratio = w / h
      assert 3 / 4 * (1 - 1 / min(h, w)) <= ratio <= 4 / 3 * (1 + 1 / min(h, w))
  assert checked >= min_checked


def test_inception_crop_window_never_fails_when_every_draw_fits():
  # With area <= 1/2 and aspect <= 4/3 on a 48x64 image both sides always fit
  # (sqrt(0.5 * 3072 * 4/3) ~ 45.3 <= 48), so no draw may fall back.
  for i in range(100):
    _, _, h, w = preprocess.random_resized_crop_window(
        tf.constant(48), tf.constant(64), _seed(i), (0.25, 0.5))
    assert int(h) * int(w) <= 0.5 * 48 * 64 + (int(h) + int(w)) / 2 + 0.25


def test_inception_crop_aspect_is_width_over_height():
  # torchvision's ratio is w / h: a range above 1 gives wide windows only.
  for i in range(50):
    _, _, h, w = (int(v) for v in preprocess.random_resized_crop_window(
        tf.constant(60), tf.constant(60), _seed(i), (0.1, 0.4), (1.5, 2.0)))
    assert 1.5 * (1 - 1 / h) <= w / h <= 2.0 * (1 + 1 / h)


def test_inception_crop_offsets_reach_every_valid_position():
  # torchvision draws top = randint(0, H - h + 1): on a 10x10 image a 9x9
  # window (area 0.81, aspect 1) may start at row/column 0 or 1, and both occur.
  tops, lefts = set(), set()
  for i in range(40):
    top, left, h, w = (int(v) for v in preprocess.random_resized_crop_window(
        tf.constant(10), tf.constant(10), _seed(i), (0.81, 0.81), (1.0, 1.0)))
    assert (h, w) == (9, 9)
    tops.add(top)
    lefts.add(left)
  assert tops == {0, 1} and lefts == {0, 1}


def test_inception_crop_fallback_is_centred_and_ratio_clamped():
  # An impossible area range forces the fallback: on a 30x100 (wide) image
  # torchvision keeps the full height and width = round(30 * 4/3) = 40.
  top, left, h, w = (int(v) for v in preprocess.random_resized_crop_window(
      tf.constant(30), tf.constant(100), _seed(0), (2.0, 3.0)))
  assert (h, w) == (30, 40)
  assert (top, left) == (0, (100 - 40) // 2)


def test_inception_crop_output_shape_and_determinism():
  image = tf.constant(_random_image(50, 70, 3))
  a = preprocess.random_resized_crop(image, 24, _seed(3))
  b = preprocess.random_resized_crop(image, 24, _seed(3))
  assert a.shape == (24, 24, 3) and a.dtype == tf.float32
  np.testing.assert_array_equal(a, b)


def _pil_bilinear(image, height, width):
  """PIL's bilinear resize, channel by channel in float mode: its filter
  support widens with the scale factor, so it antialiases when shrinking."""
  from PIL import Image
  return np.stack([np.asarray(Image.fromarray(np.ascontiguousarray(image[..., c]), mode="F")
                              .resize((width, height), Image.BILINEAR))
                   for c in range(image.shape[-1])], axis=-1)


@pytest.mark.parametrize("h, w, size", [(300, 200, 64), (97, 131, 40), (50, 70, 96)])
def test_resize_matches_pil_bilinear(h, w, size):
  image = _random_image(h, w, 3)
  got = preprocess.resize(tf.constant(image), size).numpy()
  np.testing.assert_allclose(got, _pil_bilinear(image, size, size), atol=1e-2)


def test_resize_shorter_side_matches_pil_bilinear():
  image = _random_image(120, 300, 3)
  got = preprocess.resize_shorter_side(tf.constant(image), 48).numpy()
  assert got.shape == (48, 120, 3)  # 300 * 48 / 120
  np.testing.assert_allclose(got, _pil_bilinear(image, 48, 120), atol=1e-2)


def test_resize_shorter_side_truncates_the_longer_side_like_torchvision():
  # torchvision Resize(36) on 60x91: the long side is int(36 * 91 / 60) = int(54.6) = 54.
  image = _random_image(60, 91, 3)
  got = preprocess.resize_shorter_side(tf.constant(image), 36).numpy()
  assert got.shape == (36, 54, 3)
  np.testing.assert_allclose(got, _pil_bilinear(image, 36, 54), atol=1e-2)
  tall = preprocess.resize_shorter_side(tf.constant(image.transpose(1, 0, 2)), 36)
  assert tall.shape == (54, 36, 3)


@pytest.mark.parametrize("seed", range(4))
def test_inception_crop_is_its_window_resized(seed):
  image = _random_image(50, 70, 3)
  top, left, h, w = (int(v) for v in preprocess.random_resized_crop_window(50, 70, _seed(seed)))
  got = preprocess.random_resized_crop(tf.constant(image), 24, _seed(seed)).numpy()
  expected = _pil_bilinear(image[top:top + h, left:left + w], 24, 24)
  np.testing.assert_allclose(got, expected, atol=1e-2)


def test_central_crop_matches_numpy_slice():
  image = _random_image(10, 13, 3)
  got = preprocess.central_crop(tf.constant(image), 4).numpy()
  np.testing.assert_array_equal(got, image[3:7, 4:8])


def test_central_crop_rounds_half_margins_to_even_like_torchvision():
  # torchvision's CenterCrop: top = int(round((h - size) / 2)) in Python,
  # which rounds halves to even. Margins 7 and 5 give offsets 4 and 2.
  image = _random_image(11, 9, 3)
  got = preprocess.central_crop(tf.constant(image), 4).numpy()
  np.testing.assert_array_equal(got, image[4:8, 2:6])


def test_resize_and_central_crop_shape():
  image = tf.constant(_random_image(60, 90, 3))
  out = preprocess.resize_and_central_crop(image, 32, 0.875)
  assert out.shape == (32, 32, 3)
  # The shorter side became floor(32 / 0.875) = 36 before the crop.
  resized = preprocess.resize_shorter_side(image, math.floor(32 / 0.875))
  assert tuple(resized.shape) == (36, 54, 3)


def test_resize_and_central_crop_matches_pil_resize_then_numpy_slice():
  # timm's eval: shorter side to floor(size / crop_pct), then the centre
  # size x size. 60x90 at 0.875: 36x54 (exact), crop rows 2:34, cols 11:43.
  image = _random_image(60, 90, 3)
  got = preprocess.resize_and_central_crop(tf.constant(image), 32, 0.875).numpy()
  np.testing.assert_allclose(got, _pil_bilinear(image, 36, 54)[2:34, 11:43], atol=1e-2)
  # crop_fraction 0.5: shorter side 64, i.e. 64x96, crop rows 16:48, cols 32:64.
  got = preprocess.resize_and_central_crop(tf.constant(image), 32, 0.5).numpy()
  np.testing.assert_allclose(got, _pil_bilinear(image, 64, 96)[16:48, 32:64], atol=1e-2)


def test_resize_of_a_constant_image_is_constant():
  out = preprocess.resize(tf.fill([7, 9, 1], 42.0), 5).numpy()
  np.testing.assert_allclose(out, 42.0, atol=1e-4)


# --- flip ------------------------------------------------------------------
def test_flip_is_identity_or_mirror_and_both_happen():
  image = _random_image(4, 5, 3)
  flipped = 0
  for i in range(40):
    out = preprocess.random_flip(tf.constant(image), _seed(i)).numpy()
    if np.array_equal(out, image[:, ::-1]):
      flipped += 1
    else:
      np.testing.assert_array_equal(out, image)
  assert 5 < flipped < 35


# --- RandAugment -----------------------------------------------------------
@pytest.mark.parametrize("channels", [1, 3])
def test_randaugment_keeps_shape_and_uint8_range(channels):
  image = tf.constant(_random_image(16, 12, channels))
  for i in range(30):
    out = preprocess.randaugment(image, _seed(i), 2, 9).numpy()
    assert out.shape == (16, 12, channels)
    assert out.min() >= 0 and out.max() <= 255
    np.testing.assert_array_equal(out, np.round(out))
  again = preprocess.randaugment(image, _seed(5), 2, 9)
  np.testing.assert_array_equal(again, preprocess.randaugment(image, _seed(5), 2, 9))


def test_randaugment_rejects_magnitude_out_of_range():
  with pytest.raises(ValueError, match="magnitude"):
    preprocess.randaugment(tf.zeros([4, 4, 3]), _seed(0), 2, 31)


def _shift(image, dy, dx):
  """Content moved by (dy, dx) whole pixels, zeros where nothing lands."""
  out = np.zeros_like(image)
  h, w = image.shape[:2]
  out[max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)] = \
      image[max(-dy, 0):h - max(dy, 0), max(-dx, 0):w - max(dx, 0)]
  return out


def _shear_x_reference(image, m):
  """Nearest neighbour of x_in = x_out + m * y_out, fill 0."""
  h, w = image.shape[:2]
  ys, xs = np.mgrid[0:h, 0:w]
  src = np.round(xs + m * ys).astype(int)
  inside = (src >= 0) & (src < w)
  return np.where(inside[..., None], image[ys, np.clip(src, 0, w - 1)], 0)


def _sharpness_reference(image, factor):
  """torchvision: 3x3 kernel [[1,1,1],[1,5,1],[1,1,1]] / 13 on the interior,
  rounded, border kept; then the truncating blend, in float32 as torchvision
  blends (on the border f * x + (1 - f) * x may land just below x)."""
  kernel = np.array([[1, 1, 1], [1, 5, 1], [1, 1, 1]]) / 13.0
  h, w = image.shape[:2]
  blurred = image.astype(np.float64).copy()
  for y in range(1, h - 1):
    for x in range(1, w - 1):
      blurred[y, x] = np.round(np.einsum("ij,ijc->c", kernel, image[y - 1:y + 2, x - 1:x + 2]))
  f = np.float32(factor)
  return np.floor(np.clip(f * image + (np.float32(1) - f) * blurred.astype(np.float32), 0, 255))


@pytest.mark.parametrize("magnitude, sign", [(9, 1.0), (13, -1.0)])
def test_randaugment_ops_use_torchvision_magnitudes(magnitude, sign):
  """Each op at bin `magnitude` of torchvision's RandAugment._augmentation_space
  (31 bins): shear linspace(0, 0.3), translate linspace(0, 150/331 * size)
  truncated by int(), rotate linspace(0, 30) degrees, enhance factors
  1 +- linspace(0, 0.9), posterize 8 - round(bin / 7.5) bits, solarize
  threshold linspace(255, 0). Ops in torchvision's order."""
  h, w = 12, 20  # 150/331 * 20 * 9/30 = 2.72: truncation and rounding differ
  image = _random_image(h, w, 3, seed=6)
  ops = preprocess._randaugment_ops(tf.constant(image), magnitude, tf.constant(sign))
  got = [op().numpy() for op in ops]
  assert len(got) == 14
  shear = sign * np.linspace(0.0, 0.3, 31)[magnitude]
  dx = int(sign * np.linspace(0.0, 150.0 / 331.0 * w, 31)[magnitude])
  dy = int(sign * np.linspace(0.0, 150.0 / 331.0 * h, 31)[magnitude])
  degrees = sign * np.linspace(0.0, 30.0, 31)[magnitude]
  factor = 1.0 + sign * np.linspace(0.0, 0.9, 31)[magnitude]
  bits = 8 - int(np.round(np.arange(31) / (30 / 4))[magnitude])
  threshold = np.linspace(255.0, 0.0, 31)[magnitude]
  gray = np.floor(image.astype(np.float64) @ [0.2989, 0.587, 0.114])[..., None]  # uint8 luma

  np.testing.assert_array_equal(got[0], image)
  np.testing.assert_array_equal(got[1], _shear_x_reference(image, shear))
  np.testing.assert_array_equal(
      got[2], _shear_x_reference(image.transpose(1, 0, 2), shear).transpose(1, 0, 2))
  np.testing.assert_array_equal(got[3], _shift(image, 0, dx))
  np.testing.assert_array_equal(got[4], _shift(image, dy, 0))
  np.testing.assert_array_equal(got[5], preprocess._rotate(tf.constant(image), tf.constant(degrees, tf.float32)))
  blend = lambda degenerate: np.floor(np.clip(factor * image + (1 - factor) * degenerate, 0, 255))
  np.testing.assert_array_equal(got[6], blend(0.0))
  np.testing.assert_array_equal(got[7], blend(gray))
  np.testing.assert_array_equal(got[8], blend(gray.mean()))
  np.testing.assert_array_equal(got[9], _sharpness_reference(image, factor))
  np.testing.assert_array_equal(got[10], image.astype(np.uint8) & (0xFF << (8 - bits) & 0xFF))
  np.testing.assert_array_equal(got[11], np.where(image >= threshold, 255 - image, image))


def test_randaugment_draws_both_signs():
  # A flat image is first rounded to whole values as a uint8 image would be
  # (100.6 -> 101); brightness at bin 9 of 31 then gives floor(101 * 1.27) = 128
  # or floor(101 * 0.73) = 73, and no other op gives those on a flat image.
  # One op per call: each sign has probability 1/28.
  image = tf.fill([8, 8, 3], 100.6)
  flat = set()
  for i in range(200):
    out = preprocess.randaugment(image, _seed(i), 1, 9).numpy()
    if np.ptp(out) == 0:
      flat.add(float(out[0, 0, 0]))
  assert {73.0, 128.0} <= flat


def test_randaugment_picks_each_of_the_fourteen_ops_uniformly():
  """torchvision picks op_index = randint(14): each op with probability 1/14.
  Five ops do not depend on the sign and have closed forms at bin 9:
  identity, posterize to 8 - round(9 / 7.5) = 7 bits, solarize at
  255 * (1 - 9/30) = 178.5, autocontrast and equalize (PIL; enough pixels
  that it is no identity)."""
  from PIL import Image, ImageOps
  image = np.random.default_rng(8).integers(60, 231, (40, 32, 3)).astype(np.uint8)
  lo, hi = image.min((0, 1)), image.max((0, 1))
  references = {
      "identity": image,
      "posterize": image & 0xFE,
      "solarize": np.where(image >= 178.5, 255 - image, image),
      "autocontrast": np.floor((image - lo) * (255.0 / (hi - lo))),  # 60..230: x1.5, exact
      "equalize": np.asarray(ImageOps.equalize(Image.fromarray(image))),
  }
  augment = tf.function(lambda seed: preprocess.randaugment(
      tf.constant(image, tf.float32), seed, 1, 9))
  draws = 700
  counts = dict.fromkeys(references, 0)
  for i in range(draws):
    out = augment(_seed(i)).numpy()
    for name, ref in references.items():
      if np.array_equal(out, ref):
        counts[name] += 1
  # Binomial(700, 1/14): mean 50, standard deviation 6.8.
  for name, count in counts.items():
    assert 30 <= count <= 72, (name, counts)


def test_autocontrast_leaves_a_flat_channel_unchanged():
  # PIL's autocontrast (and torchvision's) keeps a channel whose min equals
  # its max as it is, and still stretches the others.
  from PIL import Image, ImageOps
  image = np.random.default_rng(5).integers(50, 200, (8, 8, 3)).astype(np.uint8)
  image[..., 1] = 77
  got = preprocess._autocontrast(tf.constant(image, tf.float32)).numpy()
  want = np.asarray(ImageOps.autocontrast(Image.fromarray(image)))
  np.testing.assert_array_equal(got[..., 1], 77)
  np.testing.assert_array_equal(want[..., 1], 77)
  np.testing.assert_allclose(got, want, atol=1.0)


def test_posterize_and_solarize_closed_forms():
  image = _random_image(6, 6, 3)
  poster = preprocess._posterize(tf.constant(image), 4).numpy()
  np.testing.assert_array_equal(poster, (image.astype(np.uint8) & 0xF0))
  solar = preprocess._solarize(tf.constant(image), 128.0).numpy()
  np.testing.assert_array_equal(solar, np.where(image >= 128, 255 - image, image))


def test_autocontrast_stretches_each_channel_to_full_range():
  rng = np.random.default_rng(4)
  image = rng.integers(50, 200, (8, 8, 3)).astype(np.float32)
  got = preprocess._autocontrast(tf.constant(image)).numpy()
  lo, hi = image.min((0, 1)), image.max((0, 1))
  # torchvision: ((img - min) * scale).clamp(0, 255).to(uint8), which truncates.
  expected = np.floor(np.clip((image - lo) * (255.0 / (hi - lo)), 0, 255))
  assert np.mean(got == expected) > 0.99  # float32 against float64 at exact integers
  np.testing.assert_allclose(got, expected, atol=1.0)
  np.testing.assert_array_equal(got, np.floor(got))


def test_colour_ops_truncate_like_a_uint8_cast():
  """torchvision's _blend ends with .to(uint8): brightness 1.27 on 3, 101
  and 200 gives 3, 128 and 254 (3.81 truncates to 3; rounding would give 4)."""
  pixels = np.array([[[3.0, 101.0, 200.0]]], np.float32)
  got = preprocess._blend(tf.zeros_like(pixels), tf.constant(pixels), 1.27).numpy()
  np.testing.assert_array_equal(got, np.floor(np.clip(1.27 * pixels.astype(np.float64), 0, 255)))
  np.testing.assert_array_equal(got, [[[3.0, 128.0, 254.0]]])


def test_equalize_flattens_a_two_level_histogram():
  # Half the pixels 10, half 20: PIL's algorithm maps 10 -> 0 and 20 -> 128
  # (step = (64 - 32) // 255 = 0 -> no change when step is 0, so use more pixels).
  image = np.concatenate([np.full((32, 32, 1), 10.0), np.full((32, 32, 1), 20.0)])
  got = preprocess._equalize(tf.constant(image)).numpy()
  n = image.size  # 2048 pixels; step = (2048 - 1024) // 255 = 4
  step = (n - n // 2) // 255
  want_20 = min(255, (n // 2 + step // 2) // step)
  assert set(np.unique(got[:32])) == {0.0}
  assert set(np.unique(got[32:])) == {float(want_20)}


def test_equalize_matches_pil_on_a_skewed_histogram():
  # Unequal counts: PIL's step uses the count of the last non-empty bin.
  from PIL import Image, ImageOps
  rng = np.random.default_rng(3)
  image = rng.choice([10, 20, 30, 200], size=(32, 32, 3), p=[0.1, 0.2, 0.2, 0.5]).astype(np.uint8)
  got = preprocess._equalize(tf.constant(image, tf.float32)).numpy()
  np.testing.assert_array_equal(got, np.asarray(ImageOps.equalize(Image.fromarray(image))))


def test_rotation_by_ninety_degrees_matches_numpy_rot90():
  image = _random_image(9, 9, 1)  # odd side: the centre is a pixel centre
  got = preprocess._rotate(tf.constant(image), tf.constant(90.0)).numpy()
  np.testing.assert_array_equal(got, np.rot90(image, k=1, axes=(0, 1)))


def test_translate_moves_content_and_fills_zero():
  image = _random_image(5, 6, 1) + 1  # no zeros in the content
  got = preprocess._translate(tf.constant(image), tf.constant(2.0), tf.constant(0.0)).numpy()
  np.testing.assert_array_equal(got[:, 2:], image[:, :-2])
  np.testing.assert_array_equal(got[:, :2], 0)
