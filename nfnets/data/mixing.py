"""Batch-level augmentation: MixUp, CutMix, and RandAugment after mixing.

As in the paper's pipeline, mixing consumes TWO input examples per output
example: the input batch has 2B images, image i of the output is made from
input i ("first") and input B+i ("partner"). With both MixUp and CutMix on, the
first B//2 outputs are MixUp pairs and the rest CutMix pairs. One MixUp ratio
and one CutMix box are drawn per batch (as the official code does), from a
stateless seed, so a batch is a pure function of its seed.

'mix_ratio' is always the weight of 'labels' (the first image's label):
  MixUp:  x = r * first + (1 - r) * partner, r ~ Beta(alpha, alpha);
  CutMix: the partner's pixels are pasted into a box of side sqrt(1 - U) * size
          (centre uniform, box clipped to the image), and r = the fraction of
          the first image still visible = 1 - clipped box area / image area.
The loss is r * CE(labels) + (1 - r) * CE(mix_labels).

RandAugment runs AFTER mixing, per output example, on clipped uint8 images
(official `augment_before_mix=False`): clip to [0, 255] -> uint8 -> RA ->
float32.
"""

from typing import Any, Callable, Optional

import tensorflow as tf


def parse_randaugment(level: Any) -> Optional[tuple[int, int]]:
  """'405' -> (num_layers 4, magnitude 5); None/''/'none' -> None (off).

  Args:
    level: the config's `data.randaugment`, an int or digit string >= 100
      whose hundreds give the number of layers and the rest the magnitude.

  Returns:
    (num_layers, magnitude) or None.
  """
  if level is None or str(level).strip().lower() in ("", "none", "0"):
    return None
  text = str(level).strip()
  if not text.isdigit() or int(text) < 100:
    raise ValueError(f"data.randaugment must be like '405' (4 layers, "
                     f"magnitude 5) or None, got {level!r}.")
  value = int(text)
  return value // 100, value % 100


def sample_beta(seed: tf.Tensor, alpha: float) -> tf.Tensor:
  """One Beta(alpha, alpha) sample as G1 / (G1 + G2), Gi ~ Gamma(alpha)."""
  # float64: with alpha = 0.2 both gammas can be ~1e-30, which would underflow
  # the float32 sum to 0 now and then.
  gammas = tf.random.stateless_gamma([2], seed, alpha=alpha, dtype=tf.float64)
  ratio = gammas[0] / tf.maximum(gammas[0] + gammas[1], 1e-300)
  return tf.cast(ratio, tf.float32)


def cutmix_box(seed: tf.Tensor, size: int) -> tf.Tensor:
  """The pasted box (y0, x0, y1, x1), int32, clipped to [0, size]."""
  u, cy, cx = tf.unstack(tf.random.stateless_uniform([3], seed))
  side = tf.sqrt(1.0 - u) * size
  centre_y, centre_x = cy * size, cx * size
  clip = lambda v: tf.clip_by_value(tf.cast(tf.round(v), tf.int32), 0, size)
  return tf.stack([clip(centre_y - side / 2), clip(centre_x - side / 2),
                   clip(centre_y + side / 2), clip(centre_x + side / 2)])


def box_mask(box: tf.Tensor, size: int) -> tf.Tensor:
  """bool [size, size, 1]: True inside the box."""
  idx = tf.range(size)
  rows = tf.logical_and(idx >= box[0], idx < box[2])
  cols = tf.logical_and(idx >= box[1], idx < box[3])
  return tf.logical_and(rows[:, None], cols[None, :])[..., None]


def mix_batch(images: tf.Tensor, labels: tf.Tensor, seed: tf.Tensor, *,
              mixup_alpha: Optional[float], cutmix: bool) -> dict[str, tf.Tensor]:
  """Mixes a batch of 2B examples into B.

  Args:
    images: float32 [2B, S, S, C] (0..255 scale, before normalisation).
    labels: int [2B].
    seed: stateless seed of this batch, shape [2].
    mixup_alpha: Beta parameter of MixUp; None or 0 disables MixUp.
    cutmix: whether to apply CutMix.

  Returns:
    {'images' [B,S,S,C], 'labels' [B], 'mix_labels' [B], 'mix_ratio' [B]}.
  """
  use_mixup = bool(mixup_alpha)
  if not (use_mixup or cutmix):
    raise ValueError("mix_batch needs mixup_alpha > 0 or cutmix=True.")
  num = images.shape[0] // 2
  size = images.shape[1]
  first, partner = images[:num], images[num:2 * num]
  labels = tf.cast(labels, tf.int32)
  num_mixup = (num // 2 if cutmix else num) if use_mixup else 0
  mixup_seed, cutmix_seed = tf.unstack(
      tf.random.experimental.stateless_split(seed, 2))

  mixed, ratios = [], []
  if num_mixup:
    r = sample_beta(mixup_seed, float(mixup_alpha))
    mixed.append(r * first[:num_mixup] + (1 - r) * partner[:num_mixup])
    ratios.append(tf.fill([num_mixup], r))
  if num_mixup < num:
    box = cutmix_box(cutmix_seed, size)
    mask = box_mask(box, size)
    mixed.append(tf.where(mask[None], partner[num_mixup:], first[num_mixup:]))
    area = tf.cast((box[2] - box[0]) * (box[3] - box[1]), tf.float32)
    ratios.append(tf.fill([num - num_mixup], 1.0 - area / (size * size)))
  return {
      "images": tf.concat(mixed, axis=0),
      "labels": labels[:num],
      "mix_labels": labels[num:2 * num],
      "mix_ratio": tf.concat(ratios, axis=0),
  }


def load_randaugment() -> Callable[..., tf.Tensor]:
  """The RandAugment op (nfnets/data/randaugment.py), imported lazily."""
  from nfnets.data import randaugment as randaugment_lib  # pylint: disable=g-import-not-at-top
  return randaugment_lib.randaugment


def apply_randaugment(image: tf.Tensor, seed: tf.Tensor, num_layers: int,
                      magnitude: float,
                      randaugment_fn: Optional[Callable[..., tf.Tensor]] = None
                      ) -> tf.Tensor:
  """clip -> uint8 -> RandAugment(num_layers, magnitude) -> float32.

  Args:
    image: float32 [S, S, C], C in {1, 3}, 0..255 scale.
    seed: stateless seed of this example, shape [2].
    num_layers: ops applied in sequence.
    magnitude: strength on the 0..10 scale.
    randaugment_fn: the op; default `load_randaugment()`.

  Returns:
    float32 [S, S, C].
  """
  randaugment_fn = randaugment_fn or load_randaugment()
  channels = image.shape[-1]
  pixels = tf.cast(tf.clip_by_value(image, 0.0, 255.0), tf.uint8)
  if channels == 1:
    # RA's colour ops expect RGB; a gray image tiled to RGB stays gray under
    # every op, so the first channel carries the result.
    pixels = tf.tile(pixels, [1, 1, 3])
  out = randaugment_fn(pixels, num_layers, magnitude, seed)
  out = tf.cast(out, tf.float32)
  if channels == 1:
    out = out[..., :1]
  return tf.ensure_shape(out, image.shape)
