"""Image operations for the tf.data input pipeline.

Every random op is *stateless*: it takes an explicit `seed` (an int32/int64
tensor of shape [2]) so that an example's augmentation depends only on the
run seed and the example's position in the stream. That is what lets a
resumed run reproduce the batches of an uninterrupted one.

Images travel as float32 in [0, 255] between ops and are normalised last.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import tensorflow as tf

# torchvision / timm ImageNet statistics, on the [0, 1] scale.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# torchvision RandomResizedCrop defaults.
CROP_RATIO_RANGE = (3.0 / 4.0, 4.0 / 3.0)
CROP_ATTEMPTS = 10


# --------------------------------------------------------------------------
# Decoding and channels
# --------------------------------------------------------------------------
def decode_image(encoded: tf.Tensor, channels: int = 0) -> tf.Tensor:
  """Decodes PNG/JPEG/GIF/BMP bytes to uint8 [H, W, C]; passes pixels through."""
  if encoded.dtype != tf.string:  # Already decoded (e.g. by tfds).
    return encoded
  return tf.io.decode_image(encoded, channels=channels, expand_animations=False)


def to_channels(image: tf.Tensor, channels: int) -> tf.Tensor:
  """Converts a float image to the number of channels the model expects.

  Grayscale -> RGB tiles the single channel; RGB -> grayscale uses the ITU-R
  601 luma weights (tf.image.rgb_to_grayscale), as torchvision does.
  """
  have = image.shape[-1]
  if have is None:
    raise ValueError("image channel count must be static")
  if have == channels:
    return image
  if have == 1 and channels == 3:
    return tf.tile(image, [1, 1, 3])
  if have == 3 and channels == 1:
    return tf.image.rgb_to_grayscale(image)
  if have == 4 and channels in (1, 3):  # RGBA: drop alpha first.
    return to_channels(image[..., :3], channels)
  raise ValueError(f"cannot convert {have} channels to {channels}")


def normalize(image: tf.Tensor, method: str) -> tf.Tensor:
  """Maps a float image in [0, 255] to the model's input range.

  'minus_one_to_one': x / 127.5 - 1 (big_vision / vit_jax recipes).
  'imagenet': (x / 255 - mean) / std per channel (timm / torchvision recipes);
  a one-channel image uses the mean of the three channel statistics.
  """
  if method == "minus_one_to_one":
    return image / 127.5 - 1.0
  if method == "imagenet":
    mean, std = IMAGENET_MEAN, IMAGENET_STD
    if image.shape[-1] == 1:
      mean, std = (sum(mean) / 3,), (sum(std) / 3,)
    mean = tf.constant(mean, tf.float32)
    std = tf.constant(std, tf.float32)
    return (image / 255.0 - mean) / std
  raise ValueError(
      f"unknown normalize={method!r}; expected 'minus_one_to_one' or 'imagenet'"
  )


# --------------------------------------------------------------------------
# Geometry
# --------------------------------------------------------------------------
def resize(image: tf.Tensor, size: int | Sequence[int],
           method: str = "bilinear") -> tf.Tensor:
  """Resizes to [size, size] (or [h, w]); float32 out, antialiased downscale."""
  hw = [size, size] if isinstance(size, int) else list(size)
  image = tf.cast(image, tf.float32)
  return tf.image.resize(image, hw, method=method, antialias=True)


def resize_shorter_side(image: tf.Tensor, side: int,
                        method: str = "bilinear") -> tf.Tensor:
  """Resizes keeping the aspect ratio so that the shorter side becomes `side`.

  The longer side is int(side * long / short), truncated, as torchvision's
  Resize(int) computes it.
  """
  shape = tf.shape(image)
  short = tf.minimum(shape[0], shape[1])
  new_h = side * shape[0] // short
  new_w = side * shape[1] // short
  image = tf.cast(image, tf.float32)
  return tf.image.resize(image, [new_h, new_w], method=method, antialias=True)


def central_crop(image: tf.Tensor, size: int) -> tf.Tensor:
  """Takes the centre size x size window (image must be at least that big).

  The offsets are round(margin / 2) with halves to even, as torchvision's
  CenterCrop computes them with Python's round (tf.round also rounds half to
  even): a margin of 7 starts at 4, not 3.
  """
  shape = tf.shape(image)
  top = tf.cast(tf.round((shape[0] - size) / 2), tf.int32)
  left = tf.cast(tf.round((shape[1] - size) / 2), tf.int32)
  return tf.image.crop_to_bounding_box(image, top, left, size, size)


def resize_and_central_crop(image: tf.Tensor, size: int, crop_fraction: float,
                            method: str = "bilinear") -> tf.Tensor:
  """Standard ImageNet eval: shorter side to size/crop_fraction, centre crop."""
  side = int(math.floor(size / crop_fraction))
  return central_crop(resize_shorter_side(image, side, method), size)


def random_resized_crop_window(
    height: tf.Tensor, width: tf.Tensor, seed: tf.Tensor,
    area_range: Sequence[float] = (0.08, 1.0),
    ratio_range: Sequence[float] = CROP_RATIO_RANGE,
) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor, tf.Tensor]:
  """Samples an inception-style crop window: (top, left, crop_h, crop_w).

  The torchvision RandomResizedCrop algorithm, written with stateless ops:
  up to 10 (area, log-aspect) draws, the first that fits wins; if none fits,
  a centre crop clamped to the aspect ratio range.
  """
  area_seed, ratio_seed, offset_seed = tf.unstack(
      tf.random.experimental.stateless_split(seed, num=3))
  h = tf.cast(height, tf.float32)
  w = tf.cast(width, tf.float32)
  lo_ratio, hi_ratio = ratio_range

  target_area = h * w * tf.random.stateless_uniform(
      [CROP_ATTEMPTS], area_seed, area_range[0], area_range[1])
  log_ratio = tf.random.stateless_uniform(
      [CROP_ATTEMPTS], ratio_seed, math.log(lo_ratio), math.log(hi_ratio))
  aspect = tf.exp(log_ratio)
  crop_w = tf.round(tf.sqrt(target_area * aspect))
  crop_h = tf.round(tf.sqrt(target_area / aspect))
  fits = (crop_w > 0) & (crop_w <= w) & (crop_h > 0) & (crop_h <= h)

  # Fallback: the whole image, clamped to the ratio range (torchvision).
  in_ratio = w / h
  fallback_w = tf.where(in_ratio > hi_ratio, tf.round(h * hi_ratio), w)
  fallback_h = tf.where(in_ratio < lo_ratio, tf.round(w / lo_ratio), h)

  any_fits = tf.reduce_any(fits)
  first = tf.argmax(tf.cast(fits, tf.int32))  # index of the first True
  crop_h = tf.cast(tf.where(any_fits, crop_h[first], fallback_h), tf.int32)
  crop_w = tf.cast(tf.where(any_fits, crop_w[first], fallback_w), tf.int32)

  # Offsets uniform over all valid positions (randint(0, H - h + 1)); the
  # fallback is centred.
  span = tf.stack([height - crop_h + 1, width - crop_w + 1])
  offsets = tf.random.stateless_uniform(
      [2], offset_seed, minval=0, maxval=tf.int32.max, dtype=tf.int32) % span
  centred = (tf.stack([height - crop_h, width - crop_w])) // 2
  offsets = tf.where(any_fits, offsets, centred)
  return offsets[0], offsets[1], crop_h, crop_w


def random_resized_crop(image: tf.Tensor, size: int, seed: tf.Tensor,
                        area_range: Sequence[float] = (0.08, 1.0),
                        method: str = "bilinear") -> tf.Tensor:
  """Inception crop: a random window (area, aspect) resized to size x size."""
  shape = tf.shape(image)
  top, left, crop_h, crop_w = random_resized_crop_window(
      shape[0], shape[1], seed, area_range)
  window = tf.image.crop_to_bounding_box(image, top, left, crop_h, crop_w)
  return resize(window, size, method)


def random_flip(image: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
  """Horizontal flip with probability 1/2."""
  return tf.image.stateless_random_flip_left_right(image, seed)


# --------------------------------------------------------------------------
# RandAugment (torchvision defaults: 2 ops, magnitude 9 of 31 bins, fill 0,
# nearest interpolation). Works on float images holding uint8 values.
# --------------------------------------------------------------------------
RANDAUGMENT_BINS = 31


def _blend(degenerate: tf.Tensor, image: tf.Tensor, factor) -> tf.Tensor:
  """torchvision _blend: factor*image + (1-factor)*degenerate, clipped, then
  truncated as its cast back to uint8 does (PIL's blend truncates too)."""
  return tf.floor(tf.clip_by_value(factor * image + (1.0 - factor) * degenerate, 0, 255))


def _grayscale3(image: tf.Tensor) -> tf.Tensor:
  """Luma of an RGB (or the image itself if grayscale), keeping C channels."""
  if image.shape[-1] == 1:
    return image
  gray = tf.floor(tf.image.rgb_to_grayscale(image))  # torchvision truncates uint8
  return tf.tile(gray, [1, 1, image.shape[-1]])


def _affine(image: tf.Tensor, matrix: tf.Tensor) -> tf.Tensor:
  """Applies an output->input 3x3 affine map, nearest neighbour, fill 0."""
  transform = tf.reshape(matrix, [9])[:8][tf.newaxis]
  out = tf.raw_ops.ImageProjectiveTransformV3(
      images=image[tf.newaxis], transforms=transform,
      output_shape=tf.shape(image)[:2], fill_value=0.0,
      interpolation="NEAREST", fill_mode="CONSTANT")
  return out[0]


def _shear_x(image, m):
  # torchvision shears about the top-left corner: x_in = x_out + m * y_out.
  return _affine(image, tf.stack([[1.0, m, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]))


def _shear_y(image, m):
  return _affine(image, tf.stack([[1.0, 0.0, 0.0], [m, 1.0, 0.0], [0.0, 0.0, 1.0]]))


def _translate(image, dx, dy):
  # The content moves by (dx, dy), so the input pixel is (x - dx, y - dy).
  return _affine(image, tf.stack([[1.0, 0.0, -dx], [0.0, 1.0, -dy], [0.0, 0.0, 1.0]]))


def _rotate(image, degrees):
  """Counter-clockwise rotation about the image centre (torchvision sign)."""
  shape = tf.cast(tf.shape(image), tf.float32)
  cy, cx = (shape[0] - 1) / 2, (shape[1] - 1) / 2
  a = degrees * math.pi / 180.0
  cos, sin = tf.cos(a), tf.sin(a)
  # Output->input: rotate the output coordinates back by -a around the centre.
  # With y pointing down, a counter-clockwise on-screen turn of the content
  # maps output (x, y) to input (cx + cos*(x-cx) - sin*(y-cy), cy + sin*(x-cx) + cos*(y-cy)).
  matrix = tf.stack([
      [cos, -sin, cx - cos * cx + sin * cy],
      [sin, cos, cy - sin * cx - cos * cy],
      [0.0, 0.0, 1.0]])
  return _affine(image, matrix)


def _contrast(image, factor):
  mean = tf.reduce_mean(_grayscale3(image)[..., :1])
  return _blend(mean, image, factor)


def _sharpness(image, factor):
  """Blends with a 3x3 smoothed copy; the border pixels stay as they are."""
  kernel = tf.constant([[1, 1, 1], [1, 5, 1], [1, 1, 1]], tf.float32) / 13.0
  channels = image.shape[-1]
  kernel = tf.tile(kernel[:, :, None, None], [1, 1, channels, 1])
  blurred = tf.nn.depthwise_conv2d(image[None], kernel, [1, 1, 1, 1], "VALID")[0]
  blurred = tf.round(blurred)  # torchvision rounds the blurred uint8 image
  degenerate = tf.pad(blurred, [[1, 1], [1, 1], [0, 0]])
  border = tf.pad(tf.zeros_like(blurred, tf.bool), [[1, 1], [1, 1], [0, 0]],
                  constant_values=True)
  degenerate = tf.where(border, image, degenerate)
  return _blend(degenerate, image, factor)


def _posterize(image, bits):
  shift = tf.cast(8 - bits, tf.int32)
  pixels = tf.cast(image, tf.int32)
  return tf.cast(tf.bitwise.left_shift(
      tf.bitwise.right_shift(pixels, shift), shift), tf.float32)


def _solarize(image, threshold):
  return tf.where(image >= threshold, 255.0 - image, image)


def _autocontrast(image):
  """Per channel: stretch [min, max] to [0, 255]; flat channels unchanged."""
  lo = tf.reduce_min(image, axis=[0, 1], keepdims=True)
  hi = tf.reduce_max(image, axis=[0, 1], keepdims=True)
  flat = hi <= lo
  scale = tf.where(flat, 1.0, 255.0 / tf.where(flat, 1.0, hi - lo))
  lo = tf.where(flat, 0.0, lo)
  return tf.floor(tf.clip_by_value((image - lo) * scale, 0, 255))  # uint8 cast: truncation


def _equalize_channel(channel):
  """torchvision/PIL histogram equalisation of one uint8-valued channel."""
  pixels = tf.cast(tf.reshape(channel, [-1]), tf.int32)
  hist = tf.math.bincount(pixels, minlength=256, maxlength=256)
  nonzero = tf.boolean_mask(hist, hist > 0)
  step = (tf.reduce_sum(hist) - nonzero[-1]) // 255

  def equalize():
    lut = (tf.cumsum(hist) + step // 2) // tf.maximum(step, 1)
    lut = tf.clip_by_value(tf.concat([[0], lut[:-1]], 0), 0, 255)
    return tf.cast(tf.gather(lut, pixels), tf.float32)

  out = tf.cond(step == 0, lambda: tf.cast(pixels, tf.float32), equalize)
  return tf.reshape(out, tf.shape(channel))


def _equalize(image):
  channels = [_equalize_channel(image[..., c]) for c in range(image.shape[-1])]
  return tf.stack(channels, axis=-1)


def _randaugment_ops(image, magnitude: int, sign):
  """The 14 torchvision RandAugment ops at a fixed magnitude bin."""
  bins = RANDAUGMENT_BINS - 1
  frac = magnitude / bins  # position on each op's linspace(0, max, 31)
  shape = tf.cast(tf.shape(image), tf.float32)
  shear = sign * 0.3 * frac
  enhance = 1.0 + sign * 0.9 * frac
  # torchvision truncates the translation to whole pixels.
  dx = sign * tf.floor(150.0 / 331.0 * shape[1] * frac)
  dy = sign * tf.floor(150.0 / 331.0 * shape[0] * frac)
  bits = 8 - int(round(magnitude / (bins / 4)))
  threshold = 255.0 * (1.0 - frac)
  # torchvision's Color (saturation): blend with the grayscale image.
  return [
      lambda: image,                                        # Identity
      lambda: _shear_x(image, shear),                       # ShearX
      lambda: _shear_y(image, shear),                       # ShearY
      lambda: _translate(image, dx, 0.0),                   # TranslateX
      lambda: _translate(image, 0.0, dy),                   # TranslateY
      lambda: _rotate(image, sign * 30.0 * frac),           # Rotate
      lambda: _blend(0.0, image, enhance),                  # Brightness
      lambda: _blend(_grayscale3(image), image, enhance),   # Color
      lambda: _contrast(image, enhance),                    # Contrast
      lambda: _sharpness(image, enhance),                   # Sharpness
      lambda: _posterize(image, bits),                      # Posterize
      lambda: _solarize(image, threshold),                  # Solarize
      lambda: _autocontrast(image),                         # AutoContrast
      lambda: _equalize(image),                             # Equalize
  ]


NUM_RANDAUGMENT_OPS = 14


def randaugment(image: tf.Tensor, seed: tf.Tensor, num_ops: int = 2,
                magnitude: int = 9) -> tf.Tensor:
  """Applies `num_ops` uniformly chosen ops, each with a random sign.

  `image` is float32 holding values in [0, 255]; it is rounded to whole
  values first, because the ops are defined on uint8 images.
  """
  if not 0 <= magnitude < RANDAUGMENT_BINS:
    raise ValueError(f"RandAugment magnitude must be in [0, 30], got {magnitude}")
  image = tf.round(tf.clip_by_value(image, 0, 255))
  for op_seed in tf.unstack(tf.random.experimental.stateless_split(seed, num_ops)):
    choice_seed, sign_seed = tf.unstack(
        tf.random.experimental.stateless_split(op_seed, 2))
    choice = tf.random.stateless_uniform(
        [], choice_seed, 0, NUM_RANDAUGMENT_OPS, dtype=tf.int32)
    sign = tf.where(tf.random.stateless_uniform([], sign_seed) < 0.5, -1.0, 1.0)
    shape = image.shape
    image = tf.switch_case(choice, _randaugment_ops(image, magnitude, sign))
    image = tf.ensure_shape(tf.round(image), shape)
  return image
