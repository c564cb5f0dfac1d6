"""Tests for nfnets.inference.preprocess: the evaluator's protocols in numpy, against TensorFlow's.

Tolerances found on the three real photographs (tests/photos.py), every protocol, 32-256 px,
in normalised units (one unit = one standard deviation of ImageNet's pixels):
  lossless formats: max |numpy - TF| 2.2e-6 (float32 round-off: the same pixels, the same
      bicubic table), asserted <= 1e-5;
  the JPEG files themselves: mean 0.017-0.025, max 0.28, asserted <= 0.03 / 0.4 (TensorFlow
      decodes with libjpeg's fast IDCT, PIL with the accurate one; with the accurate one TF
      gives PIL's pixels exactly, which is asserted too).
8-bit palette BMPs are left out: TensorFlow reads their palette indices as grey levels.
"""

import io

import numpy as np
import pytest

from tests.photos import PHOTOS, photo, photo_path
from nfnets.inference import preprocess

tf = pytest.importorskip("tensorflow")
from nfnets.data import preprocessing as tf_preprocessing  # pylint: disable=g-import-not-at-top,wrong-import-position

LOSSLESS_TOL = 1e-5
JPEG_MEAN_TOL, JPEG_MAX_TOL = 0.03, 0.4


def _encode(image, fmt: str) -> bytes:
  buffer = io.BytesIO()
  image.save(buffer, fmt)
  return buffer.getvalue()


def _both(data: bytes, method: str, size: int, channels: int = 3):
  want = tf_preprocessing.preprocess_eval(tf.constant(data), method=method, size=size,
                                          channels=channels).numpy()
  got = preprocess.preprocess_eval(data, method=method, size=size, channels=channels)
  assert got.shape == want.shape == (size, size, channels) and got.dtype == np.float32
  return got, want


def test_same_protocols_and_constants_as_the_evaluator():
  assert sorted(preprocess.EVAL_PREPROCS) == sorted(tf_preprocessing.EVAL_PREPROCS)
  assert preprocess.CROP_PADDING == tf_preprocessing.CROP_PADDING
  for height, width, size in [(480, 640, 224), (401, 333, 256), (28, 28, 28), (5, 9, 32),
                              (1, 1000, 192)]:
    window = tf_preprocessing.center_crop_window(tf.constant(height), tf.constant(width), size)
    assert preprocess.center_crop_window(height, width, size) == tuple(int(v) for v in window)


@pytest.mark.parametrize("method", sorted(preprocess.EVAL_PREPROCS))
def test_lossless_images_match_tensorflow_to_round_off(method):
  from PIL import Image  # pylint: disable=g-import-not-at-top
  for name in PHOTOS:
    data = _encode(Image.fromarray(photo(name)), "PNG")
    for size in (32, 224, 256):  # Down to a thumbnail and near the photos' own size.
      got, want = _both(data, method, size)
      assert np.abs(got - want).max() <= LOSSLESS_TOL, (name, size)
  # Upsampling a small image, and what else a folder holds: grey, alpha, palette, 16-bit.
  small = photo("china")[100:140, 200:260]
  for image in (Image.fromarray(small), Image.fromarray(small).convert("L"),
                Image.fromarray(np.dstack([small, small[..., :1]])),
                Image.fromarray(small).convert("P"),
                Image.fromarray(small[..., 0].astype(np.uint16) * 257)):
    for fmt in {"RGB": ("PNG", "BMP", "GIF"), "P": ("PNG", "GIF")}.get(image.mode, ("PNG",)):
      got, want = _both(_encode(image, fmt), method, 64)
      assert np.abs(got - want).max() <= LOSSLESS_TOL, (image.mode, fmt)


def test_palette_bmp_tensorflow_reads_the_indices_pil_the_colours():
  from PIL import Image  # pylint: disable=g-import-not-at-top
  small = photo("china")[100:140, 200:260]
  data = _encode(Image.fromarray(small).convert("P"), "BMP")
  indices = np.asarray(Image.open(io.BytesIO(data)))
  assert np.array_equal(tf.io.decode_image(data, channels=3).numpy()[..., 1], indices)
  colours = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
  np.testing.assert_array_equal(preprocess.pixels_of(data, 3), colours)


@pytest.mark.parametrize("method", sorted(preprocess.EVAL_PREPROCS))
def test_jpeg_photographs_differ_by_the_decoders_idct_only(method):
  for name in PHOTOS:
    with open(photo_path(name), "rb") as f:
      data = f.read()
    got, want = _both(data, method, 224)
    diff = np.abs(got - want)
    assert diff.mean() <= JPEG_MEAN_TOL and diff.max() <= JPEG_MAX_TOL, (name, diff.mean(),
                                                                          diff.max())
  accurate = tf.io.decode_jpeg(data, channels=3, dct_method="INTEGER_ACCURATE").numpy()
  np.testing.assert_array_equal(preprocess.pixels_of(data, 3), accurate)


def test_grey_models_and_arrays():
  from PIL import Image  # pylint: disable=g-import-not-at-top
  grey = photo("flower")[::4, ::4].mean(-1).astype(np.uint8)
  got, want = _both(_encode(Image.fromarray(grey), "PNG"), "resize_only", 28, channels=1)
  assert np.abs(got - want).max() <= LOSSLESS_TOL
  # Arrays of pixels are taken as they are: [H, W] grey, [H, W, 3] colour.
  np.testing.assert_array_equal(
      preprocess.preprocess_eval(grey, method="resize_only", size=28, channels=1), got)
  rgb = photo("flower")[::4, ::4]
  np.testing.assert_allclose(
      preprocess.preprocess_eval(rgb, method="resize_crop_32", size=32, channels=3),
      _both(_encode(Image.fromarray(rgb), "PNG"), "resize_crop_32", 32)[1], atol=LOSSLESS_TOL)


def test_unreadable_and_oversized_images_are_refused_by_name(tmp_path, monkeypatch):
  from nfnets import files  # pylint: disable=g-import-not-at-top
  with pytest.raises(files.UnreadableFileError, match="x.png: not a readable image"):
    preprocess.decode(b"\x89PNG\r\n\x1a\n truncated", "x.png", 3)
  from PIL import Image  # pylint: disable=g-import-not-at-top
  data = _encode(Image.fromarray(photo("china")[:100, :150]), "PNG")
  monkeypatch.setenv("NFNETS_MAX_IMAGE_PIXELS", str(100 * 150 - 1))
  with pytest.raises(files.UnreadableFileError, match="150 x 100 pixels, over the limit"):
    preprocess.decode(data, "big.png", 3)
  with pytest.raises(ValueError, match="Unknown eval_preproc 'squash'"):
    preprocess.preprocess_eval(data, method="squash", size=32, channels=3)
