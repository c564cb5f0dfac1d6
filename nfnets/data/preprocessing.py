"""Per-example decoding, cropping and resizing in TensorFlow (stateless ops).

Every random choice takes an explicit `seed` (int32/int64 tensor of shape [2])
and uses tf's STATELESS ops, so an example's augmentation depends only on its
seed: the pipeline derives that seed from (training seed, host, position in the
example stream), which is what makes batches reproducible after a resume.

Images come in as encoded bytes. For JPEG the crop window is computed from the
header alone (`extract_jpeg_shape`) and the crop is fused into the decode
(`decode_and_crop_jpeg`), so only the cropped pixels are decompressed; other
formats (PNG, BMP, GIF) are decoded in full and then sliced.

Outputs are float32 on the 0..255 scale, NOT clipped: bicubic resizing
overshoots (values like -51 or 337 are expected), as in the paper's pipeline.

The eval protocols have a numpy twin for inference without TensorFlow,
nfnets/inference/preprocess.py, with the same arithmetic; how the two differ
(JPEG decoding only) is documented and measured there.
"""

from typing import Callable

from nfnets.data import normalization
from nfnets.quiet_tensorflow import tf

# Eval-style crops keep S/(S+32) of the shorter side (official `crop_padding`).
CROP_PADDING = 32

WindowFn = Callable[[tf.Tensor, tf.Tensor], tuple[tf.Tensor, tf.Tensor, tf.Tensor, tf.Tensor]]


def decode_window(image_bytes: tf.Tensor, channels: int,
                  window_fn: WindowFn) -> tf.Tensor:
  """Decodes only the window `window_fn(height, width) -> (y, x, h, w)`.

  Args:
    image_bytes: scalar string tensor of an encoded image.
    channels: 1 or 3; images are converted to this many channels.
    window_fn: maps the full image size to a crop window (int32 scalars).

  Returns:
    uint8 [h, w, channels].
  """
  def jpeg():
    shape = tf.image.extract_jpeg_shape(image_bytes)
    y, x, h, w = window_fn(shape[0], shape[1])
    return tf.image.decode_and_crop_jpeg(image_bytes, tf.stack([y, x, h, w]),
                                         channels=channels)

  def other():
    image = tf.io.decode_image(image_bytes, channels=channels,
                               expand_animations=False)
    shape = tf.shape(image)
    y, x, h, w = window_fn(shape[0], shape[1])
    return image[y:y + h, x:x + w]

  image = tf.cond(tf.io.is_jpeg(image_bytes), jpeg, other)
  image.set_shape([None, None, channels])
  return image


def full_window(height: tf.Tensor, width: tf.Tensor):
  return tf.constant(0), tf.constant(0), height, width


def center_crop_window(height: tf.Tensor, width: tf.Tensor, size: int):
  """Square centre crop of side size/(size+32) * min(h, w) (official)."""
  side = tf.cast(size / (size + CROP_PADDING) *
                 tf.cast(tf.minimum(height, width), tf.float32), tf.int32)
  side = tf.maximum(side, 1)
  # +1 rounds the offset up when the margin is odd, as the official code does.
  return ((height - side) + 1) // 2, ((width - side) + 1) // 2, side, side


def inception_crop_window(height: tf.Tensor, width: tf.Tensor, seed: tf.Tensor,
                          size: int):
  """Random area/aspect crop (Szegedy et al.), centre crop if sampling fails.

  Args:
    height: image height (int32 scalar).
    width: image width (int32 scalar).
    seed: stateless seed, shape [2].
    size: output side; only used by the centre-crop fallback.

  Returns:
    (y, x, h, w) int32 scalars.
  """
  boxes = tf.constant([0.0, 0.0, 1.0, 1.0], tf.float32, shape=[1, 1, 4])
  begin, crop_size, _ = tf.image.stateless_sample_distorted_bounding_box(
      tf.stack([height, width, 3]), boxes, seed=seed,
      min_object_covered=0.1, aspect_ratio_range=(3 / 4, 4 / 3),
      area_range=(0.08, 1.0), max_attempts=10,
      use_image_if_no_bounding_boxes=True)
  y, x, h, w = begin[0], begin[1], crop_size[0], crop_size[1]
  # After 10 failed attempts the op returns the whole image; the paper's
  # pipeline then uses the eval-style centre crop instead.
  failed = tf.logical_and(tf.equal(h, height), tf.equal(w, width))
  cy, cx, ch, cw = center_crop_window(height, width, size)
  return (tf.where(failed, cy, y), tf.where(failed, cx, x),
          tf.where(failed, ch, h), tf.where(failed, cw, w))


def resize(image: tf.Tensor, size: int) -> tf.Tensor:
  """Bicubic resize to [size, size] (float32, no antialias, no clipping)."""
  return tf.image.resize(tf.cast(image, tf.float32), [size, size],
                         method=tf.image.ResizeMethod.BICUBIC)


def train_inception_crop(image_bytes: tf.Tensor, seed: tf.Tensor, size: int,
                         channels: int) -> tf.Tensor:
  """Fused inception crop + decode, then bicubic resize (ImageNet training)."""
  window = lambda h, w: inception_crop_window(h, w, seed, size)
  return resize(decode_window(image_bytes, channels, window), size)


def train_resize_only(image_bytes: tf.Tensor, seed: tf.Tensor, size: int,
                      channels: int) -> tf.Tensor:
  """No crop: the whole image squashed to size x size."""
  del seed  # Deterministic.
  return resize(decode_window(image_bytes, channels, full_window), size)


def train_random_crop_pad4(image_bytes: tf.Tensor, seed: tf.Tensor, size: int,
                           channels: int) -> tf.Tensor:
  """Resize to size, zero-pad 4 px, random size x size crop (small images).

  The CIFAR/MNIST-style augmentation: shifts of up to 4 px, sensible where an
  inception crop (down to 8% of the area) would destroy a 28 px digit.
  """
  image = train_resize_only(image_bytes, seed, size, channels)
  padded = tf.pad(image, [[4, 4], [4, 4], [0, 0]])
  return tf.image.stateless_random_crop(padded, [size, size, channels], seed)


def eval_resize_crop_32(image_bytes: tf.Tensor, size: int,
                        channels: int) -> tf.Tensor:
  """Square bicubic resize to size+32, then the central size x size (paper)."""
  image = resize(decode_window(image_bytes, channels, full_window),
                 size + CROP_PADDING)
  # Offset ((S+32 - S) + 1) // 2 = 16, the official rounding.
  offset = (CROP_PADDING + 1) // 2
  return image[offset:offset + size, offset:offset + size]


def eval_crop_resize(image_bytes: tf.Tensor, size: int,
                     channels: int) -> tf.Tensor:
  """Aspect-preserving centre crop of S/(S+32) of the short side, then resize."""
  window = lambda h, w: center_crop_window(h, w, size)
  return resize(decode_window(image_bytes, channels, window), size)


def eval_resize_only(image_bytes: tf.Tensor, size: int,
                     channels: int) -> tf.Tensor:
  """The whole image squashed to size x size (e.g. 28 px digits)."""
  return resize(decode_window(image_bytes, channels, full_window), size)


TRAIN_PREPROCS: dict[str, Callable[..., tf.Tensor]] = {
    "inception_crop": train_inception_crop,
    "resize_only": train_resize_only,
    "random_crop_pad4": train_random_crop_pad4,
}
EVAL_PREPROCS: dict[str, Callable[..., tf.Tensor]] = {
    "resize_crop_32": eval_resize_crop_32,
    "crop_resize": eval_crop_resize,
    "resize_only": eval_resize_only,
}


def _lookup(registry: dict[str, Callable[..., tf.Tensor]], name: str,
            field: str) -> Callable[..., tf.Tensor]:
  if name not in registry:
    raise ValueError(f"Unknown data.{field} {name!r}: use one of "
                     f"{sorted(registry)}.")
  return registry[name]


def check_preproc_names(train_preproc: str, eval_preproc: str) -> None:
  """Fails fast (before any data is read) on unknown method names."""
  _lookup(TRAIN_PREPROCS, train_preproc, "train_preproc")
  _lookup(EVAL_PREPROCS, eval_preproc, "eval_preproc")


def preprocess_train(image_bytes: tf.Tensor, seed: tf.Tensor, *, method: str,
                     size: int, channels: int, flip: bool) -> tf.Tensor:
  """Decode + crop + resize (+ flip) one training example.

  Args:
    image_bytes: scalar string tensor.
    seed: stateless seed of this example, shape [2].
    method: a key of TRAIN_PREPROCS.
    size: output side in pixels.
    channels: 1 or 3.
    flip: whether to apply a random horizontal flip (off for digits/text).

  Returns:
    float32 [size, size, channels] on the 0..255 scale (not normalised, so
    MixUp/CutMix and RandAugment can run before normalisation).
  """
  crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
  image = _lookup(TRAIN_PREPROCS, method, "train_preproc")(
      image_bytes, crop_seed, size, channels)
  if flip:
    image = tf.image.stateless_random_flip_left_right(image, flip_seed)
  return tf.ensure_shape(image, [size, size, channels])


def preprocess_eval(image_bytes: tf.Tensor, *, method: str, size: int,
                    channels: int) -> tf.Tensor:
  """Deterministic eval crop, normalised. float32 [size, size, channels]."""
  image = _lookup(EVAL_PREPROCS, method, "eval_preproc")(
      image_bytes, size, channels)
  return normalization.normalize(tf.ensure_shape(image, [size, size, channels]), channels,
                                 xp=tf.experimental.numpy)
