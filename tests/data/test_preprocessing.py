"""Tests for nfnets/data/preprocessing.py: crop geometry, determinism, ranges."""

import io

import numpy as np
from PIL import Image
import pytest

from nfnets.data import normalization
from nfnets.data import preprocessing
from nfnets.quiet_tensorflow import tf


def _encode(array, fmt):
  buffer = io.BytesIO()
  mode = "L" if array.shape[-1] == 1 else "RGB"
  Image.fromarray(array.squeeze(-1) if mode == "L" else array, mode).save(
      buffer, format=fmt, quality=95)
  return tf.constant(buffer.getvalue())


@pytest.fixture(scope="module")
def coords():
  """A lossless image whose pixels encode their own (row, col)."""
  h, w = 96, 64
  rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
  array = np.stack([rows, cols, (rows + cols) % 256], -1).astype(np.uint8)
  return array, _encode(array, "PNG")


def test_inception_windows_in_bounds_with_paper_area_and_aspect():
  areas, aspects = [], []
  for i in range(200):
    h, w = 300 + (i % 7) * 20, 250 + (i % 5) * 40
    y, x, ch, cw = [int(v) for v in preprocessing.inception_crop_window(
        tf.constant(h), tf.constant(w), tf.constant([7, i], tf.int64), 224)]
    assert 0 <= y and 0 <= x and ch >= 1 and cw >= 1
    assert y + ch <= h and x + cw <= w
    areas.append(ch * cw / (h * w))
    aspects.append(cw / ch)
  # Integer rounding of the box lets the bounds slip by a pixel or so.
  assert 0.07 < min(areas) and max(areas) <= 1.0
  assert 0.7 < min(aspects) and max(aspects) < 1.4
  assert np.std(areas) > 0.1  # Random, not a fixed crop.


def test_inception_falls_back_to_center_crop_when_sampling_fails():
  # A 1000x10 strip: no box of aspect 3/4..4/3 covers >= 8% of it, so all 10
  # attempts fail and the padded centre crop must be used.
  window = preprocessing.inception_crop_window(
      tf.constant(1000), tf.constant(10), tf.constant([0, 1], tf.int64), 224)
  assert [int(v) for v in window] == [496, 1, 8, 8]


def test_center_crop_window_geometry():
  # side = int(224 / 256 * 100) = 87; offsets round up: (13+1)//2, (113+1)//2.
  window = preprocessing.center_crop_window(tf.constant(100), tf.constant(200), 224)
  assert [int(v) for v in window] == [7, 57, 87, 87]


def test_resize_crop_32_takes_the_central_square(coords):
  array, data = coords
  square = array[:64]
  # Resizing 64 -> S + 32 = 64 is the identity, so the crop is visible exactly.
  out = preprocessing.eval_resize_crop_32(_encode(square, "PNG"), 32, 3)
  np.testing.assert_allclose(out.numpy(), square[16:48, 16:48], atol=1e-3)


def test_crop_resize_keeps_aspect(coords):
  array, data = coords
  # 96x64, S=32: side = 32/64 * 64 = 32, y = (64+1)//2 = 32, x = (32+1)//2 = 16.
  out = preprocessing.eval_crop_resize(data, 32, 3)
  np.testing.assert_allclose(out.numpy(), array[32:64, 16:48], atol=1e-3)


def test_eval_output_is_normalised(coords):
  mean = np.array(normalization.MEAN_RGB, np.uint8)
  flat = np.broadcast_to(mean, (40, 40, 3)).copy()
  out = preprocessing.preprocess_eval(_encode(flat, "PNG"), method="resize_crop_32",
                                      size=24, channels=3).numpy()
  assert out.shape == (24, 24, 3) and out.dtype == np.float32
  # The uint8 mean pixel maps to (round-down error)/std, i.e. ~0, per channel.
  expected = (flat[0, 0] - np.array(normalization.MEAN_RGB)) / np.array(
      normalization.STDDEV_RGB)
  np.testing.assert_allclose(out, np.broadcast_to(expected, out.shape), atol=1e-4)
  assert np.abs(out).max() < 0.02


@pytest.mark.parametrize("method", sorted(preprocessing.TRAIN_PREPROCS))
def test_train_methods_shapes_and_determinism(coords, method):
  _, data = coords
  run = lambda s: preprocessing.preprocess_train(
      data, tf.constant(s, tf.int64), method=method, size=40, channels=3,
      flip=True).numpy()
  a, b, c = run([1, 2]), run([1, 2]), run([1, 3])
  assert a.shape == (40, 40, 3) and a.dtype == np.float32
  np.testing.assert_array_equal(a, b)
  if method != "resize_only":
    assert not np.array_equal(a, c)


def test_inception_crop_on_jpeg_is_unclipped_bicubic():
  rng = np.random.default_rng(0)
  noisy = rng.integers(0, 256, (120, 160, 3), dtype=np.uint8)
  out = preprocessing.train_inception_crop(_encode(noisy, "JPEG"),
                                           tf.constant([0, 5], tf.int64), 64, 3)
  out = out.numpy()
  # Bicubic overshoot on noise is not clipped, as the paper's pipeline.
  assert out.min() < 0 or out.max() > 255


def test_random_crop_pad4_is_a_shift_of_the_zero_padded_image(coords):
  array, _ = coords
  square = array[:32, :32]
  out = preprocessing.train_random_crop_pad4(
      _encode(square, "PNG"), tf.constant([3, 4], tf.int64), 32, 3).numpy()
  padded = np.pad(square.astype(np.float32), [(4, 4), (4, 4), (0, 0)])
  matches = [(dy, dx) for dy in range(9) for dx in range(9)
             if np.allclose(padded[dy:dy + 32, dx:dx + 32], out, atol=1e-3)]
  assert len(matches) == 1


def test_grayscale_png_keeps_one_channel():
  digit = np.zeros((28, 28, 1), np.uint8)
  digit[10:18, 12:16] = 255
  out = preprocessing.preprocess_train(
      _encode(digit, "PNG"), tf.constant([0, 0], tf.int64),
      method="resize_only", size=28, channels=1, flip=False).numpy()
  assert out.shape == (28, 28, 1)
  np.testing.assert_allclose(out, digit, atol=1e-3)  # Same size: identity.


def test_unknown_method_names_are_rejected():
  with pytest.raises(ValueError, match="train_preproc"):
    preprocessing.check_preproc_names("random_erase", "resize_crop_32")
  with pytest.raises(ValueError, match="eval_preproc"):
    preprocessing.check_preproc_names("inception_crop", "center")
  with pytest.raises(ValueError, match="1 or 3 channels"):
    normalization.mean_std(4)
