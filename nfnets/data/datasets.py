"""The one place that chooses between synthetic data and the real (tf.data) pipeline.

`data.name == 'fake'` is served by `synthetic.py` (numpy only, no TensorFlow import); every other
name by `pipeline.py`, which is imported only when needed. Training and evaluation call these
three functions and never look at the name themselves.
"""

from typing import Iterator, Optional

import numpy as np

from nfnets.data import synthetic
from nfnets.data.options import DataOptions, DatasetInfo

SYNTHETIC = "fake"


def dataset_info(options: DataOptions) -> DatasetInfo:
  """Sizes, class count and class names of the configured data set."""
  if options.name == SYNTHETIC:
    return synthetic.dataset_info(options)
  from nfnets.data import pipeline  # pylint: disable=g-import-not-at-top  (TensorFlow)
  return pipeline.dataset_info(options)


def train_iterator(options: DataOptions, *, global_batch_size: int, rows: tuple[int, int],
                   num_classes: int, start_step: int = 0) -> Iterator[dict[str, np.ndarray]]:
  """Training batches from `start_step` on: this host's `rows` of each global batch, uint8."""
  if options.name == SYNTHETIC:
    return synthetic.train_iterator(options, global_batch_size=global_batch_size, rows=rows,
                                    num_classes=num_classes, start_step=start_step)
  from nfnets.data import pipeline  # pylint: disable=g-import-not-at-top  (TensorFlow)
  return pipeline.build_train_iterator(options, global_batch_size=global_batch_size, rows=rows,
                                       start_step=start_step)


def eval_iterator(options: DataOptions, *, global_batch_size: int, host_index: int,
                  host_count: int, num_classes: int, num_examples: int,
                  split: Optional[str] = None) -> Iterator[dict[str, np.ndarray]]:
  """One pass over the eval split: this host's share, normalised float images with 'mask'."""
  kwargs = dict(global_batch_size=global_batch_size, host_index=host_index,
                host_count=host_count)
  if options.name == SYNTHETIC:
    return synthetic.eval_iterator(options, num_classes=num_classes,
                                   num_examples=num_examples, **kwargs)
  from nfnets.data import pipeline  # pylint: disable=g-import-not-at-top  (TensorFlow)
  return pipeline.build_eval_iterator(options, split=split, **kwargs)
