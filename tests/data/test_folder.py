"""Tests for nfnets/data/folder.py: class folders, splits, corrupt files."""

import io

import numpy as np
from PIL import Image
import pytest

from nfnets.data import folder


def _write_image(path, value, fmt):
  Image.new("RGB", (12, 10), (value, 255 - value, 7)).save(path, format=fmt)


@pytest.fixture(scope="module")
def flat_root(tmp_path_factory):
  """3 classes x 10 images (JPEG and PNG) + 2 corrupt files + a non-image."""
  root = tmp_path_factory.mktemp("flat")
  for c, name in enumerate(["zebra", "apple", "mango"]):
    (root / name).mkdir()
    for k in range(10):
      fmt, ext = ("JPEG", "jpg") if k % 2 else ("PNG", "png")
      _write_image(root / name / f"img_{k}.{ext}", 20 * c + k, fmt)
  # Truncated JPEG: the header parses, the pixel data is missing.
  good = io.BytesIO()
  Image.new("RGB", (64, 64), (1, 2, 3)).save(good, format="JPEG")
  (root / "apple" / "truncated.jpg").write_bytes(good.getvalue()[:200])
  (root / "zebra" / "text.jpeg").write_text("not an image at all")
  (root / "zebra" / "notes.txt").write_text("ignored: not an image extension")
  return root


def test_corrupt_files_are_skipped_and_counted(flat_root):
  with pytest.warns(RuntimeWarning, match="Skipped 2 corrupt"):
    index = folder.index_folder(str(flat_root), "train", test_fraction=0.2)
  assert index.num_skipped == 2
  assert not any("truncated" in p or "text.jpeg" in p for p in index.paths)


def test_sorted_class_names_give_labels(flat_root):
  index = folder.index_folder(str(flat_root), "train", test_fraction=0.2)
  assert index.class_names == ["apple", "mango", "zebra"]
  for path, label in zip(index.paths, index.labels):
    assert f"/{index.class_names[label]}/" in path


def test_fraction_split_is_stratified_disjoint_and_covering(flat_root):
  train = folder.index_folder(str(flat_root), "train", test_fraction=0.2)
  with pytest.warns(RuntimeWarning, match="split 'test'"):
    test = folder.index_folder(str(flat_root), "test", test_fraction=0.2)
  assert not set(train.paths) & set(test.paths)
  assert len(train.paths) + len(test.paths) == 30
  # 20% of each class's 10 images.
  assert np.bincount(test.labels).tolist() == [2, 2, 2]
  assert np.bincount(train.labels).tolist() == [8, 8, 8]


def test_explicit_train_test_folders(tmp_path):
  for split, classes in (("train", ["b", "a", "c"]), ("test", ["c", "a"])):
    for name in classes:
      (tmp_path / split / name).mkdir(parents=True)
      _write_image(tmp_path / split / name / "x.png", 9, "PNG")
  train = folder.index_folder(str(tmp_path), "train")
  test = folder.index_folder(str(tmp_path), "test")
  assert train.class_names == test.class_names == ["a", "b", "c"]
  assert train.labels.tolist() == [0, 1, 2]
  # Labels in test use train's numbering even with class 'b' absent.
  assert test.labels.tolist() == [0, 2]


def test_test_class_missing_from_train_is_an_error(tmp_path):
  for split, name in (("train", "a"), ("train", "b"), ("test", "z")):
    (tmp_path / split / name).mkdir(parents=True)
  with pytest.raises(ValueError, match="missing from train"):
    folder.index_folder(str(tmp_path), "test")


def test_bad_inputs(tmp_path):
  with pytest.raises(ValueError, match="no class sub-folders"):
    folder.index_folder(str(tmp_path), "train")
  (tmp_path / "a").mkdir()
  with pytest.raises(ValueError, match="must be one of"):
    folder.index_folder(str(tmp_path), "validation")
  with pytest.raises(ValueError, match="folder_test_fraction"):
    folder.index_folder(str(tmp_path), "train", test_fraction=0.0)


def test_is_readable_image(tmp_path):
  _write_image(tmp_path / "ok.png", 3, "PNG")
  (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 20)
  assert folder.is_readable_image(str(tmp_path / "ok.png"))
  assert not folder.is_readable_image(str(tmp_path / "bad.png"))


def test_the_index_accepts_exactly_what_the_pipeline_decodes(tmp_path):
  # A 1-bit BMP: PIL reads it, TensorFlow's BMP decoder does not. Before the index used the
  # pipeline's own decoder, such a file was indexed and crashed training at every restart.
  Image.new("1", (16, 16), 1).save(tmp_path / "one_bit.bmp")
  _write_image(tmp_path / "rgb.bmp", 9, "BMP")
  with Image.open(tmp_path / "one_bit.bmp") as image:
    image.load()  # PIL: fine.
  assert not folder.is_readable_image(str(tmp_path / "one_bit.bmp"))
  assert folder.is_readable_image(str(tmp_path / "rgb.bmp"))
  # And what the index keeps, the training decode path reads.
  from nfnets.quiet_tensorflow import tf  # pylint: disable=g-import-not-at-top
  from nfnets.data import preprocessing  # pylint: disable=g-import-not-at-top
  data = tf.constant((tmp_path / "rgb.bmp").read_bytes())
  out = preprocessing.preprocess_train(data, tf.constant([1, 2], tf.int64),
                                       method="inception_crop", size=8, channels=3, flip=True)
  assert out.shape == (8, 8, 3)


def test_a_class_without_any_readable_image_is_an_error_naming_it(tmp_path):
  for name in ("cat", "dog"):
    (tmp_path / name).mkdir()
  _write_image(tmp_path / "cat" / "a.png", 1, "PNG")
  (tmp_path / "dog" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
  with pytest.raises(ValueError, match=r"Class 'dog' in .* has no readable image \(1 file"):
    folder.index_folder(str(tmp_path), "train", test_fraction=0.5)
