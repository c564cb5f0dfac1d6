"""Tests for nfnets/data/synthetic.py: data.name='fake' batches are deterministic per step."""

import dataclasses

import numpy as np

from configs import fake_data
from nfnets.data import synthetic as synthetic_data
from nfnets.train.options import ExperimentOptions


def _data(**overrides):
  return dataclasses.replace(ExperimentOptions.from_config(fake_data.get_config()).data,
                             **overrides)


def _train(data, batch=16, rows=None, start_step=0):
  return synthetic_data.train_iterator(data, global_batch_size=batch, rows=rows or (0, batch),
                                       num_classes=10, start_step=start_step)


def test_fake_iterator_is_keyed_by_step():
  data = _data()
  it = _train(data)
  batches = [next(it) for _ in range(3)]
  resumed = next(_train(data, start_step=2))
  np.testing.assert_array_equal(resumed["images"], batches[2]["images"])
  np.testing.assert_array_equal(resumed["labels"], batches[2]["labels"])
  # Training batches look like the real pipeline's: uint8 crops, normalised on the device.
  assert batches[0]["images"].shape == (16, 32, 32, 3)
  assert batches[0]["images"].dtype == np.uint8
  assert not np.array_equal(batches[0]["labels"], batches[1]["labels"])
  ev = list(synthetic_data.eval_iterator(data, global_batch_size=16, host_index=0,
                                         host_count=1, num_classes=10, num_examples=20))
  assert len(ev) == 2 and ev[1]["mask"].sum() == 4 and ev[0]["mask"].sum() == 16
  assert ev[0]["images"].dtype == np.float32 and abs(ev[0]["images"].mean()) < 0.5
  # The paper's MixUp/CutMix takes two decoded inputs per example.
  paired = next(_train(_data(mixup_alpha=0.2, cutmix=True)))
  assert paired["images"].shape == (32, 32, 32, 3)


def test_global_batch_does_not_depend_on_the_host_layout():
  data = _data()
  one_host = next(_train(data))
  per_host = [next(_train(data, rows=(8 * h, 8 * (h + 1)))) for h in range(2)]
  for key in ("images", "labels"):
    np.testing.assert_array_equal(one_host[key], np.concatenate([b[key] for b in per_host]))
  ev_one = next(synthetic_data.eval_iterator(data, global_batch_size=16, host_index=0,
                                             host_count=1, num_classes=10, num_examples=20))
  ev_two = [next(synthetic_data.eval_iterator(data, global_batch_size=16, host_index=h,
                                              host_count=2, num_classes=10, num_examples=20))
            for h in range(2)]
  np.testing.assert_array_equal(ev_one["labels"], np.concatenate([b["labels"] for b in ev_two]))


def test_images_are_class_prototypes_plus_noise():
  data = _data()
  batch = next(_train(data, batch=512))
  images = batch["images"].astype(np.float32)
  labels = batch["labels"]
  # Same-class images share a prototype, so nearest-class-mean recovers the labels.
  means = np.stack([images[labels == c].mean(0) for c in range(10)])
  dists = ((images[:, None] - means[None]) ** 2).sum(axis=(2, 3, 4))
  assert (dists.argmin(1) == labels).mean() > 0.95
  info = synthetic_data.dataset_info(data)
  assert (info.num_train, info.num_eval, info.num_classes) == (
      data.fake_num_train, data.fake_num_eval, data.num_classes)
