"""Synthetic image batches for data.name='fake': smoke tests and benchmarks without a data set.

The batches have the layout and dtypes of the real pipeline (`nfnets.data.pipeline`): training
images uint8 [devices, per_device * inputs_per_example, H, W, C] (augmented and normalised on
the device), evaluation images float32 normalised with a 'mask'. Batch k depends only on the
seed, k and the global device index, so a resumed run sees the batches it would have seen, and
1 host x 2 devices gives the same global batch as 2 hosts x 1 device. Labels are learnable:
each image is a fixed class prototype plus noise, so the loss can fall.

NumPy only: importing this does not pull in TensorFlow.
"""

import itertools
import math
from typing import Iterator

import numpy as np

from nfnets.data.normalization import normalize
from nfnets.data.options import DataOptions, DatasetInfo


def dataset_info(options: DataOptions) -> DatasetInfo:
  """Sizes and class count of the synthetic data set."""
  return DatasetInfo(num_train=options.fake_num_train, num_eval=options.fake_num_eval,
                     num_classes=options.num_classes or 10, channels=options.fake_channels)


def _fake_pixels(options: DataOptions, rng: np.random.RandomState, shape: tuple[int, ...],
                 num_classes: int, size: int) -> tuple[np.ndarray, np.ndarray]:
  ch = options.fake_channels
  # Class prototypes from a fixed seed, so the labels are learnable (loss can fall).
  protos = np.random.RandomState(options.seed).randn(num_classes, size, size, ch)
  labels = rng.randint(0, num_classes, size=shape).astype(np.int32)
  signal = protos[labels] + rng.randn(*shape, size, size, ch)
  # ~N(128, 40^2) grey levels: roughly unit variance after the ImageNet normalisation.
  pixels = np.clip(np.round(128.0 + 40.0 * signal), 0, 255).astype(np.uint8)
  return pixels, labels


def fake_iterator(options: DataOptions, *, global_batch_size: int, host_index: int,
                  host_count: int, local_device_count: int, num_classes: int,
                  start_step: int = 0, eval_examples: int = 0) -> Iterator[dict]:
  """Synthetic batches with the layout of the real iterators (data.name='fake').

  Args:
    options: `config.data` (image_size / eval_image_size, fake_channels, seed, mixing).
    global_batch_size: batch over all hosts.
    host_index: this host.
    host_count: number of hosts.
    local_device_count: devices of this host.
    num_classes: label range.
    start_step: first batch index (batch k depends only on seed, k and the global device).
    eval_examples: > 0 makes a finite eval iterator of that many examples, with 'mask'.
  """
  per_device = global_batch_size // host_count // local_device_count
  if not eval_examples:
    per_device *= options.inputs_per_example
  size = options.eval_image_size if eval_examples else options.image_size
  shape = (local_device_count, per_device)
  num_batches = math.ceil(eval_examples / global_batch_size) if eval_examples else None
  for k in itertools.count(start_step):
    if num_batches is not None and k >= num_batches:
      return
    # One stream per *global* device row: the global batch is then the same however the
    # devices are spread over hosts (1 host x 2 devices == 2 hosts x 1 device).
    rows = []
    for d in range(local_device_count):
      device = host_index * local_device_count + d
      rng = np.random.RandomState([options.seed + 1, k, device, int(bool(eval_examples))])
      rows.append(_fake_pixels(options, rng, (1, per_device), num_classes, size))
    images = np.concatenate([r[0] for r in rows])
    batch = {"images": images, "labels": np.concatenate([r[1] for r in rows])}
    if eval_examples:
      batch["images"] = normalize(images.astype(np.float32), options.fake_channels)
      first = k * global_batch_size + host_index * per_device * local_device_count
      index = first + np.arange(per_device * local_device_count).reshape(shape)
      batch["mask"] = (index < eval_examples).astype(np.float32)
    yield batch
