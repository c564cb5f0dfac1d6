"""The device side of the input pipeline: one function from a uint8 batch to the model's input.

The host ships uint8 crops (`nfnets.data.pipeline`); inside the jitted train step, each device
turns its share into the model's input, in the official order:

  1. MixUp / CutMix per example (`mixing.py`), if enabled: 2 inputs per output ('paper') or
     partners from the same batch ('fast');
  2. RandAugment per example (`randaugment.py`), if enabled, on the clipped uint8 image
     (clip to [0, 255], truncate to uint8, as the official code does before RandAugment);
  3. normalisation with the ImageNet mean/std (`nfnets.data.normalization`).

All randomness comes from the step's per-device key, so the same step on the same device draws
the same ratios, boxes and RandAugment ops after a restart, and different devices draw
different ones.
"""

from collections.abc import Callable, Mapping

import chex
import jax
import jax.numpy as jnp

from nfnets.augment import mixing
from nfnets.augment import randaugment
from nfnets.data.normalization import normalize
from nfnets.data.options import DataOptions

Augment = Callable[[Mapping[str, jax.Array], jax.Array], dict]


def make_augment(options: DataOptions) -> Augment:
  """The per-device batch transformation of `config.data`, for `make_train_step(augment=)`.

  Args:
    options: `config.data` (mixup_alpha, cutmix, mix_mode, randaugment).

  Returns:
    augment(batch, key) -> {'images' float32 normalised [B, H, W, C], 'labels' int32 [B],
    and with mixing 'mix_labels' int32 [B], 'mix_ratio' float32 [B]}; `batch` holds the
    device's 'images' (uint8 [n * B, H, W, C]) and 'labels' (int [n * B]).
  """
  plan = options.randaugment_plan

  def augment(batch: Mapping[str, jax.Array], key: jax.Array) -> dict:
    images, labels = batch['images'], batch['labels']
    # A host batch in another layout would fail deep inside the mixing with a broadcast
    # error; say it here: one device's [n * B, H, W, C] uint8 images and [n * B] labels.
    chex.assert_rank(images, 4)
    chex.assert_equal_shape_prefix([images, labels], 1)
    if images.dtype != jnp.uint8:
      raise ValueError(f'Device augmentation expects uint8 images from the host pipeline, got '
                       f'{images.dtype}.')
    mix_key, ra_key = jax.random.split(key)
    out = {}
    if options.mixes:
      mixed = mixing.mix(images, labels, mix_key, mixup_alpha=options.mixup_alpha,
                         use_cutmix=options.cutmix, mode=options.mix_mode)
      pixels = mixed.images
      out.update(labels=mixed.labels, mix_labels=mixed.mix_labels, mix_ratio=mixed.mix_ratio)
    else:
      pixels = images.astype(jnp.float32)
      out['labels'] = labels.astype(jnp.int32)
    if plan is not None:
      num_layers, magnitude = plan
      # float -> uint8 truncates after clipping, as the official cast before RandAugment.
      as_uint8 = jnp.clip(pixels, 0.0, 255.0).astype(jnp.uint8)
      pixels = randaugment.randaugment_batch(as_uint8, ra_key, num_layers,
                                             float(magnitude)).astype(jnp.float32)
    out['images'] = normalize(pixels, pixels.shape[-1], xp=jnp)
    return out

  return augment
