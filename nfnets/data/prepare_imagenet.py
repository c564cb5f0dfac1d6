"""Prepares ImageNet-2012 in TFDS array_record format from the official tars.

The array_record format (not tfrecord) is what makes the data random-access: the
pipeline reads example `i` directly, so a resumed run can jump to any step
without replaying data. Usage:

  python -m nfnets.data.prepare_imagenet \
      --manual_dir=/data/imagenet_tars --data_dir=/data/tensorflow_datasets

where `manual_dir` holds `ILSVRC2012_img_train.tar` and `ILSVRC2012_img_val.tar`
as downloaded from image-net.org (the test tar is optional and unused). Building
takes hours and ~150 GB for the full data set; it never downloads anything.

`write_fake_imagenet_tars` produces tiny tars with the same layout, used by the
tests and the input-pipeline benchmark.
"""

import argparse
import io
import os
import sys
import tarfile
import time
from typing import Optional, Sequence

import numpy as np
from PIL import Image

from nfnets import quiet_tensorflow
from nfnets.data.sources import (IMAGENET_NAME, TRAIN_TAR, VAL_TAR, disable_downloads,
                                 missing_tars_message)


def prepare_imagenet(manual_dir: str, data_dir: str) -> "object":
  """Builds imagenet2012 (array_record) in `data_dir` from tars in `manual_dir`.

  Args:
    manual_dir: directory holding ILSVRC2012_img_train.tar and
      ILSVRC2012_img_val.tar.
    data_dir: the TFDS data directory to write into (the same one the
      training config's `data.data_dir` points at).

  Returns:
    The prepared `tfds.core.DatasetBuilder`.
  """
  for tar in (TRAIN_TAR, VAL_TAR):
    if not os.path.isfile(os.path.join(manual_dir, tar)):
      raise ValueError(missing_tars_message(manual_dir, data_dir))
  quiet_tensorflow.load()  # Before TFDS, which imports TensorFlow.
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  disable_downloads()
  builder = tfds.builder(IMAGENET_NAME, data_dir=data_dir,
                         file_format="array_record")
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
  return builder


def _imagenet_synsets(count: int) -> list[str]:
  """First `count` synsets of the labels file that ships with tfds."""
  import importlib.resources  # pylint: disable=g-import-not-at-top
  path = (importlib.resources.files("tensorflow_datasets") / "datasets" /
          "imagenet2012" / "labels.txt")
  synsets = path.read_text().split()
  if count > len(synsets):
    raise ValueError(f"num_synsets must be <= {len(synsets)}, got {count}.")
  return synsets[:count]


def random_jpeg(rng: np.random.Generator, height: int, width: int,
                quality: int = 95) -> bytes:
  """A JPEG of smooth colour blobs plus noise (compresses like a photo).

  Pure noise would make JPEGs several times larger than real photos of the
  same size, and a flat colour far smaller; the mix gives ~110 KB at 400x350.
  """
  coarse = rng.uniform(0, 255, size=(max(height // 16, 2), max(width // 16, 2), 3))
  smooth = np.asarray(Image.fromarray(coarse.astype(np.uint8)).resize(
      (width, height), Image.BICUBIC), dtype=np.float32)
  noisy = smooth + rng.normal(0.0, 20.0, size=smooth.shape)
  image = Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))
  buffer = io.BytesIO()
  image.save(buffer, format="JPEG", quality=quality)
  return buffer.getvalue()


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
  info = tarfile.TarInfo(name)
  info.size = len(data)
  tar.addfile(info, io.BytesIO(data))


def write_fake_imagenet_tars(manual_dir: str, num_synsets: int = 3,
                             per_synset: int = 4, num_val: int = 6,
                             image_size: tuple[int, int] = (48, 40),
                             seed: int = 0) -> None:
  """Writes tiny ImageNet tars with the official layout (tests, benchmark).

  The train tar is an outer tar of per-synset tars `<wnid>.tar` holding
  `<wnid>_<k>.JPEG`; the val tar is flat `ILSVRC2012_val_<8 digits>.JPEG`, whose
  labels tfds takes from its shipped validation_labels.txt by sorted file name.

  Args:
    manual_dir: where to write the two tars (created if missing).
    num_synsets: number of classes in the train tar (the first ones of the
      official label list, so their labels are 0..num_synsets-1).
    per_synset: train images per class.
    num_val: number of validation images.
    image_size: (height, width) of every image.
    seed: seed of the random image content.
  """
  os.makedirs(manual_dir, exist_ok=True)
  rng = np.random.default_rng(seed)
  height, width = image_size
  with tarfile.open(os.path.join(manual_dir, TRAIN_TAR), "w") as outer:
    for wnid in _imagenet_synsets(num_synsets):
      inner_buffer = io.BytesIO()
      with tarfile.open(fileobj=inner_buffer, mode="w") as inner:
        for k in range(per_synset):
          _add_bytes(inner, f"{wnid}_{k}.JPEG", random_jpeg(rng, height, width))
      _add_bytes(outer, f"{wnid}.tar", inner_buffer.getvalue())
  with tarfile.open(os.path.join(manual_dir, VAL_TAR), "w") as val:
    for k in range(1, num_val + 1):
      _add_bytes(val, f"ILSVRC2012_val_{k:08d}.JPEG",
                 random_jpeg(rng, height, width))


def main(argv: Optional[Sequence[str]] = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--manual_dir", required=True,
                      help=f"directory with {TRAIN_TAR} and {VAL_TAR}")
  parser.add_argument("--data_dir", required=True,
                      help="TFDS data dir to write (config.data.data_dir)")
  parser.add_argument("--fake", action="store_true",
                      help="first write tiny generated tars into manual_dir "
                           "(a smoke test of the whole path)")
  args = parser.parse_args(argv)
  if args.fake:
    write_fake_imagenet_tars(args.manual_dir)
  start = time.time()
  try:
    builder = prepare_imagenet(args.manual_dir, args.data_dir)
  except ValueError as e:  # Missing tars: one line saying what to put where.
    if os.environ.get("NFNETS_DEBUG") == "1":
      raise
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
  counts = {str(name): split.num_examples for name, split in builder.info.splits.items()}
  print(f"Prepared {IMAGENET_NAME} in {builder.data_path} in "
        f"{time.time() - start:.1f} s: {counts}")


if __name__ == "__main__":
  main()
