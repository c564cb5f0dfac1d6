"""Tests for nfnets/data/prepare_imagenet.py: tiny generated tars -> TFDS array_record."""

import io
import os
import tarfile

import numpy as np
from PIL import Image
import pytest

from nfnets.data import prepare_imagenet


def test_fake_tars_have_official_layout(tiny_imagenet):
  manual_dir, _ = tiny_imagenet
  with tarfile.open(os.path.join(manual_dir, prepare_imagenet.TRAIN_TAR)) as outer:
    inner_names = outer.getnames()
    assert inner_names == ["n01440764.tar", "n01443537.tar", "n01484850.tar"]
    inner = tarfile.open(fileobj=outer.extractfile(inner_names[0]))
    assert inner.getnames() == [f"n01440764_{k}.JPEG" for k in range(4)]
    image = Image.open(io.BytesIO(inner.extractfile(inner.getnames()[0]).read()))
    assert image.format == "JPEG" and image.size == (40, 48)
  with tarfile.open(os.path.join(manual_dir, prepare_imagenet.VAL_TAR)) as val:
    assert val.getnames()[0] == "ILSVRC2012_val_00000001.JPEG"
    assert len(val.getnames()) == 6


def test_prepared_splits_and_format(tiny_imagenet):
  import tensorflow_datasets as tfds
  _, data_dir = tiny_imagenet
  builder = tfds.builder("imagenet2012", data_dir=data_dir)
  assert builder.is_prepared()
  assert builder.info.file_format == tfds.core.FileFormat.ARRAY_RECORD
  assert builder.info.splits["train"].num_examples == 12
  assert builder.info.splits["validation"].num_examples == 6
  source = builder.as_data_source(split="train")
  labels = sorted(int(source[i]["label"]) for i in range(len(source)))
  # Synsets 0..2 of the official list, 4 images each.
  assert labels == [0] * 4 + [1] * 4 + [2] * 4


def test_missing_tars_raise_with_instructions_before_writing(tmp_path, capsys):
  with pytest.raises(ValueError, match="ILSVRC2012_img_train.tar"):
    prepare_imagenet.prepare_imagenet(str(tmp_path), str(tmp_path / "tfds"))
  with pytest.raises(SystemExit) as exit_info:  # The command: one line, no traceback.
    prepare_imagenet.main(["--manual_dir", str(tmp_path), "--data_dir",
                           str(tmp_path / "tfds")])
  assert exit_info.value.code == 1
  (line,) = capsys.readouterr().err.splitlines()
  assert line.startswith("error: ") and "prepare_imagenet" in line
  assert not (tmp_path / "tfds").exists()


def test_random_jpeg_is_photo_sized():
  # The benchmark relies on ~110 KB per 400x350 image (ImageNet-like).
  data = prepare_imagenet.random_jpeg(np.random.default_rng(0), 350, 400)
  assert 70_000 < len(data) < 160_000
  assert Image.open(io.BytesIO(data)).size == (400, 350)


def test_disable_downloads_sets_zero_retries():
  from tensorflow_datasets.core.download import downloader
  prepare_imagenet.disable_downloads()
  assert downloader.MAX_RETRIES == 0
