"""Synthetic image batches for data.name='fake': smoke tests and benchmarks without a data set.

The batches have the layout and dtypes of the real pipeline (`nfnets.data.pipeline`): a host's
rows of each global batch, training images uint8 [rows * inputs_per_example, H, W, C]
(augmented and normalised on the device), evaluation images float32 normalised with a 'mask'.
Every example is drawn from its own seed (training: (seed, step, position in the step's
stream); evaluation: (seed, example index)), so a resumed run sees the batches it would have
seen and every topology sees the same global batch. Labels are learnable: each image is a fixed
class prototype plus noise, so the loss can fall.

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


def _example(options: DataOptions, seed: tuple[int, ...], protos: np.ndarray,
             num_classes: int, size: int) -> tuple[np.ndarray, int]:
  rng = np.random.default_rng(seed)
  label = int(rng.integers(num_classes))
  signal = protos[label] + rng.standard_normal((size, size, options.fake_channels))
  # ~N(128, 40^2) grey levels: roughly unit variance after the ImageNet normalisation.
  return np.clip(np.round(128.0 + 40.0 * signal), 0, 255).astype(np.uint8), label


def _prototypes(options: DataOptions, num_classes: int, size: int) -> np.ndarray:
  # Class prototypes from a fixed seed, so the labels are learnable (loss can fall).
  return np.random.default_rng([options.seed, size]).standard_normal(
      (num_classes, size, size, options.fake_channels))


def train_iterator(options: DataOptions, *, global_batch_size: int, rows: tuple[int, int],
                   num_classes: int, start_step: int = 0) -> Iterator[dict]:
  """Endless synthetic training batches: this host's `rows` of each global batch.

  Args:
    options: `config.data` (image_size, fake_channels, seed, mixing).
    global_batch_size: examples per step over all hosts.
    rows: [start, stop) of each global batch read by this host.
    num_classes: label range.
    start_step: first batch index.
  """
  n = options.inputs_per_example
  size = options.image_size
  protos = _prototypes(options, num_classes, size)
  positions = np.arange(rows[0] * n, rows[1] * n)
  for k in itertools.count(start_step):
    examples = [_example(options, (options.seed + 1, k, int(p)), protos, num_classes, size)
                for p in positions]
    yield {"images": np.stack([e[0] for e in examples]),
           "labels": np.array([e[1] for e in examples], np.int32),
           "example_id": k * global_batch_size * n + positions}


def eval_iterator(options: DataOptions, *, global_batch_size: int, host_index: int,
                  host_count: int, num_classes: int, num_examples: int) -> Iterator[dict]:
  """One pass over `num_examples` synthetic eval examples, split over hosts, with 'mask'.

  Host h reads the rows [h * B, (h + 1) * B) of each global batch, B = global / host_count.
  """
  size = options.eval_image_size
  protos = _prototypes(options, num_classes, size)
  per_host = global_batch_size // host_count
  for k in range(math.ceil(num_examples / global_batch_size)):
    index = k * global_batch_size + host_index * per_host + np.arange(per_host)
    valid = index < num_examples
    examples = [_example(options, (options.seed + 2, int(i) if v else 0), protos, num_classes,
                         size) for i, v in zip(index, valid)]
    images = np.stack([e[0] for e in examples]).astype(np.float32)
    yield {"images": normalize(images, options.fake_channels),
           "labels": np.array([e[1] for e in examples], np.int32),
           "mask": valid.astype(np.float32)}
