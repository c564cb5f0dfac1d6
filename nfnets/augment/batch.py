"""The device side of the input pipeline: one function from a uint8 batch to the model's input.

The host ships uint8 crops (`nfnets.data.pipeline`); inside the jitted train step, each device
turns its share into the model's input, in the official order:

  1. MixUp / CutMix per example (`mixing.py`), if enabled: 2 inputs per output ('paper') or
     partners from the same batch ('fast');
  2. RandAugment per example (`randaugment.py`), if enabled, on the clipped uint8 image
     (clip to [0, 255], truncate to uint8, as the official code does before RandAugment);
  3. normalisation with the ImageNet mean/std (`nfnets.data.normalization`).

Every draw is keyed by the example's place in the step's global batch, never by the device: the
MixUp/CutMix ratios and boxes of group g by fold_in(mix key, g) (groups of
`data.mix_group_size` outputs, whole groups per device), the RandAugment ops of example i by
fold_in(RandAugment key, i). So a restarted run redraws exactly the same augmentations, and a
run resumed on another number of devices or hosts draws what the uninterrupted run would have.
"""

from collections.abc import Callable, Mapping

import chex
import jax
import jax.numpy as jnp

from nfnets.augment import mixing
from nfnets.augment import randaugment
from nfnets.data.normalization import normalize
from nfnets.data.options import DataOptions

# (device batch, the step's augmentation key, this device's index on the data axis) -> inputs.
Augment = Callable[[Mapping[str, jax.Array], jax.Array, jax.Array], dict]


def make_augment(options: DataOptions) -> Augment:
  """The per-device batch transformation of `config.data`, for `make_train_step(augment=)`.

  Args:
    options: `config.data` (mixup_alpha, cutmix, mix_mode, randaugment).

  Returns:
    augment(batch, key, device_index) -> {'images' float32 normalised [B, H, W, C], 'labels'
    int32 [B], and with mixing 'mix_labels' int32 [B], 'mix_ratio' float32 [B]}; `batch`
    holds the device's 'images' (uint8 [n * B, H, W, C]) and 'labels' (int [n * B]), `key` is
    the step's augmentation key (the same on every device) and device d holds examples
    [d * B, (d + 1) * B) of the global batch.
  """
  plan = options.randaugment_plan
  group = options.mix_group_size

  def augment(batch: Mapping[str, jax.Array], key: jax.Array,
              device_index: jax.Array | int = 0) -> dict:
    images, labels = batch['images'], batch['labels']
    # A host batch in another layout would fail deep inside the mixing with a broadcast
    # error; say it here: one device's [n * B, H, W, C] uint8 images and [n * B] labels.
    chex.assert_rank(images, 4)
    chex.assert_equal_shape_prefix([images, labels], 1)
    if images.dtype != jnp.uint8:
      raise ValueError(f'Device augmentation expects uint8 images from the host pipeline, got '
                       f'{images.dtype}.')
    mix_key, ra_key = jax.random.split(key)
    num = images.shape[0] // options.inputs_per_example
    first_example = device_index * num
    out = {}
    if options.mixes:
      mixed = mixing.mix_groups(images, labels, mix_key, mixup_alpha=options.mixup_alpha,
                                use_cutmix=options.cutmix, mode=options.mix_mode,
                                group_size=group, first_group=first_example // group)
      pixels = mixed.images
      out.update(labels=mixed.labels, mix_labels=mixed.mix_labels, mix_ratio=mixed.mix_ratio)
    else:
      pixels = images.astype(jnp.float32)
      out['labels'] = labels.astype(jnp.int32)
    if plan is not None:
      num_layers, magnitude = plan
      # float -> uint8 truncates after clipping, as the official cast before RandAugment.
      as_uint8 = jnp.clip(pixels, 0.0, 255.0).astype(jnp.uint8)
      pixels = randaugment.randaugment_batch(as_uint8, ra_key, num_layers, float(magnitude),
                                             first_index=first_example).astype(jnp.float32)
    out['images'] = normalize(pixels, pixels.shape[-1], xp=jnp)
    return out

  return augment
