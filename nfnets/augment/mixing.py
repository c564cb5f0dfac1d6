"""MixUp and CutMix per example, as the paper's pipeline draws them, in JAX on the device.

The official pipeline decodes two input images per output example and mixes within each
*device's* batch: of the 2B inputs, the first quarter is mixed with the second into B/2 MixUp
outputs and the third with the fourth into B/2 CutMix outputs, every output with its own
MixUp ratio r ~ Beta(alpha, alpha) and its own CutMix box. Here that happens inside the train
step (`nfnets.augment.make_augment`). The pairing and the draws happen inside fixed-size *groups*
of the global batch (`data.mix_group_size` outputs, the paper's per-core batch by default; every
device holds whole groups): group g is mixed with the key fold_in(step key, g), so every group
holds both kinds, no two examples share a ratio or a box, a resumed run redraws exactly the same
ones, and the draws do not depend on how many devices or hosts share the batch.

  MixUp:  x = r * first + (1 - r) * partner, label weight r;
  CutMix: x = first inside the box, partner outside; the box has side ratio sqrt(1 - U),
          U ~ U(0, 1), around a uniform integer centre, clipped to the image, and the label
          weight of `first` is the fraction of the image the box covers (what is visible).

`mix_ratio` is always the weight of 'labels' (the first image's label); the loss is
r * CE(labels) + (1 - r) * CE(mix_labels).

Two ways to pair (`data.mix_mode`), inside each group of G outputs:
  'paper': 2G decoded inputs, paired as above (two decodes per mixed output);
  'fast':  G decoded inputs; output i pairs image i with image (i + 1) mod G of the same group,
           so the host decodes half as many images. Every image is still used twice
           per epoch, once as `first` and once as a partner, but partners are neighbours in
           the shuffled order instead of independent draws.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp


class Mixed(NamedTuple):
  """A mixed device batch.

  Attributes:
    images: float32 [B, H, W, C] on the 0..255 scale.
    labels: int32 [B] labels of the first images.
    mix_labels: int32 [B] labels of the partners.
    mix_ratio: float32 [B] weight of `labels`.
    is_cutmix: bool [B], True for the CutMix outputs (for tests and statistics).
  """
  images: jax.Array
  labels: jax.Array
  mix_labels: jax.Array
  mix_ratio: jax.Array
  is_cutmix: jax.Array


def mixup(first: jax.Array, partner: jax.Array, ratio: jax.Array) -> jax.Array:
  """r_i * first_i + (1 - r_i) * partner_i, per example, in float32."""
  r = ratio.astype(jnp.float32)[:, None, None, None]
  return r * first.astype(jnp.float32) + (1.0 - r) * partner.astype(jnp.float32)


def cutmix_boxes(key: jax.Array, num: int, height: int, width: int) -> jax.Array:
  """int32 [num, 4] boxes (y0, x0, y1, x1), each drawn independently, clipped to the image.

  Side ratio sqrt(1 - U) of the image's height and width, half-sides rounded down, centre a
  uniform integer pixel (the official `cutmix_padding`).
  """
  k_area, k_y, k_x = jax.random.split(key, 3)
  side = jnp.sqrt(1.0 - jax.random.uniform(k_area, (num,)))
  half_h = jnp.floor(side * height).astype(jnp.int32) // 2
  half_w = jnp.floor(side * width).astype(jnp.int32) // 2
  cy = jax.random.randint(k_y, (num,), 0, height)
  cx = jax.random.randint(k_x, (num,), 0, width)
  return jnp.stack([jnp.clip(cy - half_h, 0, height), jnp.clip(cx - half_w, 0, width),
                    jnp.clip(cy + half_h, 0, height), jnp.clip(cx + half_w, 0, width)], -1)


def box_masks(boxes: jax.Array, height: int, width: int) -> jax.Array:
  """bool [num, H, W, 1]: True inside each box."""
  rows = jnp.arange(height)[None, :]
  cols = jnp.arange(width)[None, :]
  in_rows = (rows >= boxes[:, 0:1]) & (rows < boxes[:, 2:3])
  in_cols = (cols >= boxes[:, 1:2]) & (cols < boxes[:, 3:4])
  return (in_rows[:, :, None] & in_cols[:, None, :])[..., None]


def cutmix(first: jax.Array, partner: jax.Array, boxes: jax.Array) -> tuple[jax.Array, jax.Array]:
  """`first` inside each box, `partner` outside; returns (images float32, first's weight)."""
  _, height, width, _ = first.shape
  masks = box_masks(boxes, height, width)
  images = jnp.where(masks, first.astype(jnp.float32), partner.astype(jnp.float32))
  area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
  return images, area.astype(jnp.float32) / (height * width)


def pair(images: jax.Array, labels: jax.Array, num_mixup: int, mode: str):
  """(first, partner, first labels, partner labels) of one device batch, see the docstring.

  Args:
    images: [n * B, H, W, C] with n = 2 ('paper') or 1 ('fast').
    labels: [n * B].
    num_mixup: how many of the B outputs are MixUp pairs (the first ones).
    mode: 'paper' or 'fast'.
  """
  if mode == 'fast':
    return images, jnp.roll(images, -1, axis=0), labels, jnp.roll(labels, -1, axis=0)
  if mode != 'paper':
    raise ValueError(f"mix mode must be 'paper' or 'fast', got {mode!r}.")
  if images.shape[0] % 2:
    raise ValueError(f"'paper' mixing needs 2 inputs per example, got {images.shape[0]} inputs.")
  num = images.shape[0] // 2
  num_cut = num - num_mixup
  # Quarters: [mixup firsts | mixup partners | cutmix firsts | cutmix partners].
  first_idx = jnp.concatenate([jnp.arange(num_mixup),
                               2 * num_mixup + jnp.arange(num_cut)])
  partner_idx = jnp.concatenate([num_mixup + jnp.arange(num_mixup),
                                 2 * num_mixup + num_cut + jnp.arange(num_cut)])
  return images[first_idx], images[partner_idx], labels[first_idx], labels[partner_idx]


def mix(images: jax.Array, labels: jax.Array, key: jax.Array, *, mixup_alpha: float,
        use_cutmix: bool, mode: str) -> Mixed:
  """Mixes one device batch: MixUp for the first half of the outputs, CutMix for the rest.

  With only one of the two enabled, every output uses it.

  Args:
    images: uint8 (or float) [n * B, H, W, C] on the 0..255 scale, n as `pair`.
    labels: int [n * B].
    key: the device's augmentation key for this step.
    mixup_alpha: Beta(alpha, alpha) of the MixUp ratio; 0 disables MixUp.
    use_cutmix: whether CutMix is on.
    mode: 'paper' or 'fast' (see the module docstring).

  Returns:
    The mixed batch of B examples.
  """
  if not (mixup_alpha > 0 or use_cutmix):
    raise ValueError('mix needs mixup_alpha > 0 or use_cutmix=True.')
  num = images.shape[0] // (2 if mode == 'paper' else 1)
  num_mixup = (num // 2 if use_cutmix else num) if mixup_alpha > 0 else 0
  first, partner, first_labels, partner_labels = pair(images, labels, num_mixup, mode)
  k_ratio, k_box = jax.random.split(key)
  parts, ratios = [], []
  if num_mixup:
    r = jax.random.beta(k_ratio, mixup_alpha, mixup_alpha, (num_mixup,), jnp.float32)
    parts.append(mixup(first[:num_mixup], partner[:num_mixup], r))
    ratios.append(r)
  if num_mixup < num:
    _, height, width, _ = first.shape
    boxes = cutmix_boxes(k_box, num - num_mixup, height, width)
    cut, weight = cutmix(first[num_mixup:], partner[num_mixup:], boxes)
    parts.append(cut)
    ratios.append(weight)
  return Mixed(images=jnp.concatenate(parts), labels=first_labels.astype(jnp.int32),
               mix_labels=partner_labels.astype(jnp.int32), mix_ratio=jnp.concatenate(ratios),
               is_cutmix=jnp.arange(num) >= num_mixup)


def mix_groups(images: jax.Array, labels: jax.Array, key: jax.Array, *, mixup_alpha: float,
               use_cutmix: bool, mode: str, group_size: int, first_group: jax.Array | int
               ) -> Mixed:
  """Mixes a device batch of whole groups: group j is `mix`ed with fold_in(key, first_group + j).

  Args:
    images: uint8 (or float) [n * B, H, W, C], n = 2 ('paper') or 1 ('fast'); the inputs of
      group j are rows [j * n * G, (j + 1) * n * G).
    labels: int [n * B].
    key: the step's mixing key (the same on every device).
    mixup_alpha: Beta(alpha, alpha) of the MixUp ratio; 0 disables MixUp.
    use_cutmix: whether CutMix is on.
    mode: 'paper' or 'fast'.
    group_size: G, outputs per group; B must be a multiple of it.
    first_group: global index of this device's first group (device d holds groups
      [d * B / G, (d + 1) * B / G) of the step's global batch).

  Returns:
    The mixed batch of B examples, group after group.
  """
  n = 2 if mode == 'paper' else 1
  num = images.shape[0] // n
  if group_size < 1 or num % group_size:
    raise ValueError(f'{num} examples per device do not split into MixUp/CutMix groups of '
                     f'data.mix_group_size={group_size}; choose a group size dividing the '
                     'per-device batch.')
  groups = num // group_size
  grouped = images.reshape((groups, n * group_size) + images.shape[1:])
  grouped_labels = labels.reshape((groups, n * group_size))
  keys = jax.vmap(lambda j: jax.random.fold_in(key, first_group + j))(jnp.arange(groups))
  out = jax.vmap(lambda x, y, k: mix(x, y, k, mixup_alpha=mixup_alpha, use_cutmix=use_cutmix,
                                     mode=mode))(grouped, grouped_labels, keys)
  return jax.tree.map(lambda a: a.reshape((num,) + a.shape[2:]), out)
