"""Indexes a directory of class sub-folders of images ('folder' data sets).

Layout, either
  root/train/<class>/<image>, root/test/<class>/<image>   (explicit splits), or
  root/<class>/<image>                                     (split by a fraction).
Class names are sorted, so label i is the i-th name in sorted order.

Unreadable files are found ONCE, here, when the folder is indexed, with the decoder the
pipeline itself uses (TensorFlow's), so a file is in the index exactly when tf.data can decode
it: e.g. a 1-bit BMP, which PIL opens but TensorFlow cannot, is left out rather than crashing
training at every restart. JPEGs are checked at 1/8 scale (libjpeg still reads every
entropy-coded block, which is where corruption shows, at a fraction of the cost); other formats
are decoded in full. Files are checked in parallel threads (TensorFlow releases the GIL).
Unreadable files are counted in one warning; a class left with no readable image is an error
naming it. Checking at index time rather than filtering inside tf.data keeps example positions
fixed, which the deterministic, resumable sampler relies on. The index is cached per process.
"""

import concurrent.futures
import dataclasses
import os
import warnings
from typing import Optional

import numpy as np
import tensorflow as tf

# The formats tf.io.decode_image understands; others are ignored, not errors.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif")
SPLITS = ("train", "test")


@dataclasses.dataclass(frozen=True)
class FolderIndex:
  """The files of one split.

  Attributes:
    paths: image file paths, sorted by (class, file name).
    labels: int64 labels, aligned with `paths`.
    class_names: sorted class folder names; label i is class_names[i].
    num_skipped: corrupt or unreadable files left out.
  """

  paths: list[str]
  labels: np.ndarray
  class_names: list[str]
  num_skipped: int


_CACHE: dict[tuple[str, str, float], FolderIndex] = {}


def is_readable_image(path: str) -> bool:
  """True if TensorFlow's decoders (the ones tf.data uses) can decode `path` as RGB."""
  try:
    with open(path, "rb") as f:
      data = f.read()
    if tf.io.is_jpeg(data):
      tf.io.decode_jpeg(data, channels=3, ratio=8)
    else:
      tf.io.decode_image(data, channels=3, expand_animations=False)
    return True
  except (tf.errors.OpError, OSError, ValueError):
    return False


def _class_names(directory: str) -> list[str]:
  names = sorted(d for d in os.listdir(directory)
                 if os.path.isdir(os.path.join(directory, d)) and
                 not d.startswith("."))
  if not names:
    raise ValueError(f"{directory} has no class sub-folders: expected "
                     "<dir>/<class>/<image> (or <dir>/train/<class>/<image>).")
  return names


def _class_files(directory: str) -> list[str]:
  return sorted(
      os.path.join(directory, f) for f in os.listdir(directory)
      if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith("."))


def _readable(paths: list[str], class_name: str, root: str) -> tuple[list[str], int]:
  with concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
    ok = list(pool.map(is_readable_image, paths))
  good = [p for p, keep in zip(paths, ok) if keep]
  if paths and not good:
    raise ValueError(f"Class {class_name!r} in {root} has no readable image ({len(paths)} "
                     "file(s) could not be decoded); fix or remove that folder.")
  return good, len(paths) - len(good)


def _index_explicit(root: str, split: str) -> FolderIndex:
  # Labels come from train/ so that the test split uses the same numbering even
  # when some class has no test images.
  class_names = _class_names(os.path.join(root, "train"))
  split_dir = os.path.join(root, split)
  unknown = sorted(set(_class_names(split_dir)) - set(class_names))
  if unknown:
    raise ValueError(f"{split_dir} has classes missing from train/: {unknown}; "
                     "every test class needs a train folder.")
  paths, labels, skipped = [], [], 0
  for label, name in enumerate(class_names):
    class_dir = os.path.join(split_dir, name)
    files = _class_files(class_dir) if os.path.isdir(class_dir) else []
    good, bad = _readable(files, name, split_dir)
    paths += good
    labels += [label] * len(good)
    skipped += bad
  return FolderIndex(paths, np.asarray(labels, np.int64), class_names, skipped)


def _index_fraction(root: str, split: str, test_fraction: float) -> FolderIndex:
  class_names = _class_names(root)
  paths, labels, skipped = [], [], 0
  for label, name in enumerate(class_names):
    good, bad = _readable(_class_files(os.path.join(root, name)), name, root)
    skipped += bad
    # Stratified and fixed: a permutation seeded by the class label only, so
    # the split never depends on the training seed or on other classes.
    order = np.random.default_rng([0, label]).permutation(len(good))
    num_test = int(round(test_fraction * len(good)))
    chosen = order[:num_test] if split == "test" else order[num_test:]
    chosen = np.sort(chosen)
    paths += [good[i] for i in chosen]
    labels += [label] * len(chosen)
  return FolderIndex(paths, np.asarray(labels, np.int64), class_names, skipped)


def index_folder(root: str, split: str,
                 test_fraction: Optional[float] = 0.1) -> FolderIndex:
  """Lists the readable images of `split` under `root` (cached).

  Args:
    root: the data set directory.
    split: 'train' or 'test'.
    test_fraction: fraction of each class held out as 'test' when `root` has
      no train/ and test/ sub-folders (ignored otherwise).

  Returns:
    A `FolderIndex`. A warning reports how many files were skipped.
  """
  if split not in SPLITS:
    raise ValueError(f"Folder split must be one of {SPLITS}, got {split!r}.")
  root = os.path.abspath(root)
  explicit = all(os.path.isdir(os.path.join(root, s)) for s in SPLITS)
  if not explicit and not 0.0 < (test_fraction or 0.0) < 1.0:
    raise ValueError(f"{root} has no train/ and test/ sub-folders, so "
                     "data.folder_test_fraction must be in (0, 1), got "
                     f"{test_fraction!r}.")
  key = (root, split, float(test_fraction or 0.0))
  if key not in _CACHE:
    index = (_index_explicit(root, split) if explicit else
             _index_fraction(root, split, float(test_fraction)))
    if index.num_skipped:
      warnings.warn(
          f"Skipped {index.num_skipped} corrupt or unreadable image(s) while "
          f"indexing {root} (split {split!r}); {len(index.paths)} remain.",
          RuntimeWarning, stacklevel=2)
    _CACHE[key] = index
  return _CACHE[key]
