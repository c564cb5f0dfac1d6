"""Variant resolution for every model family, and the ResNet depth table two families share.

Each family keeps its variant table on the class (`NFNet.VARIANTS`, `NF_RegNet.VARIANTS`, ...)
as frozen dataclasses. A variant may be given as a table name, as the dataclass itself, or as a
mapping of its fields (what a config file can hold): `resolve_variant` turns all three into the
dataclass, with one error wording for every family.

The BatchNorm ResNet baseline and the NF-ResNet are the same network with and without
normalisation, so their depth table lives here rather than in either family module.
"""

import dataclasses
from collections.abc import Mapping
from typing import Any, TypeVar

V = TypeVar('V')


def as_mapping(value: Any) -> dict[str, Any] | None:
  """A plain dict for mappings and ml_collections ConfigDicts (which are not Mappings), else None."""
  if hasattr(value, 'to_dict') and callable(value.to_dict):
    return dict(value.to_dict())
  if isinstance(value, Mapping):
    return dict(value)
  return None


def resolve_variant(family: str, table: Mapping[str, V], variant_type: type[V],
                    variant: Any, required: tuple[str, ...] = ()) -> V:
  """Returns the variant dataclass for a name, an instance, or a mapping of its fields.

  Args:
    family: The family's name, for messages ('NFNet', 'NF_ResNet', ...).
    table: The family's named variants.
    variant_type: The family's frozen variant dataclass.
    variant: A key of `table`, a `variant_type` instance, or a mapping/ConfigDict of fields;
      list values become tuples so the frozen dataclass stays hashable.
    required: Fields a mapping must give (the others have defaults).

  Returns:
    The `variant_type` instance.

  Raises:
    ValueError: For an unknown name, unknown or missing fields, or another type.
  """
  if isinstance(variant, variant_type):
    return variant
  if isinstance(variant, str):
    if variant not in table:
      raise ValueError(f'Unknown {family} variant {variant!r}; use one of {sorted(table)} or a '
                       f'dict of {variant_type.__name__} fields.')
    return table[variant]
  fields = as_mapping(variant)
  if fields is None:
    raise ValueError(f'{family} variant must be a name, a {variant_type.__name__} or a dict of '
                     f'its fields, got {type(variant).__name__}.')
  known = [f.name for f in dataclasses.fields(variant_type)]
  unknown = sorted(set(fields) - set(known))
  missing = [f for f in required if f not in fields]
  if unknown or missing:
    raise ValueError(f'{family} variant dict has unknown fields {unknown} / lacks {missing}; '
                     f'{variant_type.__name__} fields are {known}.')
  fields = {k: tuple(v) if isinstance(v, (list, tuple)) else v for k, v in fields.items()}
  return variant_type(**fields)


def check_num_classes(num_classes: Any) -> int:
  """Returns `num_classes` as an int, raising unless it is a positive integer."""
  if isinstance(num_classes, bool) or int(num_classes) != num_classes or num_classes < 1:
    raise ValueError(f'num_classes must be a positive integer, got {num_classes!r}.')
  return int(num_classes)


def check_rate(name: str, rate: float) -> float:
  """Returns `rate`, raising unless it is a probability in [0, 1)."""
  if not 0.0 <= rate < 1.0:
    raise ValueError(f'{name} must be in [0, 1), got {rate}.')
  return rate


# Stage widths of a width-1 ResNet: the bottleneck outputs are `width * multiplier`, so the
# standard width=4 gives the familiar 256/512/1024/2048.
RESNET_STAGE_MULTIPLIERS = (64, 128, 256, 512)
# Only the first block of each stage is strided; the stem already reduced resolution by 4.
RESNET_STAGE_STRIDES = (1, 2, 2, 2)


@dataclasses.dataclass(frozen=True)
class ResNetVariant:
  """Depth of one ResNet size, shared by the BN baseline and the NF-ResNet.

  Attributes:
    depth: Bottleneck blocks per stage (four stages).
    train_imsize: Training resolution.
    test_imsize: Evaluation resolution.
  """

  depth: tuple[int, ...]
  train_imsize: int = 224
  test_imsize: int = 224

  def __post_init__(self):
    depth = tuple(self.depth)
    if len(depth) != len(RESNET_STAGE_MULTIPLIERS) or any(int(d) < 1 for d in depth):
      raise ValueError(f'ResNet depth must be 4 positive block counts, got {self.depth!r}.')
    object.__setattr__(self, 'depth', tuple(int(d) for d in depth))


RESNET_VARIANTS: dict[str, ResNetVariant] = {
    'ResNet50': ResNetVariant(depth=(3, 4, 6, 3)),
    'ResNet101': ResNetVariant(depth=(3, 4, 23, 3)),
    'ResNet152': ResNetVariant(depth=(3, 8, 36, 3)),
    'ResNet200': ResNetVariant(depth=(3, 24, 36, 3)),
    'ResNet288': ResNetVariant(depth=(24, 24, 24, 24)),
    'ResNet600': ResNetVariant(depth=(50, 50, 50, 50)),
}


def resnet_stage_widths(width: float) -> tuple[int, ...]:
  """Bottleneck output widths per stage for a width multiplier (4 gives 256..2048)."""
  widths = tuple(int(m * width) for m in RESNET_STAGE_MULTIPLIERS)
  # Each bottleneck is a quarter of its output width, so the narrowest stage needs >= 4.
  if widths[0] < 4:
    raise ValueError(f'width={width} is too small: use width >= {4 / RESNET_STAGE_MULTIPLIERS[0]}.')
  return widths
