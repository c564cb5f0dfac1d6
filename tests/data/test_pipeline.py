"""Tests for nfnets/data/pipeline.py: shapes, determinism, resume, a host's rows."""

import dataclasses

import numpy as np
import pytest

from nfnets.data import datasets
from nfnets.data import pipeline
from nfnets.data.options import DataOptions, DatasetInfo


@pytest.fixture(scope="module")
def data_dir(tiny_imagenet):
  return tiny_imagenet[1]


def _config(data_dir, **kwargs):
  base = dict(name="imagenet2012", data_dir=data_dir, train_split="train", eval_split="test",
              image_size=24, eval_image_size=20, train_preproc="inception_crop",
              eval_preproc="resize_crop_32", randaugment="", mixup_alpha=0.2, cutmix=True,
              num_classes=1000, seed=0)
  return DataOptions(**dict(base, **kwargs))


def _train(config, steps, start_step=0, rows=None, batch=8):
  it = pipeline.build_train_iterator(
      config, global_batch_size=batch, rows=rows or (0, batch), start_step=start_step)
  return [next(it) for _ in range(steps)]


@pytest.fixture(scope="module")
def mixed_run(data_dir):
  """Five batches of a fresh iterator for the paper's MixUp/CutMix (mixed on the device)."""
  config = _config(data_dir, randaugment="205")
  return config, _train(config, 5)


def test_train_batch_shapes_dtypes_ranges(mixed_run):
  _, batches = mixed_run
  b = batches[0]
  # uint8 crops, two decoded inputs per example ('paper' mixing): 8 examples -> 16 inputs;
  # mixing, RandAugment and normalisation happen on the device.
  assert set(b) == {"images", "labels", "example_id"}
  assert b["images"].shape == (16, 24, 24, 3) and b["images"].dtype == np.uint8
  assert b["example_id"].min() >= 0 and b["example_id"].max() < 12
  assert b["labels"].shape == (16,) and b["labels"].dtype == np.int32
  assert b["labels"].min() >= 0 and b["labels"].max() <= 2
  assert b["images"].std() > 10  # Real pixels, not a constant.


def test_fast_mixing_decodes_one_input_per_example(data_dir):
  (b,) = _train(_config(data_dir, mix_mode="fast"), 1)
  assert b["images"].shape == (8, 24, 24, 3)


def test_same_seed_same_batches_and_resume_at_any_step(mixed_run):
  config, batches = mixed_run
  again = _train(config, 2)
  for a, b in zip(batches, again):
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])
  # 12 examples, 16 inputs per step: step 3 starts mid-epoch, in epoch 4.
  resumed = _train(config, 2, start_step=3)
  for a, b in zip(batches[3:], resumed):
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])
  assert not np.array_equal(batches[0]["images"], batches[1]["images"])


def test_without_mixing_no_mix_keys_and_epoch_covers_shard(data_dir):
  config = _config(data_dir, mixup_alpha=0.0, cutmix=False,
                   train_preproc="resize_only", random_flip=False)
  batches = _train(config, 3, batch=4)  # 12 examples = one epoch.
  assert set(batches[0]) == {"images", "labels", "example_id"}
  # One epoch: every example once.
  ids = np.concatenate([b["example_id"] for b in batches])
  assert sorted(ids.tolist()) == list(range(12))
  labels = np.concatenate([b["labels"].ravel() for b in batches])
  # A permutation of the 12 examples: each class exactly 4 times.
  assert np.bincount(labels, minlength=3).tolist() == [4, 4, 4]
  images = np.concatenate([b["images"].reshape(4, -1) for b in batches])
  assert len({row.tobytes() for row in images}) == 12
  # Another seed shuffles differently (the first 4 of 12 examples differ).
  reshuffled = _train(dataclasses.replace(config, seed=1), 1, batch=4)[0]
  assert not np.array_equal(reshuffled["images"], batches[0]["images"])


def test_the_global_batch_does_not_depend_on_the_host_layout(data_dir):
  config = _config(data_dir, randaugment="")
  one_host = _train(config, 3, batch=8)
  for hosts in (2, 4):
    share = 8 // hosts
    per_host = [_train(config, 3, rows=(h * share, (h + 1) * share), batch=8)
                for h in range(hosts)]
    for k in range(3):
      # Host h reads its rows: stacked in host order they are the 1-host batch.
      for key in ("images", "labels", "example_id"):
        stacked = np.concatenate([per_host[h][k][key] for h in range(hosts)], axis=0)
        np.testing.assert_array_equal(stacked, one_host[k][key])


@pytest.mark.parametrize("num,hosts", [(12, 1), (12, 5), (50000, 3), (7, 7)])
def test_host_slices_disjoint_and_covering(num, hosts):
  slices = [pipeline.host_slice(num, h, hosts) for h in range(hosts)]
  covered = np.concatenate([np.arange(s, e) for s, e in slices])
  np.testing.assert_array_equal(covered, np.arange(num))


def test_index_sampler_is_a_permutation_per_epoch():
  sampler = pipeline.IndexSampler(start=100, size=10, seed=3)
  first = sampler.indices(np.arange(10))
  second = sampler.indices(np.arange(10, 20))
  assert sorted(first) == sorted(second) == list(range(100, 110))
  assert not np.array_equal(first, second)
  np.testing.assert_array_equal(sampler.indices(np.arange(5, 15)),
                                np.concatenate([first[5:], second[:5]]))


@pytest.mark.parametrize("hosts", [1, 4])
def test_eval_sees_every_example_once(data_dir, hosts):
  config = _config(data_dir)
  totals, counts = 0.0, set()
  for h in range(hosts):
    batches = list(pipeline.build_eval_iterator(
        config, split="test", global_batch_size=4 * hosts, host_index=h, host_count=hosts))
    counts.add(len(batches))
    totals += sum(b["mask"].sum() for b in batches)
    b = batches[-1]
    assert b["images"].shape == (4, 20, 20, 3)
    assert b["labels"].dtype == np.int32 and b["mask"].dtype == np.float32
  assert totals == 6  # The 6 validation images, each once.
  assert len(counts) == 1  # Same number of steps on every host.


def test_dataset_info(data_dir):
  info = datasets.dataset_info(_config(data_dir))
  assert info == DatasetInfo(num_train=12, num_eval=6, num_classes=1000, channels=3,
                             class_names=info.class_names)
  assert info.class_names[0] == "n01440764"  # TFDS's ImageNet label names are the synsets.


def test_bad_configs_fail_early(data_dir):
  with pytest.raises(ValueError, match="not a share of a global batch of 8"):
    _train(_config(data_dir), 1, rows=(4, 12))
  with pytest.raises(ValueError, match="num_classes"):
    _train(_config(data_dir, num_classes=10), 1)
  with pytest.raises(ValueError, match="train_preproc"):
    _train(_config(data_dir, train_preproc="nope"), 1)
  with pytest.raises(ValueError, match="image_size"):
    _config(data_dir, image_size=0)
  with pytest.raises(ValueError, match="host_index"):
    pipeline.host_slice(12, 2, 2)
