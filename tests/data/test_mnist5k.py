"""Tests for nfnets/data/mnist5k.py: the offline MNIST-5k TFDS data set."""

import os

import numpy as np
import pytest

from nfnets.data import mnist5k
from nfnets.data import pipeline
from nfnets.data import sources
from nfnets.data.options import DataOptions


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("mnist5k_tfds"))
  mnist5k.ensure_prepared(path)
  return path


def test_raw_arrays_are_real_mnist():
  images, labels = mnist5k.load_mnist5k_arrays()
  assert images.shape == (5000, 28, 28, 1) and images.dtype == np.uint8
  assert np.bincount(labels).tolist() == [500] * 10
  # Digits: mostly black background with bright strokes (not noise).
  assert (images == 0).mean() > 0.7 and images.max() == 255


def test_split_is_stratified_fixed_and_disjoint():
  _, labels = mnist5k.load_mnist5k_arrays()
  split = mnist5k.split_indices(labels)
  assert len(split["train"]) == 4000 and len(split["test"]) == 1000
  assert not set(split["train"]) & set(split["test"])
  assert np.bincount(labels[split["test"]]).tolist() == [100] * 10
  np.testing.assert_array_equal(split["test"],
                                mnist5k.split_indices(labels)["test"])


def test_prepared_once_with_right_counts(data_dir):
  builder = mnist5k.ensure_prepared(data_dir)  # Second call: no rebuild.
  info = builder.info
  assert info.splits["train"].num_examples == 4000
  assert info.splits["test"].num_examples == 1000
  assert info.features["label"].num_classes == 10
  assert info.features["image"].shape == (28, 28, 1)
  assert os.listdir(os.path.join(data_dir, "mnist5k")) == ["1.0.0"]
  assert any(f.endswith(".array_record-00000-of-00001") or "array_record" in f
             for f in os.listdir(builder.data_path))


def test_read_through_the_generic_tfds_path(data_dir):
  config = DataOptions(name="mnist5k", data_dir=data_dir, num_classes=10)
  test = sources.open_source(config, "test")
  assert len(test) == 1000 and test.channels == 1 and test.num_classes == 10
  images, labels = test.read(range(1000))
  assert images[0][:4] == b"\x89PNG"
  assert np.bincount(labels).tolist() == [100] * 10


def test_demo_style_pipeline_gray_28px(data_dir):
  config = DataOptions(
      name="mnist5k", data_dir=data_dir, train_split="train", eval_split="test",
      image_size=28, eval_image_size=28, train_preproc="random_crop_pad4",
      eval_preproc="resize_only", random_flip=False, randaugment="",
      mixup_alpha=0.0, cutmix=False, num_classes=10, seed=0)
  it = pipeline.build_train_iterator(config, global_batch_size=16, rows=(0, 16))
  batch = next(it)
  assert batch["images"].shape == (16, 28, 28, 1) and batch["images"].dtype == np.uint8
  assert batch["labels"].max() <= 9
  evals = list(pipeline.build_eval_iterator(
      config, global_batch_size=384, host_index=0, host_count=1))
  assert len(evals) == 3 and sum(b["mask"].sum() for b in evals) == 1000
  info = pipeline.dataset_info(config)
  assert (info.num_train, info.num_eval, info.num_classes, info.channels) == (4000, 1000, 10, 1)
