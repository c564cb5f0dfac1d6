"""Tests for nfnets/data/sources.py: TFDS and folder sources, split aliases, errors."""


import numpy as np
from PIL import Image
import pytest

from nfnets.data import sources
from nfnets.data.options import DataOptions


@pytest.fixture(scope="module")
def data_dir(tiny_imagenet):
  return tiny_imagenet[1]


def _config(**kwargs):
  return DataOptions(**dict(dict(name="imagenet2012", data_dir=None), **kwargs))


def test_imagenet_aliases_follow_the_paper():
  assert sources.resolve_split("imagenet2012", "train_and_valid") == "train"
  assert sources.resolve_split("imagenet2012", "valid") == "train[:10000]"
  assert sources.resolve_split("imagenet2012", "train_minus_valid") == "train[10000:]"
  assert sources.resolve_split("imagenet2012", "test") == "validation"
  # Other data sets keep their own split names.
  assert sources.resolve_split("mnist5k", "test") == "test"


@pytest.mark.parametrize("split,count", [("train", 12), ("train_and_valid", 12),
                                         ("test", 6),
                                         ("train[:5]", 5)])
def test_split_sizes(data_dir, split, count):
  source = sources.open_source(_config(data_dir=data_dir), split)
  assert len(source) == count
  assert source.num_classes == 1000 and source.channels == 3


@pytest.mark.parametrize("split", ["valid", "train_minus_valid", "bogus"])
def test_split_that_does_not_fit_is_an_error(data_dir, split):
  # 12 examples: the paper's 10,000-example hold-out slices do not fit.
  with pytest.raises(ValueError, match="does not fit 'imagenet2012'"):
    sources.open_source(_config(data_dir=data_dir), split)


def test_read_returns_jpeg_bytes_and_labels(data_dir):
  source = sources.open_source(_config(data_dir=data_dir), "train")
  images, labels = source.read([0, 5, 11])
  assert all(image[:2] == b"\xff\xd8" for image in images)  # JPEG SOI marker.
  assert labels.dtype == np.int64 and set(labels.tolist()) <= {0, 1, 2}
  again, _ = source.read([5])
  assert again[0] == images[1]  # Random access is stable.


def test_unprepared_imagenet_fails_saying_where_tars_go(tmp_path):
  with pytest.raises(ValueError, match="ILSVRC2012_img_train.tar"):
    sources.open_source(_config(data_dir=str(tmp_path)), "train")


def test_unprepared_other_tfds_set_fails_fast(tmp_path):
  from tensorflow_datasets.core.download import downloader  # pylint: disable=g-import-not-at-top
  with pytest.raises(ValueError, match="not prepared"):
    sources.open_source(_config(name="cifar10", data_dir=str(tmp_path)), "train")
  # What keeps an accidental download from retrying for minutes on our offline machines.
  assert downloader.MAX_RETRIES == 0


def test_unknown_names_are_rejected(tmp_path):
  with pytest.raises(ValueError, match="Unknown TFDS data set"):
    sources.open_source(_config(name="no_such_set_xyz", data_dir=str(tmp_path)),
                        "train")
  with pytest.raises(ValueError, match="data.name is empty"):
    sources.open_source(_config(name=""), "train")
  with pytest.raises(ValueError, match="data.folder"):
    sources.open_source(_config(name="folder", folder=str(tmp_path / "nope")),
                        "train")


def test_folder_source_reads_files(tmp_path):
  for cls in ("b_cats", "a_dogs"):
    (tmp_path / cls).mkdir()
    for k in range(3):
      Image.new("RGB", (8, 6), (k * 40, 0, 0)).save(tmp_path / cls / f"{k}.png")
  config = _config(name="folder", folder=str(tmp_path), folder_test_fraction=1 / 3)
  train = sources.open_source(config, "train")
  test = sources.open_source(config, "test")
  assert (len(train), len(test)) == (4, 2)
  assert train.num_classes == 2 and train.class_names == ["a_dogs", "b_cats"]
  images, labels = test.read([0, 1])
  assert labels.tolist() == [0, 1]
  assert all(image[:4] == b"\x89PNG" for image in images)
