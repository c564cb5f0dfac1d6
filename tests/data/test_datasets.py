"""nfnets/data/datasets.py: the one switch between synthetic and real data."""

import numpy as np

from nfnets.data import datasets
from nfnets.data.options import DataOptions


def test_fake_data_is_served_with_the_real_layout_and_resumes_by_step():
  options = DataOptions(name="fake", image_size=8, eval_image_size=8, num_classes=3,
                        fake_num_train=64, fake_num_eval=10, mix_mode="paper")
  info = datasets.dataset_info(options)
  assert (info.num_train, info.num_eval, info.num_classes) == (64, 10, 3)
  kwargs = dict(global_batch_size=8, rows=(0, 8), num_classes=3)
  train = datasets.train_iterator(options, **kwargs)
  first, second = next(train), next(train)
  # uint8 for the device augmentation; paper mixing ships two inputs per example.
  assert first["images"].dtype == np.uint8 and first["images"].shape == (16, 8, 8, 3)
  resumed = next(datasets.train_iterator(options, start_step=1, **kwargs))
  np.testing.assert_array_equal(resumed["images"], second["images"])
  batches = list(datasets.eval_iterator(options, global_batch_size=8, host_index=0,
                                        host_count=1, num_classes=3, num_examples=10))
  assert sum(int(b["mask"].sum()) for b in batches) == 10
