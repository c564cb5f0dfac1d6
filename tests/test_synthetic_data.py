"""Tests for nfnets/synthetic_data.py: data.name='fake' batches are deterministic per step."""

import numpy as np

from configs import fake_data
from nfnets import synthetic_data


def _kwargs(**overrides):
  kw = dict(global_batch_size=16, host_index=0, host_count=1, local_device_count=8,
            num_classes=10)
  kw.update(overrides)
  return kw


def test_fake_iterator_is_keyed_by_step():
  config = fake_data.get_config()
  it = synthetic_data.fake_iterator(config.data, **_kwargs())
  batches = [next(it) for _ in range(3)]
  resumed = next(synthetic_data.fake_iterator(config.data, start_step=2, **_kwargs()))
  np.testing.assert_array_equal(resumed["images"], batches[2]["images"])
  np.testing.assert_array_equal(resumed["labels"], batches[2]["labels"])
  assert batches[0]["images"].shape == (8, 2, 32, 32, 3)
  assert not np.array_equal(batches[0]["labels"], batches[1]["labels"])
  ev = list(synthetic_data.fake_iterator(config.data, eval_examples=20, **_kwargs()))
  assert len(ev) == 2 and ev[1]["mask"].sum() == 4 and ev[0]["mask"].sum() == 16


def test_global_batch_does_not_depend_on_the_host_layout():
  config = fake_data.get_config()
  one_host = next(synthetic_data.fake_iterator(config.data, **_kwargs(local_device_count=2)))
  per_host = [next(synthetic_data.fake_iterator(
      config.data, **_kwargs(host_index=h, host_count=2, local_device_count=1)))
              for h in range(2)]
  for key in ("images", "labels"):
    np.testing.assert_array_equal(one_host[key], np.concatenate([b[key] for b in per_host]))


def test_images_are_class_prototypes_plus_noise():
  config = fake_data.get_config()
  batch = next(synthetic_data.fake_iterator(config.data, **_kwargs(global_batch_size=512)))
  images = batch["images"].reshape(-1, *batch["images"].shape[2:])
  labels = batch["labels"].reshape(-1)
  # Same-class images share a prototype, so nearest-class-mean recovers the labels.
  means = np.stack([images[labels == c].mean(0) for c in range(10)])
  dists = ((images[:, None] - means[None]) ** 2).sum(axis=(2, 3, 4))
  assert (dists.argmin(1) == labels).mean() > 0.95
  assert synthetic_data.dataset_info(config.data) == (
      config.data.fake_num_train, config.data.fake_num_eval, config.data.num_classes or 10)
