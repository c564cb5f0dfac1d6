"""Synthetic image batches for data.name='fake': smoke tests and benchmarks without a data set.

The batches have the layout of `nfnets.data` (images [devices, per_device, H, W, C] float32,
labels int32, 'mask' on eval batches) and the same determinism: batch k depends only on the
seed, k and the global device index, so a resumed run sees the batches it would have seen, and
1 host x 2 devices gives the same global batch as 2 hosts x 1 device. Labels are learnable:
each image is a fixed class prototype plus unit noise, so the loss can fall.

NumPy only: importing this does not pull in TensorFlow, unlike `nfnets.data`.
"""

import itertools
import math
from typing import Any, Iterator

import numpy as np


def dataset_info(data_config: Any) -> tuple[int, int, int]:
  """(train examples, eval examples, classes) of `config.data` for data.name='fake'."""
  return data_config.fake_num_train, data_config.fake_num_eval, data_config.num_classes or 10


def _fake_batch(data_config: Any, rng: Any, shape: tuple[int, ...], num_classes: int) -> dict:
  size, ch = data_config.image_size, data_config.fake_channels
  # Class prototypes from a fixed seed, so the labels are learnable (loss can fall).
  protos = np.random.RandomState(data_config.seed).randn(num_classes, size, size, ch)
  labels = rng.randint(0, num_classes, size=shape).astype(np.int32)
  images = protos[labels] + rng.randn(*shape, size, size, ch)
  return {"images": images.astype(np.float32), "labels": labels}


def fake_iterator(data_config: Any, *, global_batch_size: int, host_index: int,
                  host_count: int, local_device_count: int, num_classes: int,
                  start_step: int = 0, eval_examples: int = 0) -> Iterator[dict]:
  """Synthetic batches with the layout of nfnets.data (data.name='fake').

  Args:
    data_config: `config.data` (image_size, fake_channels, seed, num_classes).
    global_batch_size: batch over all hosts.
    host_index: this host.
    host_count: number of hosts.
    local_device_count: devices of this host.
    num_classes: label range.
    start_step: first batch index (batch k depends only on seed, k and the global device).
    eval_examples: > 0 makes a finite eval iterator of that many examples, with 'mask'.
  """
  per_device = global_batch_size // host_count // local_device_count
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
      rng = np.random.RandomState([data_config.seed + 1, k, device, int(bool(eval_examples))])
      rows.append(_fake_batch(data_config, rng, (1, per_device), num_classes))
    batch = {key: np.concatenate([r[key] for r in rows]) for key in rows[0]}
    if eval_examples:
      first = k * global_batch_size + host_index * per_device * local_device_count
      index = first + np.arange(per_device * local_device_count).reshape(shape)
      batch["mask"] = (index < eval_examples).astype(np.float32)
    yield batch
