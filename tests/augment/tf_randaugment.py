"""RandAugment (Cubuk et al. 2020) for uint8 images, in plain TensorFlow 2, stateless randomness.

NFNets train with RandAugment after the Inception crop: each of `num_layers` layers picks one of
16 ops uniformly and always applies it at the fixed `magnitude` (the official recipe draws a per-op
probability but never uses it). Level mappings follow the TF-TPU convention the official code
ported (MAX_LEVEL 10, replace value 128, nearest-neighbour affine warps). Magnitudes above 10 (the
F3+ recipes use 15) extrapolate the same linear maps: magnitude 15 rotates by 45 degrees,
translates by 150 px, shears by 0.45, uses enhance factor 2.8 and a cutout pad of 60.

Every random draw is a `tf.random.stateless_*` op derived from the `seed` argument, so the same
(image, seed) gives the same output eagerly, under `tf.function` and in `tf.data.Dataset.map`; a
resumed run that re-derives per-example seeds reproduces its augmentations bit for bit.

Deliberate choices where the TF-TPU port is ambiguous or buggy (each documented at the op):
- Posterize keeps `int(m/10*4)` most-significant bits, so magnitude 0 is the strongest posterize
  and 15 (6 bits) is milder than 10 (4 bits), as in the official run. Shifts are clamped to [0, 7]
  as TF's CPU shift kernel does, so 0 bits behaves as 1 bit.
- Contrast blends towards the rounded mean grey level (PIL's ImageEnhance.Contrast). The TF-TPU
  port divided the pixel count by 256 instead of taking the mean, a known bug not reproduced here.
- Solarize at magnitude >= 10 (threshold >= 256) is the identity.
- AutoContrast and Sharpness use exact integer arithmetic for the official truncating float
  formulas (float32 rounding could otherwise map a channel maximum to 254).
- Images may have 3 channels (RGB) or 1 (grey: Color is then the identity, Contrast uses the
  image itself as grey).
"""

import math
from typing import Callable

from nfnets.quiet_tensorflow import tf

MAX_LEVEL = 10.0
REPLACE_VALUE = 128          # grey used for pixels uncovered by warps and for cutout
MAX_ROTATE_DEGREES = 30.0
MAX_SHEAR = 0.3
MAX_TRANSLATE_PX = 100.0
MAX_CUTOUT_PAD = 40          # half-size of the cutout square
MAX_SOLARIZE_ADD = 110
SOLARIZE_ADD_THRESHOLD = 128

OpFn = Callable[[tf.Tensor, float, tf.Tensor], tf.Tensor]


def _check_image(image: tf.Tensor) -> None:
  if image.dtype != tf.uint8:
    raise ValueError(f"randaugment needs a uint8 image, got {image.dtype}: "
                     "clip to [0, 255] and cast first.")
  if image.shape.rank != 3 or image.shape[-1] not in (1, 3):
    raise ValueError(f"randaugment needs an image of static shape [H, W, 1 or 3], got "
                     f"{image.shape}: call set_shape/ensure_shape first.")


# ------------------------------------------------------------------------------------------------
# Pixel ops (deterministic; public so tests and other pipelines can call them with explicit args)
# ------------------------------------------------------------------------------------------------

def blend(image1: tf.Tensor, image2: tf.Tensor, factor: float) -> tf.Tensor:
  """Returns image1 + factor * (image2 - image1), clipped to [0, 255] and truncated to uint8.

  factor 0 gives image1, 1 gives image2, > 1 extrapolates away from image1 (hence the clip).
  """
  a = tf.cast(image1, tf.float32)
  b = tf.cast(image2, tf.float32)
  return tf.cast(tf.clip_by_value(a + factor * (b - a), 0.0, 255.0), tf.uint8)


def _grey(image: tf.Tensor) -> tf.Tensor:
  """uint8 [H, W, 1] luma (ITU-R 601 weights, as tf.image.rgb_to_grayscale and PIL's 'L')."""
  if image.shape[-1] == 1:
    return image
  return tf.image.rgb_to_grayscale(image)


def invert(image: tf.Tensor) -> tf.Tensor:
  return 255 - image


def solarize(image: tf.Tensor, threshold: int) -> tf.Tensor:
  """Inverts pixels >= threshold. Compared in int32 so threshold 256 (magnitude 10) is identity."""
  return tf.where(tf.cast(image, tf.int32) < threshold, image, 255 - image)


def solarize_add(image: tf.Tensor, addition: int,
                 threshold: int = SOLARIZE_ADD_THRESHOLD) -> tf.Tensor:
  """Adds `addition` (saturating at 255) to the pixels below `threshold`."""
  added = tf.cast(tf.clip_by_value(tf.cast(image, tf.int32) + addition, 0, 255), tf.uint8)
  return tf.where(tf.cast(image, tf.int32) < threshold, added, image)


def posterize(image: tf.Tensor, bits: int) -> tf.Tensor:
  """Keeps the `bits` most-significant bits of each pixel.

  The shift 8 - bits is clamped to [0, 7]: TF's CPU shift kernel clamps a shift of 8 to 7 (what the
  official run did at bits 0), and bits > 8 (magnitudes > 20) must not shift negatively.
  """
  shift = tf.constant(min(max(8 - int(bits), 0), 7), tf.uint8)
  return tf.bitwise.left_shift(tf.bitwise.right_shift(image, shift), shift)


def autocontrast(image: tf.Tensor) -> tf.Tensor:
  """Stretches each channel linearly so its min maps to 0 and its max to 255; flat ones unchanged.

  Integer (x - lo) * 255 // (hi - lo) is the exact value of the official truncating float formula,
  whose float32 rounding can otherwise map the channel maximum to 254.
  """
  x = tf.cast(image, tf.int32)
  lo = tf.reduce_min(x, axis=[0, 1], keepdims=True)
  hi = tf.reduce_max(x, axis=[0, 1], keepdims=True)
  stretched = (x - lo) * 255 // tf.maximum(hi - lo, 1)
  return tf.cast(tf.where(hi > lo, stretched, x), tf.uint8)


def equalize(image: tf.Tensor) -> tf.Tensor:
  """Per-channel histogram equalisation with PIL's ImageOps.equalize lookup table."""
  channels = image.shape[-1]
  flat = tf.transpose(tf.reshape(tf.cast(image, tf.int32), [-1, channels]))   # [C, N]
  hist = tf.math.bincount(flat, minlength=256, maxlength=256, axis=-1)          # [C, 256]
  # PIL leaves the count of the brightest present value out of the step, so it maps to <= 255.
  brightest_count = tf.gather(hist, tf.reduce_max(flat, axis=1), batch_dims=1)
  step = (tf.shape(flat)[1] - brightest_count) // 255                          # [C]
  safe_step = tf.maximum(step, 1)[:, None]
  # lut[v] = (step // 2 + #pixels below v) // step: the rounded rank of v in units of `step`.
  lut = (tf.cumsum(hist, axis=1, exclusive=True) + safe_step // 2) // safe_step
  lut = tf.clip_by_value(lut, 0, 255)
  # step 0 means (almost) a single value: leave the channel alone.
  out = tf.where((step > 0)[:, None], tf.gather(lut, flat, batch_dims=1), flat)
  return tf.cast(tf.reshape(tf.transpose(out), tf.shape(image)), tf.uint8)


def color(image: tf.Tensor, factor: float) -> tf.Tensor:
  """Saturation: blend from the grey image (factor 0) through the image (1) and beyond."""
  return blend(tf.broadcast_to(_grey(image), tf.shape(image)), image, factor)


def contrast(image: tf.Tensor, factor: float) -> tf.Tensor:
  """Blend from a flat image at the rounded mean grey level (factor 0) through the image (1)."""
  mean = tf.reduce_mean(tf.cast(_grey(image), tf.float32))
  flat = tf.fill(tf.shape(image), tf.cast(tf.floor(mean + 0.5), tf.uint8))
  return blend(flat, image, factor)


def brightness(image: tf.Tensor, factor: float) -> tf.Tensor:
  """Blend from black (factor 0) through the image (1) and beyond."""
  return blend(tf.zeros_like(image), image, factor)


def sharpness(image: tf.Tensor, factor: float) -> tf.Tensor:
  """Blend from a smoothed image (factor 0) through the image (1); > 1 sharpens.

  The smoothing kernel is PIL's SMOOTH, [[1,1,1],[1,5,1],[1,1,1]]/13, on the interior; the 1-pixel
  border keeps the original values (as the official VALID-conv version). Needs H, W >= 3.
  """
  x = tf.cast(image, tf.int32)
  h, w = tf.shape(x)[0], tf.shape(x)[1]
  total = 4 * x[1:-1, 1:-1]        # centre weight 5 = 4 here + 1 in the 3x3 sum below
  for dy in range(3):
    for dx in range(3):
      total += x[dy:h - 2 + dy, dx:w - 2 + dx]
  smooth = total // 13             # truncation, as the official cast of the float conv
  pad = [[1, 1], [1, 1], [0, 0]]
  interior = tf.pad(tf.ones_like(smooth, tf.bool), pad)
  degenerate = tf.cast(tf.where(interior, tf.pad(smooth, pad), x), tf.uint8)
  return blend(degenerate, image, factor)


# ------------------------------------------------------------------------------------------------
# Geometric ops: nearest-neighbour projective warps, uncovered pixels filled with REPLACE_VALUE
# ------------------------------------------------------------------------------------------------

def _warp(image: tf.Tensor, transform: list) -> tf.Tensor:
  """Output pixel (x, y) reads input (a0 x + a1 y + a2, b0 x + b1 y + b2): maps output -> input."""
  size = tf.shape(image)[:2]
  out = tf.raw_ops.ImageProjectiveTransformV3(
      images=image[None],
      transforms=tf.reshape(tf.cast(tf.stack(transform), tf.float32), [1, 8]),
      output_shape=size,
      fill_value=tf.constant(REPLACE_VALUE, tf.float32),
      interpolation="NEAREST",
      fill_mode="CONSTANT")
  return tf.ensure_shape(out[0], image.shape)


def rotate(image: tf.Tensor, degrees: tf.Tensor) -> tf.Tensor:
  """Rotates counter-clockwise (as displayed, rows pointing down) about the image centre."""
  theta = tf.cast(degrees, tf.float32) * (math.pi / 180.0)
  cos, sin = tf.cos(theta), tf.sin(theta)
  hw = tf.cast(tf.shape(image)[:2], tf.float32)
  cy, cx = (hw[0] - 1.0) / 2.0, (hw[1] - 1.0) / 2.0
  # input = R(theta) (output - centre) + centre, with R = [[cos, -sin], [sin, cos]] in (x, y).
  return _warp(image, [cos, -sin, cx - cos * cx + sin * cy,
                       sin, cos, cy - sin * cx - cos * cy, 0.0, 0.0])


def shear_x(image: tf.Tensor, level: tf.Tensor) -> tf.Tensor:
  """Output (x, y) reads input (x + level * y, y): row y moves left by level * y pixels."""
  level = tf.cast(level, tf.float32)
  return _warp(image, [1.0, level, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0])


def shear_y(image: tf.Tensor, level: tf.Tensor) -> tf.Tensor:
  """Output (x, y) reads input (x, y + level * x): column x moves up by level * x pixels."""
  level = tf.cast(level, tf.float32)
  return _warp(image, [1.0, 0.0, 0.0, level, 1.0, 0.0, 0.0, 0.0])


def translate_x(image: tf.Tensor, pixels: tf.Tensor) -> tf.Tensor:
  """Moves the content right by `pixels` (left if negative)."""
  pixels = tf.cast(pixels, tf.float32)
  return _warp(image, [1.0, 0.0, -pixels, 0.0, 1.0, 0.0, 0.0, 0.0])


def translate_y(image: tf.Tensor, pixels: tf.Tensor) -> tf.Tensor:
  """Moves the content down by `pixels` (up if negative)."""
  pixels = tf.cast(pixels, tf.float32)
  return _warp(image, [1.0, 0.0, 0.0, 0.0, 1.0, -pixels, 0.0, 0.0])


def cutout(image: tf.Tensor, pad_size: int, center: tf.Tensor) -> tf.Tensor:
  """Fills rows [cy - pad, cy + pad) x cols [cx - pad, cx + pad) (clipped) with REPLACE_VALUE.

  Args:
    image: uint8 [H, W, C].
    pad_size: half the side of the square; 0 leaves the image unchanged.
    center: int32 [2], (row, col) of the square's centre.
  """
  center = tf.cast(center, tf.int32)
  rows = tf.range(tf.shape(image)[0])[:, None]
  cols = tf.range(tf.shape(image)[1])[None, :]
  inside = ((rows >= center[0] - pad_size) & (rows < center[0] + pad_size)
            & (cols >= center[1] - pad_size) & (cols < center[1] + pad_size))
  return tf.where(inside[:, :, None], tf.constant(REPLACE_VALUE, tf.uint8), image)


# ------------------------------------------------------------------------------------------------
# The op table: name -> fn(image, magnitude, seed); magnitude 0..10, more extrapolates linearly
# ------------------------------------------------------------------------------------------------

def _random_sign(value: float, seed: tf.Tensor) -> tf.Tensor:
  """+value or -value with probability 1/2 each (the official geometric ops negate at random)."""
  return tf.where(tf.random.stateless_uniform([], seed) < 0.5, -value, value)


def _enhance_factor(magnitude: float) -> float:
  # Magnitude 0..10 spans factors 0.1..1.9 around the identity factor 1.0 (reached at magnitude 5).
  return magnitude / MAX_LEVEL * 1.8 + 0.1


def _op_cutout(image: tf.Tensor, magnitude: float, seed: tf.Tensor) -> tf.Tensor:
  row_seed, col_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
  shape = tf.shape(image)
  center = tf.stack([
      tf.random.stateless_uniform([], row_seed, minval=0, maxval=shape[0], dtype=tf.int32),
      tf.random.stateless_uniform([], col_seed, minval=0, maxval=shape[1], dtype=tf.int32)])
  return cutout(image, int(magnitude / MAX_LEVEL * MAX_CUTOUT_PAD), center)


# Order matters: randaugment picks ops by index into this table (the official order).
OPS: dict[str, OpFn] = {
    "AutoContrast": lambda image, m, seed: autocontrast(image),
    "Equalize": lambda image, m, seed: equalize(image),
    "Invert": lambda image, m, seed: invert(image),
    "Rotate": lambda image, m, seed: rotate(
        image, _random_sign(m / MAX_LEVEL * MAX_ROTATE_DEGREES, seed)),
    "Posterize": lambda image, m, seed: posterize(image, int(m / MAX_LEVEL * 4)),
    "Solarize": lambda image, m, seed: solarize(image, int(m / MAX_LEVEL * 256)),
    "Color": lambda image, m, seed: color(image, _enhance_factor(m)),
    "Contrast": lambda image, m, seed: contrast(image, _enhance_factor(m)),
    "Brightness": lambda image, m, seed: brightness(image, _enhance_factor(m)),
    "Sharpness": lambda image, m, seed: sharpness(image, _enhance_factor(m)),
    "ShearX": lambda image, m, seed: shear_x(image, _random_sign(m / MAX_LEVEL * MAX_SHEAR, seed)),
    "ShearY": lambda image, m, seed: shear_y(image, _random_sign(m / MAX_LEVEL * MAX_SHEAR, seed)),
    "TranslateX": lambda image, m, seed: translate_x(
        image, _random_sign(m / MAX_LEVEL * MAX_TRANSLATE_PX, seed)),
    "TranslateY": lambda image, m, seed: translate_y(
        image, _random_sign(m / MAX_LEVEL * MAX_TRANSLATE_PX, seed)),
    "Cutout": _op_cutout,
    "SolarizeAdd": lambda image, m, seed: solarize_add(
        image, int(m / MAX_LEVEL * MAX_SOLARIZE_ADD)),
}
OP_NAMES: tuple[str, ...] = tuple(OPS)


# ------------------------------------------------------------------------------------------------
# Public entry points
# ------------------------------------------------------------------------------------------------

def _check_seed(seed: tf.Tensor) -> tf.Tensor:
  seed = tf.convert_to_tensor(seed)
  if seed.dtype not in (tf.int32, tf.int64) or not seed.shape.is_compatible_with([2]):
    raise ValueError(f"seed must be an int32/int64 tensor of shape [2], got {seed.dtype} "
                     f"{seed.shape}.")
  return seed


def _layer_choice(seed: tf.Tensor, layer: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
  """(op index, op seed) for one layer; folding in the layer index keeps layers independent."""
  choice_seed, op_seed = tf.unstack(tf.random.experimental.stateless_split(
      tf.random.experimental.stateless_fold_in(seed, layer), 2))
  index = tf.random.stateless_uniform([], choice_seed, minval=0, maxval=len(OPS), dtype=tf.int32)
  return index, op_seed


def randaugment_plan(num_layers: int, seed: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
  """The random choices randaugment makes for `seed`: which op each layer applies, and its op seed.

  Args:
    num_layers: number of ops applied in sequence.
    seed: int32/int64 [2] stateless seed.

  Returns:
    (op_indices int32 [num_layers] into OP_NAMES, op_seeds int32 [num_layers, 2]).
  """
  seed = _check_seed(seed)
  choices = [_layer_choice(seed, tf.constant(layer)) for layer in range(num_layers)]
  if not choices:
    return tf.zeros([0], tf.int32), tf.zeros([0, 2], tf.int32)
  return tf.stack([c[0] for c in choices]), tf.stack([c[1] for c in choices])


# AutoGraph has nothing to convert here (no tensor-dependent Python control flow); skipping it saves
# seconds of tracing when tf.data.Dataset.map would otherwise recurse into all 16 ops.
@tf.autograph.experimental.do_not_convert
def randaugment(image: tf.Tensor, num_layers: int, magnitude: float, seed: tf.Tensor) -> tf.Tensor:
  """Applies `num_layers` uniformly chosen ops from OPS at `magnitude`, all randomness from `seed`.

  Args:
    image: uint8 [H, W, 3] (or [H, W, 1]); H and W may be dynamic, the channel count must be static.
    num_layers: ops applied in sequence (the official NFNet recipes use 4); 0 returns the image.
    magnitude: level on the 0..10 scale; larger values extrapolate the same linear maps.
    seed: int32/int64 tensor of shape [2]; the same seed gives the same output.

  Returns:
    uint8 tensor of the same shape as `image`.
  """
  image = tf.convert_to_tensor(image)
  _check_image(image)
  if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 0:
    raise ValueError(f"num_layers must be a non-negative int, got {num_layers!r}.")
  if (isinstance(magnitude, bool) or not isinstance(magnitude, (int, float))
      or not 0 <= magnitude < math.inf):
    raise ValueError(f"magnitude must be a finite number >= 0 (0..10, 15 for F3+), "
                     f"got {magnitude!r}.")
  magnitude = float(magnitude)
  seed = _check_seed(seed)
  static_shape = image.shape

  def one_layer(layer: tf.Tensor, x: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    index, op_seed = _layer_choice(seed, layer)
    # switch_case runs only the chosen branch (a Case op in graphs); ensure_shape keeps the
    # branches' static shapes equal, since the affine warps lose them.
    branches = [lambda fn=fn: tf.ensure_shape(fn(x, magnitude, op_seed), static_shape)
                for fn in OPS.values()]
    return layer + 1, tf.switch_case(index, branches)

  # A while loop (not a Python loop) traces the 16 branches once, not once per layer.
  _, image = tf.while_loop(lambda layer, _: layer < num_layers, one_layer, (tf.constant(0), image))
  return image
