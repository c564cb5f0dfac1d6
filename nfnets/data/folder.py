"""Indexes a directory of class sub-folders of images ('folder' data sets).

Layout, either
  root/train/<class>/<image>, root/test/<class>/<image>   (explicit splits), or
  root/<class>/<image>                                     (split by a fraction).
Class names are sorted, so label i is the i-th name in sorted order.

Unusable files are found ONCE, here, when the folder is indexed, and left out:
* anything that is not a regular file (a FIFO named `x.png` would block the reader forever, a
  symlink to /dev/zero would be read until memory runs out) is refused without being read
  (`files.read_image_file`: non-blocking open, fstat on the descriptor);
* an image whose headers declare more than NFNETS_MAX_IMAGE_PIXELS pixels (all frames of a GIF
  counted) is refused from its headers, before anything decodes it: a 1 MB PNG can decode to
  20000 x 20000 pixels and kill training by memory at the same step of every restart;
* the rest is decoded with the decoder the pipeline itself uses (TensorFlow's), so a file is in
  the index exactly when tf.data can decode it: e.g. a 1-bit BMP, which PIL opens but TensorFlow
  cannot, is left out rather than crashing training at every restart. JPEGs are checked at 1/8
  scale (libjpeg still reads every entropy-coded block, which is where corruption shows, at a
  fraction of the cost); other formats are decoded in full. Files are checked in parallel
  threads (TensorFlow releases the GIL).
Skipped files are counted in one warning, by kind, with the first of each kind named. Errors
name the class instead: a class folder with no image file or no readable image, a class with
no image left for training, or fewer than two classes (a one-class classifier reaches loss 0
without learning anything). Names are printed with control characters escaped
(`files.printable`), so a file or class name cannot forge lines of output. Checking at index
time rather than filtering inside tf.data keeps example positions fixed, which the
deterministic, resumable sampler relies on. The index is cached per process.
"""

import collections
import concurrent.futures
import dataclasses
import os
import warnings
from typing import Optional

import numpy as np
from PIL import Image

from nfnets import files
from nfnets.quiet_tensorflow import tf

# The formats tf.io.decode_image understands (files.IMAGE_EXTENSIONS); others are ignored.
IMAGE_EXTENSIONS = files.IMAGE_EXTENSIONS
SPLITS = ("train", "test")


@dataclasses.dataclass(frozen=True)
class FolderIndex:
  """The files of one split.

  Attributes:
    paths: image file paths, sorted by (class, file name).
    labels: int64 labels, aligned with `paths`.
    class_names: sorted class folder names; label i is class_names[i].
    num_skipped: files left out: not regular files, over a size limit, or undecodable.
    sizes: int64 bytes of each file when it was checked, aligned with `paths`; a read that
      finds another size checks the image's headers again (sources.FolderSource.read).
  """

  paths: list[str]
  labels: np.ndarray
  class_names: list[str]
  num_skipped: int
  sizes: Optional[np.ndarray] = None


_CACHE: dict[tuple[str, str, float], FolderIndex] = {}

# Why a file is left out of the index; the warning counts each kind.
_NOT_REGULAR = "not a regular file"
_OVER_LIMIT = "over a size limit"
_UNDECODABLE = "undecodable"
_UNOPENABLE = "unopenable"


def _first_line(error: BaseException) -> str:
  lines = str(error).strip().splitlines()
  return files.printable(lines[0][:200]) if lines else type(error).__name__


def _check(path: str) -> tuple[Optional[tuple[str, str]], int]:
  """(None or (kind, one-line reason), the file's size in bytes) for `image_problem`."""
  try:
    data = files.read_image_file(path)
  except files.NotRegularFileError as e:
    return (_NOT_REGULAR, str(e)), 0
  except files.OverLimitError as e:
    return (_OVER_LIMIT, str(e)), 0
  except files.UnreadableFileError as e:
    return (_UNDECODABLE, str(e)), 0
  except OSError as e:  # Missing (a dangling symlink), no permission.
    return (_UNOPENABLE, f"{files.printable(path)}: {_first_line(e)}"), 0
  try:
    if tf.io.is_jpeg(data):
      tf.io.decode_jpeg(data, channels=3, ratio=8)
    else:
      tf.io.decode_image(data, channels=3, expand_animations=False)
  except (tf.errors.OpError, ValueError) as e:
    return (_UNDECODABLE, f"{files.printable(path)}: {_first_line(e)}"), len(data)
  return None, len(data)


def image_problem(path: str) -> Optional[tuple[str, str]]:
  """None if the pipeline can use `path`, else (kind, a one-line reason naming the file).

  The file is read through `files.read_image_file`: a FIFO, device or socket is refused
  without blocking, and an image whose headers declare more than NFNETS_MAX_IMAGE_PIXELS
  pixels is refused before anything decodes it. Only then do TensorFlow's decoders (the ones
  tf.data uses) try it as RGB.
  """
  return _check(path)[0]


def is_readable_image(path: str) -> bool:
  """True if TensorFlow's decoders (the ones tf.data uses) can decode `path` as RGB, and it is a
  regular file within the size limits (see `image_problem`)."""
  return image_problem(path) is None


def _quoted(name: str) -> str:
  return f"'{files.printable(name)}'"


def _class_names(directory: str) -> list[str]:
  names = sorted(d for d in os.listdir(directory)
                 if os.path.isdir(os.path.join(directory, d)) and
                 not d.startswith("."))
  if not names:
    raise ValueError(f"{files.printable(directory)} has no class sub-folders: expected "
                     "<dir>/<class>/<image> (or <dir>/train/<class>/<image>).")
  return names


def _label_names(directory: str) -> list[str]:
  """The class folders that define the labels; a classifier needs at least two."""
  names = _class_names(directory)
  if len(names) < 2:
    raise ValueError(f"{files.printable(directory)} has 1 class folder ({_quoted(names[0])}): "
                     "classification needs at least 2 classes; add a folder of images for "
                     "each class.")
  return names


def _class_files(directory: str) -> list[str]:
  return sorted(
      os.path.join(directory, f) for f in os.listdir(directory)
      if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith("."))


def _readable(paths: list[str], class_name: str, root: str,
              required: bool) -> tuple[list[str], list[int], list[tuple[str, str]]]:
  """(the usable files, their sizes in bytes, (kind, reason) of each one left out).

  Args:
    paths: the class's image files.
    class_name: its folder name, for messages.
    root: the folder holding the class, for messages.
    required: whether the class must have an image here (a test split may lack a class).
  """
  if required and not paths:
    raise ValueError(f"Class {_quoted(class_name)} in {files.printable(root)} has no image file "
                     f"({', '.join(IMAGE_EXTENSIONS)}); add images or remove that folder.")
  pool = concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 1)
  try:
    with warnings.catch_warnings():
      # Images PIL finds large are reported by our own limit (one warning for the index).
      warnings.simplefilter("ignore", Image.DecompressionBombWarning)
      checked = list(pool.map(_check, paths))
  finally:
    # On Ctrl-C, files not yet started are dropped rather than checked to the end.
    pool.shutdown(wait=True, cancel_futures=True)
  good = [p for p, (problem, _) in zip(paths, checked) if problem is None]
  sizes = [size for problem, size in checked if problem is None]
  skipped = [problem for problem, _ in checked if problem is not None]
  if paths and not good:
    raise ValueError(f"Class {_quoted(class_name)} in {files.printable(root)} has no readable "
                     f"image ({len(paths)} file(s) could not be used; first: {skipped[0][1]}); "
                     "fix or remove that folder.")
  return good, sizes, skipped


def _index_explicit(root: str, split: str) -> tuple[FolderIndex, list[tuple[str, str]]]:
  # Labels come from train/ so that the test split uses the same numbering even
  # when some class has no test images.
  class_names = _label_names(os.path.join(root, "train"))
  split_dir = os.path.join(root, split)
  unknown = sorted(set(_class_names(split_dir)) - set(class_names))
  if unknown:
    raise ValueError(f"{files.printable(split_dir)} has classes missing from train/: "
                     f"{', '.join(map(_quoted, unknown))}; every test class needs a train folder.")
  paths, sizes, labels, skipped = [], [], [], []
  for label, name in enumerate(class_names):
    class_dir = os.path.join(split_dir, name)
    found = _class_files(class_dir) if os.path.isdir(class_dir) else []
    good, good_sizes, bad = _readable(found, name, split_dir, required=split == "train")
    paths += good
    sizes += good_sizes
    labels += [label] * len(good)
    skipped += bad
  return FolderIndex(paths, np.asarray(labels, np.int64), class_names, len(skipped),
                     np.asarray(sizes, np.int64)), skipped


def _index_fraction(root: str, split: str,
                    test_fraction: float) -> tuple[FolderIndex, list[tuple[str, str]]]:
  class_names = _label_names(root)
  paths, sizes, labels, skipped = [], [], [], []
  for label, name in enumerate(class_names):
    good, good_sizes, bad = _readable(_class_files(os.path.join(root, name)), name, root,
                                      required=True)
    skipped += bad
    # Stratified and fixed: a permutation seeded by the class label only, so
    # the split never depends on the training seed or on other classes.
    order = np.random.default_rng([0, label]).permutation(len(good))
    num_test = int(round(test_fraction * len(good)))
    if num_test == len(good):
      raise ValueError(f"Class {_quoted(name)} in {files.printable(root)} has {len(good)} "
                       f"readable image(s): with data.folder_test_fraction={test_fraction} none "
                       "is left for training; add images or lower the fraction.")
    chosen = order[:num_test] if split == "test" else order[num_test:]
    chosen = np.sort(chosen)
    paths += [good[i] for i in chosen]
    sizes += [good_sizes[i] for i in chosen]
    labels += [label] * len(chosen)
  return FolderIndex(paths, np.asarray(labels, np.int64), class_names, len(skipped),
                     np.asarray(sizes, np.int64)), skipped


def _skip_warning(root: str, split: str, index: FolderIndex,
                  skipped: list[tuple[str, str]]) -> str:
  """One line: how many files were left out, of which kinds, and the first of each kind."""
  counts = collections.Counter(kind for kind, _ in skipped)
  first = {}
  for kind, reason in skipped:
    first.setdefault(kind, reason)
  kinds = ", ".join(f"{counts[kind]} {kind}" for kind in first)
  return (f"Skipped {len(skipped)} corrupt or unreadable image(s) while indexing "
          f"{files.printable(root)} (split {split!r}); {len(index.paths)} remain. {kinds}; "
          f"first of each: {'; '.join(first.values())}.")


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
    raise ValueError(f"{files.printable(root)} has no train/ and test/ sub-folders, so "
                     "data.folder_test_fraction must be in (0, 1), got "
                     f"{test_fraction!r}.")
  key = (root, split, float(test_fraction or 0.0))
  if key not in _CACHE:
    index, skipped = (_index_explicit(root, split) if explicit else
                      _index_fraction(root, split, float(test_fraction)))
    if skipped:
      warnings.warn(_skip_warning(root, split, index, skipped), RuntimeWarning, stacklevel=2)
    _CACHE[key] = index
  return _CACHE[key]
