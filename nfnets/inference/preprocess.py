"""The evaluator's preprocessing in numpy and PIL, for inference without TensorFlow.

The same three protocols as `nfnets.data.preprocessing` (the TensorFlow ops the training-time
evaluator runs), with the same names and arithmetic:

  resize_crop_32  square bicubic resize of the whole image to S + 32, then the central S x S
                  (the paper's protocol; the offset (32 + 1) // 2 = 16 is the official rounding)
  crop_resize     the central square of side S / (S + 32) of the shorter side, resized to S
  resize_only     the whole image squashed to S x S

Each is one function here and one there; this module owns the numpy arithmetic, that one the
TensorFlow arithmetic. Bicubic resizing reproduces TensorFlow's `ResizeBicubic` (what
`tf.image.resize(..., 'bicubic')` runs): Keys' kernel with a = -0.5, half-pixel centres, no
antialiasing, taps outside the image dropped and the remaining weights renormalised, and the
fractional position rounded to 1/1024 as in TensorFlow's coefficient table. The results differ
by decoding only (measured on real photographs in tests/inference/test_preprocess.py):

* PNG (8- and 16-bit, grey, palette, alpha), BMP and GIF decode to the same pixels; resized
  and normalised, the images agree to float32 round-off (< 1e-5).
* JPEG: PIL decodes with libjpeg's accurate integer IDCT, TensorFlow with its fast one (its
  default `dct_method`; asked for 'INTEGER_ACCURATE' it gives PIL's pixels exactly), so pixels
  differ by about one level on average (up to ~20 at a few); resized and normalised, values
  differ by ~0.02 on average and at most ~0.3, in units of the data's standard deviation.
* One-channel models on colour images: PIL converts with ITU-R 601 luma weights, TensorFlow's
  PNG decoder with its own, so grey levels differ by about one level (~0.02 normalised).
* 8-bit palette BMPs: TensorFlow reads the palette indices as grey levels (a wrong picture);
  PIL applies the palette.
* Neither path applies EXIF orientation: a photo is classified as its pixels are stored.

Input files are read through `nfnets.files`: regular files only, and an image whose header
declares more than NFNETS_MAX_IMAGE_PIXELS pixels is refused before its pixels are decoded.
"""

from __future__ import annotations

import functools
import io
import os
import re
import warnings
from typing import Callable, Union

import numpy as np

from nfnets import files
from nfnets.data import normalization

# Eval crops keep S / (S + 32) of the image (the official `crop_padding`).
CROP_PADDING = 32
# TensorFlow's bicubic kernel is tabulated at 1/1024 steps of the fractional position.
_TABLE_SIZE = 1024
_KEYS_A = -0.5

Image = Union[str, os.PathLike, bytes, np.ndarray]


def decode(data: bytes, where: str, channels: int) -> np.ndarray:
  """uint8 [H, W, channels] pixels of an encoded image, its size checked before decoding.

  Args:
    data: the encoded file (JPEG, PNG, BMP, GIF: the first frame).
    where: the file's name, for messages.
    channels: 3 (RGB; grey images are repeated, alpha is dropped) or 1 (luma).

  Raises:
    files.UnreadableFileError: over the pixel limit, or not a readable image.
  """
  from PIL import Image as PILImage  # pylint: disable=g-import-not-at-top
  files.check_image_pixels(data, where)
  try:
    with warnings.catch_warnings():
      # The size is checked above against our own limit; PIL's warning would be a second,
      # multi-line report of the same thing.
      warnings.simplefilter("ignore", PILImage.DecompressionBombWarning)
      with PILImage.open(io.BytesIO(data)) as image:
        image.seek(0)
        if image.mode.startswith("I;16"):
          # 16-bit grey: keep the high byte, as TensorFlow's uint8 decoding does.
          pixels = (np.asarray(image, np.uint16) >> 8).astype(np.uint8)
          image = PILImage.fromarray(pixels)
        pixels = np.asarray(image.convert("RGB" if channels == 3 else "L"))
  except files.UnreadableFileError:
    raise
  except Exception as e:  # pylint: disable=broad-except  (PIL raises many kinds on bad data)
    raise files.UnreadableFileError(
        f"{files.printable(where)}: not a readable image ({_reason(e)})") from None
  return pixels.reshape(pixels.shape[:2] + (channels,))


def _reason(error: BaseException) -> str:
  """A decoder error's first line, without the buffer object PIL names in some messages."""
  text = str(error).strip().splitlines()
  line = re.sub(r"\s*<[\w.]+ object at 0x[0-9a-fA-F]+>", "", text[0]) if text else ""
  return files.printable(line[:200]) if line else type(error).__name__


@functools.lru_cache(maxsize=64)
def _taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray]:
  """(indices [out, 4], weights [out, 4]) of a bicubic resize along one axis, as TensorFlow.

  The output pixel i samples the input at (i + 0.5) * in / out - 0.5 (half-pixel centres)
  with the four taps floor(x) - 1 ... floor(x) + 2 weighted by Keys' cubic (a = -0.5).
  """
  scale = np.float32(in_size) / np.float32(out_size)
  x = (np.arange(out_size, dtype=np.float32) + np.float32(0.5)) * scale - np.float32(0.5)
  base = np.floor(x)
  offset = np.rint((x - base) * _TABLE_SIZE).astype(np.int64)  # lrintf: half to even.
  t = offset.astype(np.float32) / _TABLE_SIZE
  # Keys' kernel at distances 1 + t, t, 1 - t and 2 - t from the four taps.
  a = np.float32(_KEYS_A)
  near = lambda d: ((a + 2) * d - (a + 3)) * d * d + 1
  far = lambda d: ((a * d - 5 * a) * d + 8 * a) * d - 4 * a
  weights = np.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], axis=1).astype(np.float32)
  indices = base.astype(np.int64)[:, None] + np.arange(-1, 3)[None, :]
  inside = (indices >= 0) & (indices < in_size)
  weights = np.where(inside, weights, np.float32(0))
  weights /= weights.sum(axis=1, keepdims=True)
  return np.clip(indices, 0, in_size - 1), weights.astype(np.float32)


def _resample(x: np.ndarray, axis: int, indices: np.ndarray, weights: np.ndarray) -> np.ndarray:
  """float32 sum over k of weights[:, k] * x.take(indices[:, k], axis): one axis of a resize."""
  shape = [1] * x.ndim
  shape[axis] = -1
  out = np.multiply(np.take(x, indices[:, 0], axis=axis), weights[:, 0].reshape(shape),
                    dtype=np.float32)
  tmp = np.empty_like(out)
  for k in range(1, indices.shape[1]):
    np.multiply(np.take(x, indices[:, k], axis=axis), weights[:, k].reshape(shape), out=tmp)
    out += tmp
  return out


def resize(image: np.ndarray, size: int) -> np.ndarray:
  """float32 [size, size, C]: bicubic resize of [H, W, C] pixels (no antialias, no clipping).

  Values overshoot 0..255 near edges, as TensorFlow's do. Rows are resampled first, from the
  uint8 pixels, so a large photo is never held as float32 at full size.
  """
  rows, row_weights = _taps(image.shape[0], size)
  cols, col_weights = _taps(image.shape[1], size)
  return _resample(_resample(image, 0, rows, row_weights), 1, cols, col_weights)


def center_crop_window(height: int, width: int, size: int) -> tuple[int, int, int, int]:
  """(y, x, h, w) of the central square of side size / (size + 32) * min(h, w) (official).

  float32 arithmetic and truncation, as `nfnets.data.preprocessing.center_crop_window`.
  """
  side = int(np.float32(size / (size + CROP_PADDING)) * np.float32(min(height, width)))
  side = max(side, 1)
  # +1 rounds the offset up when the margin is odd, as the official code does.
  return ((height - side) + 1) // 2, ((width - side) + 1) // 2, side, side


def eval_resize_crop_32(pixels: np.ndarray, size: int) -> np.ndarray:
  """Square bicubic resize to size + 32, then the central size x size (paper)."""
  offset = (CROP_PADDING + 1) // 2
  return resize(pixels, size + CROP_PADDING)[offset:offset + size, offset:offset + size]


def eval_crop_resize(pixels: np.ndarray, size: int) -> np.ndarray:
  """Aspect-preserving centre crop of size / (size + 32) of the short side, then resize."""
  y, x, h, w = center_crop_window(pixels.shape[0], pixels.shape[1], size)
  return resize(pixels[y:y + h, x:x + w], size)


def eval_resize_only(pixels: np.ndarray, size: int) -> np.ndarray:
  """The whole image squashed to size x size (e.g. 28 px digits)."""
  return resize(pixels, size)


EVAL_PREPROCS: dict[str, Callable[[np.ndarray, int], np.ndarray]] = {
    "resize_crop_32": eval_resize_crop_32,
    "crop_resize": eval_crop_resize,
    "resize_only": eval_resize_only,
}


def pixels_of(image: Image, channels: int) -> np.ndarray:
  """uint8 [H, W, channels] of a path, encoded bytes or an array of pixels.

  Raises:
    files.UnreadableFileError: not a regular file, over the size limits, or not an image.
    OSError: the file cannot be opened (missing, permissions).
  """
  if isinstance(image, np.ndarray):
    pixels = image[..., None] if image.ndim == 2 else image
    if pixels.ndim != 3 or pixels.shape[-1] not in (1, 3, 4):
      raise ValueError(f"pixels of shape {image.shape}: pass [H, W], [H, W, 1], [H, W, 3] or "
                       "[H, W, 4]")
    if pixels.shape[-1] != channels:
      from PIL import Image as PILImage  # pylint: disable=g-import-not-at-top
      mode = {1: "L", 3: "RGB", 4: "RGBA"}[pixels.shape[-1]]
      converted = PILImage.fromarray(pixels.astype(np.uint8).squeeze(-1) if mode == "L"
                                     else pixels.astype(np.uint8), mode)
      pixels = np.asarray(converted.convert("RGB" if channels == 3 else "L"))
      pixels = pixels.reshape(pixels.shape[:2] + (channels,))
    return pixels.astype(np.uint8)
  if isinstance(image, bytes):
    return decode(image, "image bytes", channels)
  path = os.fspath(image)
  return decode(files.read_regular_file(path), path, channels)


def preprocess_eval(image: Image, *, method: str, size: int, channels: int) -> np.ndarray:
  """The evaluator's preprocessing: float32 [size, size, channels], normalised.

  The numpy twin of `nfnets.data.preprocessing.preprocess_eval` (see the module docstring).
  """
  if method not in EVAL_PREPROCS:
    raise ValueError(f"Unknown eval_preproc {method!r}: use one of {sorted(EVAL_PREPROCS)}.")
  image = EVAL_PREPROCS[method](pixels_of(image, channels), size)
  return normalization.normalize(image, channels).astype(np.float32)
