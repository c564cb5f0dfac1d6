"""The input pipeline's options: one frozen dataclass, the only place its defaults are written.

`configs/common.py` builds the `config.data` section from these defaults, and
`nfnets.train.options.ExperimentOptions.from_config` reads it back into a `DataOptions`, so every
key the pipeline reads is a field here and every field is a config key. Plain Python only (no
TensorFlow), so the training side can hold these options without importing tf.data.
"""

import dataclasses
from typing import Optional

from nfnets import files

# What `data.name` may be besides any prepared TFDS name.
SPECIAL_NAMES = ("fake", "folder", "mnist5k", "imagenet2012")
# MixUp/CutMix pairing (see nfnets.augment.mixing): 'paper' decodes two images per output
# example, as the official pipeline; 'fast' pairs each image with another of the same batch.
MIX_MODES = ("paper", "fast")


def parse_randaugment(level: Optional[str]) -> Optional[tuple[int, int]]:
  """The one RandAugment level parser: '405' -> (4 layers, magnitude 5); ''/'none' -> None.

  As the official recipe names: the digits are an integer v > 100, read as v // 100 layers at
  magnitude v % 100 ('415' is 4 layers at magnitude 15).

  Args:
    level: `data.randaugment`.

  Returns:
    (num_layers, magnitude), or None when RandAugment is off.
  """
  if level is None or str(level).strip().lower() in ("", "none", "0"):
    return None
  text = str(level).strip()
  if not (text.isascii() and text.isdigit()) or int(text) <= 100:
    raise ValueError(f"data.randaugment must be digits of an integer > 100 like '405' "
                     f"(4 layers, magnitude 5), or '' to disable it; got {level!r}.")
  return int(text) // 100, int(text) % 100


@dataclasses.dataclass(frozen=True)
class DataOptions:
  """What to read and how to augment it (`config.data`).

  Attributes:
    name: 'imagenet2012', 'mnist5k', 'folder', 'fake' (synthetic) or any prepared TFDS name.
    data_dir: TFDS data dir (None: tfds' default ~/tensorflow_datasets).
    folder: Root of class sub-folders when name='folder'.
    folder_test_fraction: Held-out share of each class when the folder has no test/ split.
    train_split: Training split (TFDS spec or an ImageNet alias, see nfnets.data.sources).
    eval_split: Evaluation split; 'test' is ImageNet's labelled 'validation'.
    image_size: Training resolution (the variant's train_imsize).
    eval_image_size: Evaluation resolution (the variant's test_imsize).
    train_preproc: 'inception_crop' | 'random_crop_pad4' | 'resize_only'.
    eval_preproc: 'resize_crop_32' | 'crop_resize' | 'resize_only'.
    random_flip: Random horizontal flips in training.
    randaugment: '' disables; 'LMM' = L layers at magnitude MM, e.g. '405'.
    mixup_alpha: Beta(alpha, alpha) MixUp ratio; 0 disables MixUp.
    cutmix: Whether half of each device batch is CutMix pairs.
    mix_mode: 'paper' (two decoded inputs per mixed output) or 'fast' (partners from the
      same batch: half the host decoding, see nfnets.augment.mixing).
    mix_group_size: MixUp/CutMix pair and draw inside groups of this many examples of the
      global batch (each device holds whole groups, so the per-device batch must be a
      multiple of it). 32, the per-core batch the paper states, by
      default; the pairing does not depend on the number of devices.
    num_classes: Expected class count, checked against the data set; None takes the data
      set's own.
    seed: Data order and augmentation seed.
    image_key: Feature holding the image (TFDS).
    label_key: Feature holding the integer label (TFDS).
    fake_channels: Channels of synthetic images (name='fake').
    fake_num_train: Size of the synthetic training set.
    fake_num_eval: Size of the synthetic evaluation set.
  """
  name: str = "imagenet2012"
  data_dir: Optional[str] = None
  folder: str = ""
  folder_test_fraction: float = 0.1
  train_split: str = "train"
  eval_split: str = "test"
  image_size: int = 192
  eval_image_size: int = 256
  train_preproc: str = "inception_crop"
  eval_preproc: str = "resize_crop_32"
  random_flip: bool = True
  randaugment: str = "405"
  mixup_alpha: float = 0.2
  cutmix: bool = True
  mix_mode: str = "paper"
  mix_group_size: int = 32
  num_classes: Optional[int] = 1000
  seed: int = 0
  image_key: str = "image"
  label_key: str = "label"
  fake_channels: int = 3
  fake_num_train: int = 1024
  fake_num_eval: int = 256

  def __post_init__(self):
    if not self.name:
      raise ValueError(f"data.name is empty; use one of {list(SPECIAL_NAMES)} or a TFDS name.")
    if self.image_size <= 0 or self.eval_image_size <= 0:
      raise ValueError(f"data.image_size and data.eval_image_size must be positive pixels, got "
                       f"{self.image_size} and {self.eval_image_size}.")
    max_side = files.MAX_IMAGE_SIZE
    for field in ("image_size", "eval_image_size"):
      if getattr(self, field) > max_side:
        raise ValueError(f"data.{field} must be at most {max_side} pixels (the largest variant "
                         f"test resolution is 672), got {getattr(self, field)}.")
    if self.mixup_alpha < 0:
      raise ValueError(f"data.mixup_alpha must be >= 0 (0 disables MixUp), got "
                       f"{self.mixup_alpha}.")
    if self.mix_mode not in MIX_MODES:
      raise ValueError(f"data.mix_mode must be one of {MIX_MODES}, got {self.mix_mode!r}.")
    if self.mix_group_size < 1 or (self.mixup_alpha > 0 and self.cutmix
                                   and self.mix_group_size % 2):
      raise ValueError(f"data.mix_group_size must be a positive (with MixUp and CutMix both on, "
                       f"even) number of examples, got {self.mix_group_size}.")
    parse_randaugment(self.randaugment)
    if not 0 <= self.seed < 2**31:
      raise ValueError(f"data.seed must be in [0, 2**31), got {self.seed}.")
    if self.num_classes is not None and self.num_classes < 1:
      raise ValueError(f"data.num_classes must be >= 1 or None, got {self.num_classes}.")

  @property
  def randaugment_plan(self) -> Optional[tuple[int, int]]:
    """(num_layers, magnitude) of RandAugment, or None when it is off."""
    return parse_randaugment(self.randaugment)

  @property
  def mixes(self) -> bool:
    """Whether training batches are MixUp/CutMix pairs."""
    return self.mixup_alpha > 0 or self.cutmix

  @property
  def inputs_per_example(self) -> int:
    """Decoded images per training example: 2 for 'paper' mixing, else 1."""
    return 2 if self.mixes and self.mix_mode == "paper" else 1


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """What a run learnt about its data set (saved as dataset.json).

  Attributes:
    num_train: Training examples.
    num_eval: Evaluation examples (of the eval split).
    num_classes: Classes.
    channels: Image channels (3 RGB, 1 grey).
    class_names: Label names (folder or TFDS ClassLabel names), or None.
  """
  num_train: int
  num_eval: int
  num_classes: int
  channels: int = 3
  class_names: Optional[tuple[str, ...]] = None
