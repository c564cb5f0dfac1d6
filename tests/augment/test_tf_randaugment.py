"""Tests of the TensorFlow RandAugment oracle (tf_randaugment.py) against independent numpy / PIL
formulas."""

import numpy as np
import pytest
from PIL import Image, ImageOps

from nfnets.quiet_tensorflow import tf
from tests.augment import tf_randaugment as ra

SEED = tf.constant([7, 11], tf.int32)


def _random_image(shape, seed=0, low=0, high=256) -> np.ndarray:
  return np.random.RandomState(seed).randint(low, high, shape).astype(np.uint8)


def _op(name: str, image: np.ndarray, magnitude: float, seed=SEED) -> np.ndarray:
  return ra.OPS[name](tf.constant(image), magnitude, seed).numpy()


def _marker_image(size: int, row: int, col: int) -> np.ndarray:
  """Background 50 with a 3x3 block of 255 centred at (row, col)."""
  image = np.full((size, size, 3), 50, np.uint8)
  image[row - 1:row + 2, col - 1:col + 2] = 255
  return image


def _marker_centre(image: np.ndarray) -> np.ndarray:
  rows, cols = np.nonzero(image[..., 0] == 255)
  assert rows.size, "marker left the image"
  return np.array([rows.mean(), cols.mean()])


IMAGE = _random_image((24, 28, 3))


@pytest.mark.parametrize("channels", [3, 1])
@pytest.mark.parametrize("magnitude", [0.0, 10.0])
@pytest.mark.parametrize("name", ra.OP_NAMES)
def test_every_op_keeps_dtype_and_shape(name, magnitude, channels):
  image = tf.constant(IMAGE[..., :channels])
  out = ra.OPS[name](image, magnitude, SEED)
  assert out.dtype == tf.uint8
  assert out.shape == image.shape


def test_table_has_the_16_official_ops_in_order():
  assert ra.OP_NAMES == ("AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize",
                         "Color", "Contrast", "Brightness", "Sharpness", "ShearX", "ShearY",
                         "TranslateX", "TranslateY", "Cutout", "SolarizeAdd")


# ---------------------------------------- pixel ops ----------------------------------------

def test_invert_solarize_solarize_add():
  x = IMAGE.astype(np.int64)
  np.testing.assert_array_equal(_op("Invert", IMAGE, 3.0), 255 - x)
  np.testing.assert_array_equal(_op("Solarize", IMAGE, 0.0), 255 - x)    # threshold 0: all inverted
  np.testing.assert_array_equal(_op("Solarize", IMAGE, 10.0), x)         # threshold 256: none
  np.testing.assert_array_equal(_op("Solarize", IMAGE, 15.0), x)         # extrapolated: 384
  np.testing.assert_array_equal(_op("Solarize", IMAGE, 5.0), np.where(x < 128, x, 255 - x))
  np.testing.assert_array_equal(_op("SolarizeAdd", IMAGE, 0.0), x)
  for magnitude, addition in [(10.0, 110), (5.0, 55)]:
    np.testing.assert_array_equal(_op("SolarizeAdd", IMAGE, magnitude),
                                  np.where(x < 128, np.minimum(x + addition, 255), x))


@pytest.mark.parametrize("magnitude,bits", [(10.0, 4), (5.0, 2), (15.0, 6), (0.0, 1)])
def test_posterize_keeps_int_m_over_10_times_4_bits(magnitude, bits):
  # magnitude 0 -> 0 bits, which TF's clamped shift (and so the official run) turns into 1 bit.
  expected = np.asarray(ImageOps.posterize(Image.fromarray(IMAGE), bits))
  np.testing.assert_array_equal(_op("Posterize", IMAGE, magnitude), expected)
  np.testing.assert_array_equal(expected, IMAGE & (0xFF << (8 - bits) & 0xFF))


def _blend_np(degenerate: np.ndarray, image: np.ndarray, factor: float) -> np.ndarray:
  d = degenerate.astype(np.float64)
  return np.trunc(np.clip(d + factor * (image.astype(np.float64) - d), 0, 255))


def _grey_np(image: np.ndarray) -> np.ndarray:
  return np.asarray(Image.fromarray(image).convert("L")).astype(np.float64)[..., None]


@pytest.mark.parametrize("magnitude,factor", [(0.0, 0.1), (10.0, 1.9)])
def test_enhance_ops_match_numpy_blends(magnitude, factor):
  grey = _grey_np(IMAGE)
  expected = {
      "Brightness": _blend_np(np.zeros_like(IMAGE), IMAGE, factor),
      "Color": _blend_np(np.broadcast_to(grey, IMAGE.shape), IMAGE, factor),
      "Contrast": _blend_np(np.full(IMAGE.shape, np.floor(grey.mean() + 0.5)), IMAGE, factor),
  }
  for name, want in expected.items():
    got = _op(name, IMAGE, magnitude).astype(np.float64)
    # Grey levels may round differently (PIL rounds, TF scales by 255.5/255 and truncates) by 1;
    # the blend then moves by < 1 before truncation. Most pixels must still agree exactly.
    np.testing.assert_allclose(got, want, atol=1, err_msg=name)
    assert np.mean(got == want) > 0.5, name


def test_sharpness_matches_numpy_smoothing():
  x = IMAGE.astype(np.int64)
  h, w = x.shape[:2]
  total = 4 * x[1:-1, 1:-1]
  for dy in range(3):
    for dx in range(3):
      total = total + x[dy:h - 2 + dy, dx:w - 2 + dx]
  smooth = x.copy()
  smooth[1:-1, 1:-1] = total // 13
  for magnitude, factor in [(0.0, 0.1), (10.0, 1.9)]:
    np.testing.assert_allclose(_op("Sharpness", IMAGE, magnitude), _blend_np(smooth, IMAGE, factor),
                               atol=1)
  # Factor 1.0 (magnitude 5) is exactly the identity for every enhance op.
  for name in ("Sharpness", "Color", "Contrast", "Brightness"):
    np.testing.assert_array_equal(_op(name, IMAGE, 5.0), IMAGE, err_msg=name)


def test_autocontrast_stretches_each_channel():
  image = _random_image((20, 22, 3), seed=1, low=60, high=140)
  image[..., 2] = 77                                                   # flat channel: left alone
  x = image.astype(np.int64)
  lo, hi = x.min(axis=(0, 1)), x.max(axis=(0, 1))
  expected = x.copy()
  for c in range(2):
    expected[..., c] = np.floor((x[..., c] - lo[c]) * 255.0 / (hi[c] - lo[c]))
  got = _op("AutoContrast", image, 0.0)
  np.testing.assert_array_equal(got, expected)
  assert got[..., :2].min() == 0 and got[..., :2].max() == 255
  np.testing.assert_allclose(got, np.asarray(ImageOps.autocontrast(Image.fromarray(image))), atol=1)


def test_equalize_matches_pil():
  image = _random_image((20, 22, 3), seed=2, low=50, high=100)
  image[..., 1] = 9                                     # one value only: step 0, unchanged
  got = _op("Equalize", image, 10.0)
  np.testing.assert_array_equal(got, np.asarray(ImageOps.equalize(Image.fromarray(image))))
  assert got[..., 0].max() > 200 and got[..., 0].min() < 20  # the narrow range was spread out
  np.testing.assert_array_equal(got[..., 1], 9)


# -------------------------------------- geometric ops --------------------------------------

@pytest.mark.parametrize("name",
                         ["Rotate", "ShearX", "ShearY", "TranslateX", "TranslateY", "Cutout"])
def test_geometric_ops_at_magnitude_zero_are_identity(name):
  for s in range(3):
    np.testing.assert_array_equal(_op(name, IMAGE, 0.0, tf.constant([s, 5])), IMAGE)


def test_translate_moves_content_by_100_pixels_on_200():
  image = _random_image((200, 200, 3), seed=3)
  t = tf.constant(image)
  right = ra.translate_x(t, 100.0).numpy()
  np.testing.assert_array_equal(right[:, 100:], image[:, :100])
  assert np.all(right[:, :100] == 128)
  left = ra.translate_x(t, -100.0).numpy()
  np.testing.assert_array_equal(left[:, :100], image[:, 100:])
  down = ra.translate_y(t, 100.0).numpy()
  np.testing.assert_array_equal(down[100:], image[:100])
  assert np.all(down[:100] == 128)
  # The table op at magnitude 10 translates by exactly +-100 with a random sign; both signs occur.
  outcomes = set()
  for s in range(12):
    out = _op("TranslateX", image, 10.0, tf.constant([s, 1]))
    matches = [np.array_equal(out, right), np.array_equal(out, left)]
    assert any(matches)
    outcomes.add(matches.index(True))
  assert outcomes == {0, 1}


def test_rotate_moves_a_marker_by_30_degrees():
  d = 60
  image = _marker_image(201, 100, 100 + d)                              # centre (100, 100) exactly
  rad = np.deg2rad(30.0)
  ccw = np.array([100 - d * np.sin(rad), 100 + d * np.cos(rad)])  # rows point down: ccw goes up
  cw = np.array([100 + d * np.sin(rad), 100 + d * np.cos(rad)])
  for degrees, want in [(30.0, ccw), (-30.0, cw)]:
    got = _marker_centre(ra.rotate(tf.constant(image), degrees).numpy())
    np.testing.assert_allclose(got, want, atol=1)
  seen = set()
  for s in range(12):
    out = _op("Rotate", image, 10.0, tf.constant([s, 2]))
    centre = _marker_centre(out)
    hit = [np.allclose(centre, ccw, atol=1), np.allclose(centre, cw, atol=1)]
    assert any(hit), centre
    seen.add(hit.index(True))
    assert out[0, 0, 0] == 128                            # corners are uncovered -> fill value
  assert seen == {0, 1}
  # Magnitude 15 extrapolates to 45 degrees.
  centre = _marker_centre(_op("Rotate", image, 15.0))
  assert min(np.abs(centre - [100 - d * np.sin(np.pi / 4), 100 + d * np.cos(np.pi / 4)]).max(),
             np.abs(centre - [100 + d * np.sin(np.pi / 4), 100 + d * np.cos(np.pi / 4)]).max()) <= 1


def test_shear_moves_a_marker_by_0_3_per_pixel():
  # A marker 100 px down (ShearX) or right (ShearY) of the origin moves 0.3 * 100 = 30 px.
  for name, (row, col), axis in [("ShearX", (100, 150), 1), ("ShearY", (150, 100), 0)]:
    image = _marker_image(200, row, col)
    seen = set()
    for s in range(12):
      centre = _marker_centre(_op(name, image, 10.0, tf.constant([s, 3])))
      assert abs(centre[1 - axis] - (row, col)[1 - axis]) < 1e-6, name  # other axis: no move
      moved = centre[axis] - (row, col)[axis]
      assert min(abs(moved - 30), abs(moved + 30)) <= 1, (name, moved)
      seen.add(moved > 0)
    assert seen == {True, False}, name


def test_cutout_fills_a_square_with_128():
  # No pixel is 128 beforehand, so the filled region is exactly where the output is 128.
  image = _random_image((200, 200, 3), seed=4, low=0, high=255)
  image[image >= 128] += 1
  filled = ra.cutout(tf.constant(image), 20, tf.constant([100, 60])).numpy()
  expected = image.copy()
  expected[80:120, 40:80] = 128
  np.testing.assert_array_equal(filled, expected)
  corner = ra.cutout(tf.constant(image), 20, tf.constant([5, 190])).numpy()
  assert np.all(corner[0:25, 170:200] == 128) and np.sum(corner[..., 0] == 128) == 25 * 30
  # The pad is half the side: int(m/10*40) -> an 80 px square at magnitude 10, 120 px at 15.
  for magnitude, side in [(10.0, 80), (15.0, 120), (5.0, 40)]:
    for s in range(4):
      mask = np.all(_op("Cutout", image, magnitude, tf.constant([s, 4])) == 128, axis=-1)
      rows, cols = np.nonzero(mask)
      height, width = rows.max() - rows.min() + 1, cols.max() - cols.min() + 1
      assert mask.sum() == height * width                              # a filled rectangle
      # Full side unless clipped by the border.
      assert height == side or rows.min() == 0 or rows.max() == 199, (magnitude, height)
      assert width == side or cols.min() == 0 or cols.max() == 199, (magnitude, width)
      assert height <= side and width <= side


# --------------------------------------- randaugment ---------------------------------------

def test_same_seed_same_output_and_seed_changes_output():
  a = ra.randaugment(tf.constant(IMAGE), 4, 10.0, tf.constant([1, 2])).numpy()
  b = ra.randaugment(tf.constant(IMAGE), 4, 10.0, tf.constant([1, 2], tf.int64)).numpy()
  c = ra.randaugment(tf.constant(IMAGE), 4, 10.0, tf.constant([1, 3])).numpy()
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)


def test_all_16_ops_get_chosen_roughly_uniformly():
  counts = np.zeros(len(ra.OPS), int)
  for s in range(80):
    indices, _ = ra.randaugment_plan(4, tf.constant([s, 99]))
    counts += np.bincount(indices.numpy(), minlength=len(ra.OPS))
  # 320 draws, 20 expected per op; < 5 or > 45 would be a > 4-sigma departure from uniform.
  assert counts.min() >= 5 and counts.max() <= 45, counts


def test_randaugment_applies_the_planned_ops_in_sequence():
  image = tf.constant(IMAGE)
  for s in range(3):
    seed = tf.constant([s, 42])
    indices, op_seeds = ra.randaugment_plan(2, seed)
    expected = image
    for i, op_seed in zip(indices.numpy(), op_seeds):
      expected = ra.OPS[ra.OP_NAMES[i]](expected, 7.0, op_seed)
    np.testing.assert_array_equal(ra.randaugment(image, 2, 7.0, seed).numpy(), expected.numpy())
  np.testing.assert_array_equal(ra.randaugment(image, 0, 7.0, SEED).numpy(), IMAGE)
  # Layer k's choice does not depend on how many layers follow it.
  short, long = ra.randaugment_plan(2, SEED), ra.randaugment_plan(4, SEED)
  np.testing.assert_array_equal(short[0].numpy(), long[0].numpy()[:2])
  np.testing.assert_array_equal(short[1].numpy(), long[1].numpy()[:2])


def test_works_in_dataset_map_and_tf_function_like_eager():
  images = np.stack([_random_image((24, 28, 3), seed=i) for i in range(4)])
  seeds = np.array([[i, 9] for i in range(4)], np.int64)
  ds = tf.data.Dataset.from_tensor_slices((images, seeds))
  ds = ds.map(lambda x, s: ra.randaugment(x, 4, 15.0, s))
  mapped = np.stack([x.numpy() for x in ds])
  eager = np.stack([ra.randaugment(tf.constant(x), 4, 15.0, tf.constant(s)).numpy()
                    for x, s in zip(images, seeds)])
  np.testing.assert_array_equal(mapped, eager)
  # Dynamic height/width (as after JPEG decoding) and a grey image.
  fn = tf.function(lambda x, s: ra.randaugment(x, 2, 10.0, s),
                   input_signature=[tf.TensorSpec([None, None, 1], tf.uint8),
                                    tf.TensorSpec([2], tf.int32)])
  grey = fn(tf.constant(images[0, ..., :1]), tf.constant([3, 4]))
  assert grey.shape == (24, 28, 1) and grey.dtype == tf.uint8


def test_bad_inputs_raise_value_error():
  image = tf.constant(IMAGE)
  with pytest.raises(ValueError, match="uint8"):
    ra.randaugment(tf.cast(image, tf.float32), 2, 5.0, SEED)
  with pytest.raises(ValueError, match="shape"):
    ra.randaugment(tf.zeros([8, 8, 4], tf.uint8), 2, 5.0, SEED)
  with pytest.raises(ValueError, match="seed"):
    ra.randaugment(image, 2, 5.0, tf.constant([1, 2, 3]))
  with pytest.raises(ValueError, match="num_layers"):
    ra.randaugment(image, -1, 5.0, SEED)
  for magnitude in (-1.0, float("nan")):
    with pytest.raises(ValueError, match="magnitude"):
      ra.randaugment(image, 2, magnitude, SEED)
