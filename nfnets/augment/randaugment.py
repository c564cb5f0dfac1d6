"""RandAugment (Cubuk et al. 2020) in pure JAX, per example, inside a jitted/pmapped train step.

This mirrors the TensorFlow oracle `tests/augment/tf_randaugment.py` op by op: the same 16 ops in
the same order (`OP_NAMES`), the same level maps (magnitudes above 10 extrapolate linearly) and
the same integer/float arithmetic, so a uint8 image gives the same uint8 result. Only the random
stream differs (jax.random, not tf.random.stateless_*): keys and TF seeds pick different ops.

Fidelity, checked on real photographs by tests/augment/test_randaugment.py (XLA:CPU only):
- Every pixel/colour op and cutout equals the TF op exactly, at every magnitude.
- The warp equals `ImageProjectiveTransformV3(NEAREST, CONSTANT, fill 128)` exactly for the
  same float32 coefficients, so shear and translate are exact. Rotate may differ only where
  its cos/sin differ from TF's (Eigen's) by an ulp, and then only on pixels whose source
  coordinate is a rounding tie (tested: within 1e-4 of k + 1/2, < 2% of pixels; seen: none).
  The op table's cos/sin are float64-rounded constants, equal to TF's except at 45 degrees.
Exactness holds because every float step is one IEEE op in the reference's order. XLA:CPU
contracts a*b + c into a fused multiply-add, which TF's (non-FMA) kernels never do, so every
product that feeds a sum comes from a numpy-built table (grey) or passes a clamp that cannot
change the result (`_no_fma`); without that, blend differs from TF on 0.05% of (pixel, factor)
pairs and grey on a few dozen of the 2^24 colours (lax.optimization_barrier does not help:
XLA:CPU removes it before fusion). The contrast mean is an exact integer division.

Cost: under vmap (randaugment_batch) `lax.switch` becomes a select, so every layer evaluates
all 16 branches for every image: roughly 150-200 elementwise ops per pixel-channel per layer
(four blends, two grey conversions, a histogram scatter-add, five warps with a gather each),
about 0.1 G ops for a 224x224x3 image at 4 layers. That is well under 1% of an NFNet-F0
training step's FLOPs per image, but memory-bound work, so measure it on the accelerator.
"""

import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

MAX_LEVEL = 10.0
REPLACE_VALUE = 128          # grey for pixels uncovered by warps and for cutout
MAX_ROTATE_DEGREES = 30.0
MAX_SHEAR = 0.3
MAX_TRANSLATE_PX = 100.0
MAX_CUTOUT_PAD = 40          # half the side of the cutout square
MAX_SOLARIZE_ADD = 110
SOLARIZE_ADD_THRESHOLD = 128

OP_NAMES: tuple[str, ...] = (
    "AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize", "Color",
    "Contrast", "Brightness", "Sharpness", "ShearX", "ShearY", "TranslateX", "TranslateY",
    "Cutout", "SolarizeAdd")
NUM_OPS = len(OP_NAMES)

Scalar = jax.Array | float | int


def _check_image(image: jax.Array) -> None:
  if image.dtype != jnp.uint8:
    raise ValueError(f"randaugment needs a uint8 image, got {image.dtype}: clip and cast first.")
  if image.ndim != 3 or image.shape[-1] not in (1, 3):
    raise ValueError(f"randaugment needs an image of shape [H, W, 1 or 3], got {image.shape}.")


def _no_fma(product: jax.Array, bound: float) -> jax.Array:
  """`product` clamped to +-bound, a bound chosen so that the clamp cannot change the result.

  Between a multiply and the add it feeds, it keeps XLA/LLVM from fusing them into an FMA.
  """
  return jnp.clip(product, -bound, bound)


# Any source-coordinate term beyond 2^24 pixels is far outside every image (and beyond float32's
# integer resolution), so clamping it there cannot change which pixel is read.
_COORD_BOUND = float(2**24)


# ------------------------------------------------------------------------------------------------
# Pixel ops
# ------------------------------------------------------------------------------------------------

def blend(image1: jax.Array, image2: jax.Array, factor: Scalar) -> jax.Array:
  """Returns image1 + factor * (image2 - image1), clipped to [0, 255] and truncated to uint8.

  Args:
    image1: uint8 image reached at factor 0.
    image2: uint8 image reached at factor 1 (> 1 extrapolates, hence the clip).
    factor: float32 scalar, may be traced.

  Returns:
    uint8 image of image1's shape.
  """
  a, b = image1.astype(jnp.float32), image2.astype(jnp.float32)
  # image1 is in [0, 255], so a term beyond +-1024 saturates the clip whether clamped or not.
  scaled = _no_fma(jnp.asarray(factor, jnp.float32) * (b - a), 1024.0)
  return jnp.clip(a + scaled, 0.0, 255.0).astype(jnp.uint8)


# tf.image.rgb_to_grayscale on uint8 computes, in float32 and in this order,
# ((r/255*wr + g/255*wg) + b/255*wb) * 255.5, truncated (checked against all 2^24 colours).
# Each product depends on one uint8 only, so numpy tabulates them once, exactly: [3, 256].
_GREY_TABLES = (np.array([0.2989, 0.5870, 0.1140], np.float32)[:, None]
                * (np.arange(256, dtype=np.float32) * np.float32(1.0 / 255.0))[None, :])


def _grey(image: jax.Array) -> jax.Array:
  """uint8 [H, W, 1] luma, bit-equal to tf.image.rgb_to_grayscale; grey images pass through."""
  if image.shape[-1] == 1:
    return image
  x = image.astype(jnp.int32)
  tables = jnp.asarray(_GREY_TABLES)
  total = (tables[0][x[..., 0]] + tables[1][x[..., 1]]) + tables[2][x[..., 2]]
  return (total * jnp.float32(255.5)).astype(jnp.uint8)[..., None]


def invert(image: jax.Array) -> jax.Array:
  """Returns 255 - image."""
  return 255 - image


def solarize(image: jax.Array, threshold: Scalar) -> jax.Array:
  """Inverts pixels >= threshold (int32 compare, so threshold 256 is the identity)."""
  return jnp.where(image.astype(jnp.int32) < threshold, image, 255 - image)


def solarize_add(image: jax.Array, addition: Scalar,
                 threshold: Scalar = SOLARIZE_ADD_THRESHOLD) -> jax.Array:
  """Adds `addition` (saturating at 0 and 255) to the pixels below `threshold`."""
  x = image.astype(jnp.int32)
  added = jnp.clip(x + addition, 0, 255).astype(jnp.uint8)
  return jnp.where(x < threshold, added, image)


def posterize(image: jax.Array, bits: Scalar) -> jax.Array:
  """Keeps the `bits` most-significant bits; the shift 8 - bits is clamped to [0, 7] as in TF."""
  shift = jnp.clip(8 - jnp.asarray(bits, jnp.int32), 0, 7).astype(jnp.uint8)
  return jnp.left_shift(jnp.right_shift(image, shift), shift)


def autocontrast(image: jax.Array) -> jax.Array:
  """Stretches each channel so its min maps to 0 and its max to 255; flat channels unchanged.

  Integer arithmetic, as the reference: the exact value of the truncating float formula.
  """
  x = image.astype(jnp.int32)
  lo, hi = x.min(axis=(0, 1), keepdims=True), x.max(axis=(0, 1), keepdims=True)
  stretched = (x - lo) * 255 // jnp.maximum(hi - lo, 1)
  return jnp.where(hi > lo, stretched, x).astype(jnp.uint8)


def equalize(image: jax.Array) -> jax.Array:
  """Per-channel histogram equalisation with PIL's ImageOps.equalize lookup table."""
  channels = image.shape[-1]
  flat = image.reshape(-1, channels).astype(jnp.int32).T                      # [C, N]
  # bincount is a scatter-add: O(N) per channel, where a one-hot compare would be O(256 N).
  hist = jax.vmap(lambda v: jnp.bincount(v, length=256))(flat)              # [C, 256]
  brightest_count = jnp.take_along_axis(hist, flat.max(axis=1)[:, None], axis=1)[:, 0]
  # PIL leaves the brightest present value's count out of the step, so it maps to <= 255.
  step = (flat.shape[1] - brightest_count) // 255                           # [C]
  safe_step = jnp.maximum(step, 1)[:, None]
  below = jnp.cumsum(hist, axis=1) - hist                                   # exclusive cumsum
  lut = jnp.clip((below + safe_step // 2) // safe_step, 0, 255)
  # step 0 means (almost) a single value: the channel is left alone.
  out = jnp.where((step > 0)[:, None], jnp.take_along_axis(lut, flat, axis=1), flat)
  return out.T.reshape(image.shape).astype(jnp.uint8)


def color(image: jax.Array, factor: Scalar) -> jax.Array:
  """Saturation: blend from the grey image (factor 0) through the image (1); grey: identity."""
  return blend(jnp.broadcast_to(_grey(image), image.shape), image, factor)


def _rounded_mean(grey: jax.Array) -> jax.Array:
  """floor(mean + 0.5) of a uint8 image, as TF's floor(reduce_mean(float32) + 0.5).

  Integer rounding, the same on every backend. It equals TF's float32 steps (exact sum, rounded
  divide, rounded add) when the quotient is >= 2^-15 from a half-integer, true up to 16384
  pixels; the tests check larger counts up to 256^2. int32 fits 4.2M pixels.
  """
  return _round_div(grey.astype(jnp.int32).sum(), grey.size).astype(jnp.uint8)


def _round_div(total: jax.Array, count: jax.Array | int) -> jax.Array:
  """floor(total / count + 1/2) for non-negative int32 total and positive count."""
  return (2 * total + count) // (2 * count)


def contrast(image: jax.Array, factor: Scalar) -> jax.Array:
  """Blend from a flat image at the rounded mean grey level (factor 0) through the image (1)."""
  flat = jnp.full(image.shape, _rounded_mean(_grey(image)), jnp.uint8)
  return blend(flat, image, factor)


def brightness(image: jax.Array, factor: Scalar) -> jax.Array:
  """Blend from black (factor 0) through the image (1) and beyond."""
  return blend(jnp.zeros_like(image), image, factor)


def sharpness(image: jax.Array, factor: Scalar) -> jax.Array:
  """Blend from a smoothed image (factor 0) through the image (1); > 1 sharpens.

  The smoothing is PIL's SMOOTH kernel [[1,1,1],[1,5,1],[1,1,1]] / 13 with integer truncation
  on the interior; the 1-pixel border keeps its original values. Needs H, W >= 3.
  """
  x = image.astype(jnp.int32)
  h, w = x.shape[0], x.shape[1]
  total = 4 * x[1:-1, 1:-1]        # centre weight 5 = these 4 + 1 from the 3x3 sum
  for dy in range(3):
    for dx in range(3):
      total = total + x[dy:h - 2 + dy, dx:w - 2 + dx]
  degenerate = x.at[1:-1, 1:-1].set(total // 13).astype(jnp.uint8)
  return blend(degenerate, image, factor)


def cutout(image: jax.Array, pad_size: Scalar, center: jax.Array) -> jax.Array:
  """Fills rows [cy - pad, cy + pad) x cols [cx - pad, cx + pad) (clipped) with REPLACE_VALUE.

  Args:
    image: uint8 [H, W, C].
    pad_size: half the side of the square; 0 leaves the image unchanged.
    center: int32 [2], (row, col) of the square's centre.

  Returns:
    uint8 image of the same shape.
  """
  center = jnp.asarray(center, jnp.int32)
  rows, cols = jnp.arange(image.shape[0])[:, None], jnp.arange(image.shape[1])[None, :]
  inside = ((rows >= center[0] - pad_size) & (rows < center[0] + pad_size)
            & (cols >= center[1] - pad_size) & (cols < center[1] + pad_size))
  return jnp.where(inside[:, :, None], jnp.uint8(REPLACE_VALUE), image)


# ------------------------------------------------------------------------------------------------
# Geometric ops: nearest-neighbour projective warps, uncovered pixels set to REPLACE_VALUE
# ------------------------------------------------------------------------------------------------

def _round_half_away(v: jax.Array) -> jax.Array:
  # C's round(): ties away from zero (jnp.round ties to even). v - trunc(v) is exact in float,
  # so this is exact where floor(v + 0.5) would misround 0.49999997.
  t = jnp.trunc(v)
  return t + jnp.where(jnp.abs(v - t) >= 0.5, jnp.sign(v), 0.0)


def projective_warp(image: jax.Array, transform: Sequence[Scalar] | jax.Array) -> jax.Array:
  """Nearest-neighbour warp, as ImageProjectiveTransformV3(NEAREST, CONSTANT, fill 128).

  Output pixel (x, y) reads input (a0 x + a1 y + a2, b0 x + b1 y + b2) / (c0 x + c1 y + 1),
  evaluated in float32 left to right without FMA, rounded half away from zero; a source
  outside the image after rounding (or a zero denominator) gives REPLACE_VALUE. As TF's kernel
  (measured), the bounds test is on the rounded index, so a source at -0.4 reads column 0.

  Args:
    image: uint8 [H, W, C].
    transform: 8 float32 values [a0, a1, a2, b0, b1, b2, c0, c1], output -> input.

  Returns:
    uint8 image of the same shape.
  """
  h, w = image.shape[0], image.shape[1]
  t = jnp.asarray(transform, jnp.float32).reshape(8)
  xs, ys = jnp.arange(w, dtype=jnp.float32), jnp.arange(h, dtype=jnp.float32)

  def affine(a, b, c):
    # (a x + b y) + c as TF's kernel evaluates it; the products are [W] and [H] vectors.
    px, py = _no_fma(a * xs, _COORD_BOUND), _no_fma(b * ys, _COORD_BOUND)
    return (px[None, :] + py[:, None]) + c

  projection = affine(t[6], t[7], jnp.float32(1.0))
  safe = jnp.where(projection == 0, jnp.float32(1.0), projection)
  src_x = _round_half_away(affine(t[0], t[1], t[2]) / safe)
  src_y = _round_half_away(affine(t[3], t[4], t[5]) / safe)
  valid = (projection != 0) & (src_x >= 0) & (src_x <= w - 1) & (src_y >= 0) & (src_y <= h - 1)
  # Clipping before the int cast keeps far-away (or inf) coordinates from overflowing.
  row, col = (jnp.clip(c, 0, n - 1).astype(jnp.int32) for c, n in ((src_y, h), (src_x, w)))
  return jnp.where(valid[:, :, None], image[row, col], jnp.uint8(REPLACE_VALUE))


def _rotation_transform(cos: jax.Array, sin: jax.Array, height: int, width: int) -> jax.Array:
  """The reference's float32 coefficients: input = R(theta) (output - centre) + centre."""
  cy, cx = jnp.float32((height - 1) / 2.0), jnp.float32((width - 1) / 2.0)
  cos_cx, sin_cy, sin_cx, cos_cy = (_no_fma(p, _COORD_BOUND)
                                    for p in (cos * cx, sin * cy, sin * cx, cos * cy))
  zero = jnp.float32(0.0)
  return jnp.stack([cos, -sin, (cx - cos_cx) + sin_cy,
                    sin, cos, (cy - sin_cx) - cos_cy, zero, zero])


def rotate(image: jax.Array, degrees: Scalar) -> jax.Array:
  """Rotates counter-clockwise (as displayed, rows pointing down) about the image centre.

  XLA's float32 cos/sin can differ from TF's by an ulp (on XLA:CPU even between scalar and
  vectorised code); the op table uses constants instead (_table_cos_sin).

  Args:
    image: uint8 [H, W, C].
    degrees: float32 scalar angle, may be traced.

  Returns:
    uint8 image of the same shape.
  """
  theta = jnp.asarray(degrees, jnp.float32) * jnp.float32(math.pi / 180.0)   # as the reference
  return _rotate_cos_sin(image, jnp.cos(theta), jnp.sin(theta))


def _rotate_cos_sin(image: jax.Array, cos: Scalar, sin: Scalar) -> jax.Array:
  """rotate() given the float32 cos and sin of its angle."""
  cos, sin = jnp.asarray(cos, jnp.float32), jnp.asarray(sin, jnp.float32)
  return projective_warp(image, _rotation_transform(cos, sin, image.shape[0], image.shape[1]))


def _table_cos_sin(degrees: float) -> tuple[np.float32, np.float32]:
  """float32 cos and sin of a static angle, from float64: constants every backend agrees on."""
  theta = float(np.float32(degrees) * np.float32(math.pi / 180.0))   # the reference's theta
  return np.float32(math.cos(theta)), np.float32(math.sin(theta))


def shear_x(image: jax.Array, level: Scalar) -> jax.Array:
  """Output (x, y) reads input (x + level * y, y): row y moves left by level * y pixels."""
  return projective_warp(image, [1.0, level, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0])


def shear_y(image: jax.Array, level: Scalar) -> jax.Array:
  """Output (x, y) reads input (x, y + level * x): column x moves up by level * x pixels."""
  return projective_warp(image, [1.0, 0.0, 0.0, level, 1.0, 0.0, 0.0, 0.0])


def translate_x(image: jax.Array, pixels: Scalar) -> jax.Array:
  """Moves the content right by `pixels` (left if negative)."""
  return projective_warp(image, [1.0, 0.0, -jnp.asarray(pixels, jnp.float32), 0.0, 1.0, 0.0,
                                 0.0, 0.0])


def translate_y(image: jax.Array, pixels: Scalar) -> jax.Array:
  """Moves the content down by `pixels` (up if negative)."""
  return projective_warp(image, [1.0, 0.0, 0.0, 0.0, 1.0, -jnp.asarray(pixels, jnp.float32),
                                 0.0, 0.0])


# ------------------------------------------------------------------------------------------------
# The op table: OP_NAMES[i] -> branch(image, sign, centre) at a static magnitude
# ------------------------------------------------------------------------------------------------

class _Draws(NamedTuple):
  """An op's random numbers, drawn before the switch so all 16 branches share one hash."""
  sign: jax.Array      # float32 +-1, probability 1/2 each: the geometric ops' direction
  center: jax.Array    # int32 [2] (row, col) of the cutout square, uniform over the image


def _op_draws(key: jax.Array, height: int, width: int) -> _Draws:
  # One threefry call for all three numbers; the modulo bias is below height / 2^32.
  bits = jax.random.bits(key, (3,), jnp.uint32)
  sign = jnp.where(bits[0] >> 31 == 1, jnp.float32(-1.0), jnp.float32(1.0))
  center = jnp.stack([bits[1] % height, bits[2] % width]).astype(jnp.int32)
  return _Draws(sign, center)


class _Levels(NamedTuple):
  """The static op arguments at one magnitude (signed ops: the value before the random sign)."""
  rotate_degrees: float
  shear: float
  translate_px: float
  enhance_factor: float
  posterize_bits: int
  solarize_threshold: int
  solarize_addition: int
  cutout_pad: int


def _levels(magnitude: float) -> _Levels:
  """The reference's level maps, written as its Python float expressions (same rounding)."""
  m = magnitude
  return _Levels(
      rotate_degrees=m / MAX_LEVEL * MAX_ROTATE_DEGREES,
      shear=m / MAX_LEVEL * MAX_SHEAR,
      translate_px=m / MAX_LEVEL * MAX_TRANSLATE_PX,
      # 0.1..1.9 over magnitudes 0..10, the identity factor 1.0 at magnitude 5.
      enhance_factor=m / MAX_LEVEL * 1.8 + 0.1,
      posterize_bits=int(m / MAX_LEVEL * 4),
      solarize_threshold=int(m / MAX_LEVEL * 256),
      solarize_addition=int(m / MAX_LEVEL * MAX_SOLARIZE_ADD),
      cutout_pad=int(m / MAX_LEVEL * MAX_CUTOUT_PAD))


def _branches(magnitude: float) -> tuple[Callable[[jax.Array, _Draws], jax.Array], ...]:
  """The 16 ops as fn(image, draws), in OP_NAMES order, at a static magnitude."""
  lv = _levels(magnitude)
  cos, sin = _table_cos_sin(lv.rotate_degrees)
  factor = lv.enhance_factor
  # sign * float32(v) is exactly the reference's float32 +-v.
  shear, shift = jnp.float32(lv.shear), jnp.float32(lv.translate_px)
  return (
      lambda x, d: autocontrast(x),
      lambda x, d: equalize(x),
      lambda x, d: invert(x),
      # cos is even and sin odd, so the sign only flips sin (exactly).
      lambda x, d: _rotate_cos_sin(x, cos, d.sign * sin),
      lambda x, d: posterize(x, lv.posterize_bits),
      lambda x, d: solarize(x, lv.solarize_threshold),
      lambda x, d: color(x, factor),
      lambda x, d: contrast(x, factor),
      lambda x, d: brightness(x, factor),
      lambda x, d: sharpness(x, factor),
      lambda x, d: shear_x(x, d.sign * shear),
      lambda x, d: shear_y(x, d.sign * shear),
      lambda x, d: translate_x(x, d.sign * shift),
      lambda x, d: translate_y(x, d.sign * shift),
      lambda x, d: cutout(x, lv.cutout_pad, d.center),
      lambda x, d: solarize_add(x, lv.solarize_addition),
  )


def _check_magnitude(magnitude: float) -> float:
  if (isinstance(magnitude, bool) or not isinstance(magnitude, (int, float))
      or not 0 <= magnitude < math.inf):
    raise ValueError(f"magnitude must be a static finite number >= 0 (0..10, 15 for F3+), "
                     f"got {magnitude!r}.")
  return float(magnitude)


def apply_op(image: jax.Array, op_index: jax.Array | int, magnitude: float,
             key: jax.Array) -> jax.Array:
  """Applies op OP_NAMES[op_index] at `magnitude`.

  Args:
    image: uint8 [H, W, 1 or 3].
    op_index: int32 scalar in [0, NUM_OPS), may be traced (lax.switch clamps it).
    magnitude: static level on the 0..10 scale; larger values extrapolate.
    key: PRNG key for the op's random sign or cutout centre.

  Returns:
    uint8 image of the same shape.
  """
  _check_image(image)
  draws = _op_draws(key, image.shape[0], image.shape[1])
  return lax.switch(op_index, _branches(_check_magnitude(magnitude)), image, draws)


def _layer_choice(key: jax.Array, layer: jax.Array | int) -> tuple[jax.Array, jax.Array]:
  """(op index, op key) of one layer; folding in the layer index keeps layers independent."""
  choice_key, op_key = jax.random.split(jax.random.fold_in(key, layer))
  # 16 divides 2^32, so the low bits pick each op with probability exactly 1/16.
  index = (jax.random.bits(choice_key, (), jnp.uint32) % NUM_OPS).astype(jnp.int32)
  return index, op_key


def randaugment_plan(key: jax.Array, num_layers: int) -> tuple[jax.Array, jax.Array]:
  """The choices randaugment makes for `key`.

  Args:
    key: PRNG key.
    num_layers: number of layers.

  Returns:
    (int32 [num_layers] op indices into OP_NAMES, [num_layers] op keys for apply_op).
  """
  return jax.vmap(lambda layer: _layer_choice(key, layer))(jnp.arange(num_layers))


def randaugment(image: jax.Array, key: jax.Array, num_layers: int,
                magnitude: float) -> jax.Array:
  """Applies `num_layers` uniformly chosen ops at `magnitude`, all randomness from `key`.

  Args:
    image: uint8 [H, W, 1 or 3].
    key: PRNG key; the same key gives the same output.
    num_layers: static number of ops applied in sequence (4 in the NFNet recipes); 0: identity.
    magnitude: static level on the 0..10 scale (15 for F3+); larger values extrapolate.

  Returns:
    uint8 image of the same shape.
  """
  image = jnp.asarray(image)
  _check_image(image)
  if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 0:
    raise ValueError(f"num_layers must be a non-negative int, got {num_layers!r}.")
  branches = _branches(_check_magnitude(magnitude))

  def one_layer(layer, x):
    index, op_key = _layer_choice(key, layer)
    return lax.switch(index, branches, x, _op_draws(op_key, x.shape[0], x.shape[1]))

  # fori_loop traces (and XLA compiles) the 16 branches once instead of num_layers times; the
  # layers are sequential either way, so run time is the same and compile time is 1/num_layers.
  return lax.fori_loop(0, num_layers, one_layer, image)


def randaugment_batch(images: jax.Array, key: jax.Array, num_layers: int,
                      magnitude: float, first_index: jax.Array | int = 0) -> jax.Array:
  """randaugment per example: example i uses jax.random.fold_in(key, first_index + i).

  Args:
    images: uint8 [B, H, W, 1 or 3].
    key: PRNG key of the whole (global) batch.
    num_layers: static number of layers.
    magnitude: static level.
    first_index: the global index of images[0] in the step's batch, so an example draws the
      same ops on whichever device it lands.

  Returns:
    uint8 array of the same shape.
  """
  keys = jax.vmap(lambda i: jax.random.fold_in(key, first_index + i))(
      jnp.arange(images.shape[0]))
  return jax.vmap(lambda x, k: randaugment(x, k, num_layers, magnitude))(images, keys)
