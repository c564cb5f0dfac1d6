"""ImageNet normalisation constants and the one normalise function, shared by host and device.

The host pipeline (TensorFlow) normalises evaluation images, the train step (JAX, see
`nfnets.augment`) normalises training images after augmenting them; both use these constants
(the official values, on the 0..255 scale). Plain numpy, so either side can import it.
"""

import numpy as np

MEAN_RGB = (0.485 * 255, 0.456 * 255, 0.406 * 255)
STDDEV_RGB = (0.229 * 255, 0.224 * 255, 0.225 * 255)


def mean_std(channels: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
  """ImageNet mean/std on the 0..255 scale; their averages for grayscale."""
  if channels == 3:
    return MEAN_RGB, STDDEV_RGB
  if channels == 1:
    return (sum(MEAN_RGB) / 3,), (sum(STDDEV_RGB) / 3,)
  raise ValueError(f"Images must have 1 or 3 channels, got {channels}.")


def normalize(image, channels: int, xp=np):
  """(x - mean) / std per channel, on the 0..255 scale.

  `xp` is the array module of `image`: numpy, jax.numpy or tf.experimental.numpy.
  """
  mean, std = mean_std(channels)
  return (image - xp.asarray(mean, xp.float32)) / xp.asarray(std, xp.float32)
