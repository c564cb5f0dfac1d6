"""nfnets/augment/randaugment.py (JAX) against the TensorFlow oracle (tf_randaugment.py), op by
op, on photographs.

Tolerances: every pixel/colour op, cutout, shear and translate are bit-exact for every magnitude
in 0..10 and 15 (both signs), and so is the warp given TF's own float32 coefficients. Rotate
gets its cos/sin elsewhere (XLA's for a traced angle, float64-rounded constants in the op
table), which may differ from TF's (Eigen's) by an ulp; the table's do only at 45 degrees. So
a rotated pixel may differ only where TF's source coordinate is within 1e-4 of a rounding tie,
and must then equal what rounding the other way reads (< 2% of pixels). The table rotations
are asserted bit-exact at every other magnitude. Observed: no differing pixel at all.

Each op is jitted once per image shape with traced parameters, so one program serves every
magnitude. TensorFlow is imported here only, as the reference.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from nfnets.augment import randaugment as ra
from nfnets.quiet_tensorflow import tf
from tests.augment import tf_randaugment as T
from tests.photos import photo_path

MAGNITUDES = list(range(11)) + [15]
# Programs with a static magnitude, shared by the tests below (each compiles all 16 branches).
_APPLY_OP = jax.jit(ra.apply_op, static_argnums=2)


# ------------------------------------------------------------------------------------------------
# Photographs
# ------------------------------------------------------------------------------------------------

def _photo(path: str, size: tuple[int, int], mode: str = "RGB") -> np.ndarray:
  """The photo resized to (width, height) with a box filter; [H, W, C] uint8."""
  with Image.open(path) as image:
    small = image.convert(mode).resize(size, Image.BOX)
  array = np.asarray(small, np.uint8)
  return array[..., None] if array.ndim == 2 else array


_GRACE = photo_path("grace_hopper")
_CHINA = photo_path("china")
PHOTOS = {
    "grace": _photo(_GRACE, (64, 48)),
    "china_odd": _photo(_CHINA, (41, 37)),        # odd, non-square
    "flower": _photo(photo_path("flower"), (64, 48)),
    "grace_grey": _photo(_GRACE, (41, 37), "L"),
}
# An unresized 224x224 crop, for the contrast mean at the size NFNets train at (50176 pixels).
with Image.open(_CHINA) as _china:
  CHINA_224 = np.asarray(_china.convert("RGB").crop((200, 100, 424, 324)), np.uint8)


def _tf(fn, image, *args):
  return fn(tf.constant(image), *args).numpy()


def _tf_seed_with_sign(sign: float) -> tf.Tensor:
  """A stateless seed for which the reference's _random_sign picks `sign`."""
  for i in range(100):
    seed = tf.constant([i, 1], tf.int32)
    if float(T._random_sign(1.0, seed)) == sign:  # pylint: disable=protected-access
      return seed
  raise AssertionError("no seed found")


def test_photos_are_real_and_varied():
  for name, image in PHOTOS.items():
    assert image.dtype == np.uint8 and image.ndim == 3, name
    assert image.std() > 20 and len(np.unique(image)) > 100, name


# ------------------------------------------------------------------------------------------------
# Building blocks, exhaustively
# ------------------------------------------------------------------------------------------------

def test_grey_equals_tf_rgb_to_grayscale_on_every_colour():
  levels = np.arange(256, dtype=np.uint8)
  rgb = np.stack(np.meshgrid(levels, levels, levels, indexing="ij"), -1).reshape(4096, 4096, 3)
  expected = tf.image.rgb_to_grayscale(tf.constant(rgb)).numpy()
  grey = jax.jit(ra._grey)  # pylint: disable=protected-access
  np.testing.assert_array_equal(np.asarray(grey(rgb)), expected)


def test_blend_equals_tf_on_every_pixel_pair_and_enhance_factor():
  levels = np.arange(256, dtype=np.uint8)
  a, b = np.meshgrid(levels, levels, indexing="ij")
  blend = jax.jit(ra.blend)
  for m in MAGNITUDES:
    factor = m / 10 * 1.8 + 0.1
    expected = T.blend(tf.constant(a), tf.constant(b), factor).numpy()
    np.testing.assert_array_equal(np.asarray(blend(a, b, factor)), expected, err_msg=f"m={m}")


def test_rounded_mean_equals_tf_float32_steps():
  """Integer rounding == TF's float32 steps, for pixel counts 16385..65536 (up to 256^2).

  Counts <= 16384 are proven in _rounded_mean. Above, float32 can only round differently when
  the total is within N / 2^16 <= 1 of a half-integer multiple (k + 1/2) N, so the totals within
  4 of every such point are checked, for 808 counts including 224^2 and 256^2.
  """
  round_div = jax.jit(ra._round_div)  # pylint: disable=protected-access
  counts = np.array(sorted(set(range(16385, 65537, 61)) | {224 * 224, 256 * 256}), np.int32)
  centres = np.round((np.arange(255)[None, :] + 0.5) * counts[:, None]).astype(np.int32)
  totals = centres[:, :, None] + np.arange(-4, 5, dtype=np.int32)        # [counts, 255, 9]
  totals, count_of = totals.ravel(), np.broadcast_to(counts[:, None, None], totals.shape).ravel()
  # tf.reduce_mean's steps on an exact float32 sum: one rounded divide, one rounded add.
  expected = np.floor(totals.astype(np.float32) / count_of.astype(np.float32) + np.float32(0.5))
  np.testing.assert_array_equal(np.asarray(round_div(totals, count_of)),
                                expected.astype(np.int32))


# ------------------------------------------------------------------------------------------------
# Pixel and colour ops: bit-exact on every photo and magnitude
# ------------------------------------------------------------------------------------------------

def _level_params(name: str) -> list:
  """The reference's op argument for each magnitude (its OPS table, inlined)."""
  if name in ("color", "contrast", "brightness", "sharpness"):
    return [m / 10 * 1.8 + 0.1 for m in MAGNITUDES]
  if name == "posterize":          # plus every bit count, to cover the [0, 7] shift clamp
    return sorted({int(m / 10 * 4) for m in MAGNITUDES} | set(range(11)))
  if name == "solarize":
    return [int(m / 10 * 256) for m in MAGNITUDES]
  if name == "solarize_add":
    return [int(m / 10 * 110) for m in MAGNITUDES]
  return [None]


@pytest.mark.parametrize("name", [
    "autocontrast", "equalize", "invert", "posterize", "solarize", "solarize_add", "color",
    "contrast", "brightness", "sharpness"])
def test_pixel_op_is_bit_exact(name):
  jax_fn, tf_fn = jax.jit(getattr(ra, name)), getattr(T, name)
  for image_name, image in PHOTOS.items():
    for param in _level_params(name):
      args = () if param is None else (param,)
      np.testing.assert_array_equal(np.asarray(jax_fn(image, *args)), _tf(tf_fn, image, *args),
                                    err_msg=f"{name}{args} on {image_name}")


def test_contrast_is_bit_exact_at_224():
  contrast = jax.jit(ra.contrast)
  for m in (0, 3, 10, 15):
    factor = m / 10 * 1.8 + 0.1
    np.testing.assert_array_equal(np.asarray(contrast(CHINA_224, factor)),
                                  _tf(T.contrast, CHINA_224, factor), err_msg=f"m={m}")


def test_solarize_add_with_other_thresholds_is_bit_exact():
  fn = jax.jit(ra.solarize_add)
  image = PHOTOS["flower"]
  for addition, threshold in [(30, 0), (30, 200), (110, 256), (-40, 128)]:
    np.testing.assert_array_equal(np.asarray(fn(image, addition, threshold)),
                                  _tf(T.solarize_add, image, addition, threshold))


def test_cutout_is_bit_exact_including_border_centres():
  fn = jax.jit(ra.cutout)
  for image_name, image in PHOTOS.items():
    h, w = image.shape[:2]
    centres = [(0, 0), (h - 1, w - 1), (h - 1, 0), (h // 2, w // 3)]
    for m in MAGNITUDES:
      pad = int(m / 10 * 40)
      for centre in centres:
        np.testing.assert_array_equal(
            np.asarray(fn(image, pad, np.array(centre, np.int32))),
            _tf(T.cutout, image, pad, tf.constant(centre, tf.int32)),
            err_msg=f"pad {pad} centre {centre} on {image_name}")


# ------------------------------------------------------------------------------------------------
# Warps
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,scale", [
    ("shear_x", 0.3), ("shear_y", 0.3), ("translate_x", 100.0), ("translate_y", 100.0)])
def test_shear_and_translate_are_bit_exact(name, scale):
  jax_fn, tf_fn = jax.jit(getattr(ra, name)), getattr(T, name)
  for image_name, image in PHOTOS.items():
    for m in MAGNITUDES:
      for sign in (1.0, -1.0):
        value = sign * (m / 10 * scale)
        np.testing.assert_array_equal(np.asarray(jax_fn(image, value)),
                                      _tf(tf_fn, image, value),
                                      err_msg=f"{name}({value}) on {image_name}")


def _tf_rotate(image: np.ndarray, degrees, seed, monkeypatch, op: bool = False):
  """(TF output, the float32 coefficients its rotate passed to the warp).

  op=False calls T.rotate(image, degrees); op=True calls T.OPS['Rotate'](image, degrees, seed),
  with `degrees` then the magnitude.
  """
  seen = []
  original = T._warp  # pylint: disable=protected-access

  def spy(img, transform):
    seen.append(tf.cast(tf.stack(transform), tf.float32).numpy())
    return original(img, transform)

  with monkeypatch.context() as patch:
    patch.setattr(T, "_warp", spy)
    if op:
      out = T.OPS["Rotate"](tf.constant(image), degrees, seed).numpy()
    else:
      out = _tf(T.rotate, image, degrees)
  return out, seen[0]


def _assert_equal_up_to_rounding_ties(image, got, expected, tf_t, where) -> int:
  """Asserts got == expected except at pixels whose TF source coordinate is a rounding tie.

  At such a pixel (a coordinate within 1e-4 of k + 1/2) `got` must be what rounding that
  coordinate the other way reads (the pixel there, or the fill value outside the image).
  Returns the number of such pixels.
  """
  h, w = image.shape[:2]
  differs = np.any(got != expected, axis=-1)
  if not differs.any():
    return 0
  t = tf_t.astype(np.float32)
  ys, xs = np.meshgrid(np.arange(h, dtype=np.float32), np.arange(w, dtype=np.float32),
                       indexing="ij")
  # float32, one rounding per op, in the kernel's order.
  src_x = (t[0] * xs + t[1] * ys) + t[2]
  src_y = (t[3] * xs + t[4] * ys) + t[5]
  for y, x in np.argwhere(differs):
    per_axis = []            # the index each coordinate rounds to, and, at a tie, the other one
    for c in (src_x[y, x], src_y[y, x]):
      nearest = np.sign(c) * np.floor(abs(c) + 0.5)
      tie = abs(abs(c - np.trunc(c)) - 0.5) < 1e-4
      per_axis.append([nearest] + ([nearest + (1 if c > nearest else -1)] if tie else []))
    options = []
    for cx in per_axis[0]:
      for cy in per_axis[1]:
        if (cx, cy) == (per_axis[0][0], per_axis[1][0]):
          continue
        inside = 0 <= cx < w and 0 <= cy < h
        options.append(image[int(cy), int(cx)] if inside else np.full(image.shape[-1], 128))
    assert any(np.array_equal(got[y, x], o) for o in options), \
        f"{where}: pixel {(y, x)} differs, source ({src_x[y, x]}, {src_y[y, x]}) is no tie"
  assert differs.mean() < 0.02, f"{where}: {differs.sum()} tie pixels"
  return int(differs.sum())


def test_warp_is_bit_exact_for_tf_coefficients():
  """Same float32 coefficients in, same pixels out: exact .5 ties, a projective transform.

  (The rotate tests below check the same for the coefficients of every table rotation.)
  """
  warp = jax.jit(ra.projective_warp)
  transforms = [np.array([1, 0.5, 0, 0, 1, 0, 0, 0], np.float32),   # exact .5 ties
                np.array([1, 0, -0.5, 0, 1, 0.5, 0, 0], np.float32),
                np.array([1.2, 0.1, -3, -0.2, 0.9, 4, 0.002, -0.003], np.float32)]
  for image_name, image in PHOTOS.items():
    for t in transforms:
      expected = tf.raw_ops.ImageProjectiveTransformV3(
          images=image[None], transforms=t[None], output_shape=image.shape[:2],
          fill_value=128.0, interpolation="NEAREST", fill_mode="CONSTANT")[0].numpy()
      np.testing.assert_array_equal(np.asarray(warp(image, t)), expected,
                                    err_msg=f"{t} on {image_name}")


def test_rotate_matches_tf_up_to_rounding_ties(monkeypatch):
  """rotate (traced angle, XLA's cos/sin) against the reference's rotate, every table angle."""
  rotate, warp = jax.jit(ra.rotate), jax.jit(ra.projective_warp)
  tie_pixels = {}
  for image_name, image in PHOTOS.items():
    for m in MAGNITUDES:
      for sign in (1.0, -1.0):
        degrees = sign * (m / 10 * 30)
        expected, tf_t = _tf_rotate(image, degrees, None, monkeypatch)
        got = np.asarray(rotate(image, degrees))
        np.testing.assert_array_equal(np.asarray(warp(image, tf_t)), expected,
                                      err_msg=f"warp for rotate({degrees}) on {image_name}")
        ties = _assert_equal_up_to_rounding_ties(image, got, expected, tf_t,
                                                 f"rotate({degrees}) on {image_name}")
        if ties:
          tie_pixels[(image_name, degrees)] = ties
  print(f"traced rotate: tie pixels that differ from TF: {tie_pixels}")


def test_table_rotations_match_tf_exactly_except_at_45_degrees(monkeypatch):
  """The op table's constant cos/sin path, against the reference's Rotate op, both signs."""
  rotate = jax.jit(ra._rotate_cos_sin)  # pylint: disable=protected-access
  tf_seeds = {s: _tf_seed_with_sign(s) for s in (1.0, -1.0)}
  tie_pixels = {}
  for image_name, image in PHOTOS.items():
    for m in MAGNITUDES:
      cos, sin = ra._table_cos_sin(m / 10 * 30)  # pylint: disable=protected-access
      for sign in (1.0, -1.0):
        expected, tf_t = _tf_rotate(image, float(m), tf_seeds[sign], monkeypatch, op=True)
        got = np.asarray(rotate(image, cos, sign * sin))
        where = f"table rotate at magnitude {m}, sign {sign}, on {image_name}"
        if m != 15:
          np.testing.assert_array_equal(got, expected, err_msg=where)
        ties = _assert_equal_up_to_rounding_ties(image, got, expected, tf_t, where)
        if ties:
          tie_pixels[(image_name, sign * m * 3.0)] = ties
  print(f"table rotate: tie pixels that differ from TF: {tie_pixels}")


# ------------------------------------------------------------------------------------------------
# The op table and apply_op
# ------------------------------------------------------------------------------------------------

def test_op_names_match_the_reference_table():
  assert ra.OP_NAMES == T.OP_NAMES and ra.NUM_OPS == 16


_SPIED = {"Rotate": ("rotate", "rotate_degrees"), "Posterize": ("posterize", "posterize_bits"),
          "Solarize": ("solarize", "solarize_threshold"),
          "Color": ("color", "enhance_factor"), "Contrast": ("contrast", "enhance_factor"),
          "Brightness": ("brightness", "enhance_factor"),
          "Sharpness": ("sharpness", "enhance_factor"), "ShearX": ("shear_x", "shear"),
          "ShearY": ("shear_y", "shear"), "TranslateX": ("translate_x", "translate_px"),
          "TranslateY": ("translate_y", "translate_px"), "Cutout": ("cutout", "cutout_pad"),
          "SolarizeAdd": ("solarize_add", "solarize_addition")}


def test_level_maps_equal_the_arguments_the_reference_passes(monkeypatch):
  """The reference OPS table's calls, recorded by spies, at every magnitude (no compiles)."""
  image = tf.constant(PHOTOS["china_odd"][:4, :4])
  seed = tf.constant([1, 2], tf.int32)
  for m in MAGNITUDES + [2.5, 7.3, 20.0]:
    levels = ra._levels(float(m))  # pylint: disable=protected-access
    for name, (fn_name, field) in _SPIED.items():
      seen = []
      with monkeypatch.context() as patch:
        patch.setattr(T, fn_name, lambda img, arg, *rest: seen.append(arg) or img)
        T.OPS[name](image, float(m), seed)
      ours = getattr(levels, field)
      if isinstance(seen[0], tf.Tensor):    # the signed ops pass a float32 tensor +-value
        assert abs(float(seen[0])) == float(np.float32(ours)), (name, m, seen[0], ours)
      else:
        assert seen[0] == ours and type(seen[0]) is type(ours), (name, m, seen[0], ours)


def test_apply_op_equals_the_reference_op_table(monkeypatch):
  """apply_op(i) at magnitude 15 (the F3+ extrapolation) equals the reference's OPS entry."""
  magnitude = 15.0
  image = PHOTOS["china_odd"]
  h, w = image.shape[:2]
  keys = [jax.random.PRNGKey(k) for k in range(4)]
  draws = [ra._op_draws(k, h, w) for k in keys]  # pylint: disable=protected-access
  signs = [float(d.sign) for d in draws]
  assert set(signs) == {1.0, -1.0}
  tf_seeds = {s: _tf_seed_with_sign(s) for s in (1.0, -1.0)}
  for index, name in enumerate(ra.OP_NAMES):
    for key, sign, draw in zip(keys, signs, draws):
      # An int32 array, as randaugment passes it, so the plan test reuses this program.
      got = np.asarray(_APPLY_OP(image, jnp.int32(index), magnitude, key))
      where = f"{name} at magnitude {magnitude}"
      if name == "Cutout":
        expected = _tf(T.cutout, image, int(magnitude / 10 * 40), tf.constant(draw.center))
      elif name == "Rotate":
        expected, tf_t = _tf_rotate(image, magnitude, tf_seeds[sign], monkeypatch, op=True)
        _assert_equal_up_to_rounding_ties(image, got, expected, tf_t, where)   # 45 degrees
        continue
      else:
        expected = T.OPS[name](tf.constant(image), magnitude, tf_seeds[sign]).numpy()
      np.testing.assert_array_equal(got, expected, err_msg=where)


# ------------------------------------------------------------------------------------------------
# randaugment and randaugment_batch
# ------------------------------------------------------------------------------------------------

M = 15.0           # the magnitude of every randaugment program here (one compile each)
_RANDAUGMENT = jax.jit(ra.randaugment, static_argnums=(2, 3))
_BATCH = jax.jit(ra.randaugment_batch, static_argnums=(2, 3))
_PLAN = jax.jit(ra.randaugment_plan, static_argnums=1)


def test_randaugment_is_deterministic_and_keeps_dtype_and_shape():
  image = PHOTOS["china_odd"]
  key = jax.random.PRNGKey(3)
  first, second = _RANDAUGMENT(image, key, 2, M), _RANDAUGMENT(image, key, 2, M)
  assert first.dtype == jnp.uint8 and first.shape == image.shape
  np.testing.assert_array_equal(np.asarray(first), np.asarray(second))


def test_randaugment_applies_its_plan():
  image = PHOTOS["china_odd"]
  for k in range(6):
    key = jax.random.PRNGKey(100 + k)
    indices, op_keys = _PLAN(key, 2)
    first = _APPLY_OP(image, indices[0], M, op_keys[0])
    expected = _APPLY_OP(first, indices[1], M, op_keys[1])
    np.testing.assert_array_equal(np.asarray(_RANDAUGMENT(image, key, 2, M)),
                                  np.asarray(expected))


def test_randaugment_with_zero_layers_is_the_identity():
  image = PHOTOS["flower"]
  np.testing.assert_array_equal(
      np.asarray(ra.randaugment(image, jax.random.PRNGKey(0), 0, 10.0)), image)


def test_op_choices_are_uniform():
  keys = jax.random.split(jax.random.PRNGKey(0), 2000)
  indices, _ = jax.jit(jax.vmap(lambda k: ra.randaugment_plan(k, 4)))(keys)
  counts = np.bincount(np.asarray(indices).ravel(), minlength=16)
  expected = indices.size / 16
  chi2 = float(((counts - expected) ** 2 / expected).sum())
  # 15 degrees of freedom: P(chi2 > 50) ~ 1e-5; each count is within ~5 sigma of 500.
  assert counts.size == 16 and chi2 < 50, (chi2, counts)
  assert counts.min() > 400 and counts.max() < 600, counts


def test_batch_equals_a_loop_over_fold_in_keys_and_keys_differ():
  china = PHOTOS["china_odd"]      # one shape for every randaugment program: one compile each
  images = np.stack([china] * 8)
  key = jax.random.PRNGKey(7)
  out = np.asarray(_BATCH(images, key, 2, M))
  assert out.dtype == np.uint8 and out.shape == images.shape
  example_keys = [jax.random.fold_in(key, i) for i in range(8)]
  for i, (image, example_key) in enumerate(zip(images, example_keys)):
    np.testing.assert_array_equal(out[i], np.asarray(_RANDAUGMENT(image, example_key, 2, M)),
                                  err_msg=f"example {i}")
  # Same photo, different keys, different outputs. At magnitude 15 TranslateX/Y (150 px) and
  # Cutout (pad 60) blank a 37x41 image, so plans using them may collide; two keys may also
  # draw the same plan (p = 1/256 per pair). Any two other plans must give different images.
  plans = [tuple(np.asarray(_PLAN(k, 2)[0]).tolist()) for k in example_keys]
  unblanked = [i for i, plan in enumerate(plans) if not set(plan) & {12, 13, 14}]
  assert len(set(plans[i] for i in unblanked)) >= 3, plans
  for i in unblanked:
    for j in unblanked:
      if plans[i] != plans[j]:
        assert not np.array_equal(out[i], out[j]), (plans[i], plans[j])


def test_grey_images_work_end_to_end():
  grey = PHOTOS["grace_grey"]
  images = np.stack([grey, grey[::-1], grey[:, ::-1], grey[::-1, ::-1]])
  out = np.asarray(_BATCH(images, jax.random.PRNGKey(1), 2, M))
  assert out.dtype == np.uint8 and out.shape == images.shape
  assert len({o.tobytes() for o in out}) >= 3      # (blanking plans could collide, see above)


def test_non_uint8_or_bad_shapes_are_rejected():
  with pytest.raises(ValueError, match="uint8"):
    ra.randaugment(PHOTOS["grace"].astype(np.float32), jax.random.PRNGKey(0), 1, 5.0)
  with pytest.raises(ValueError, match="shape"):
    ra.randaugment(PHOTOS["grace"][..., :2], jax.random.PRNGKey(0), 1, 5.0)
  with pytest.raises(ValueError, match="num_layers"):
    ra.randaugment(PHOTOS["grace"], jax.random.PRNGKey(0), -1, 5.0)
  assert math.isclose(ra.MAX_LEVEL, T.MAX_LEVEL) and ra.REPLACE_VALUE == T.REPLACE_VALUE
