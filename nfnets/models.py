"""Model registry: one name per family, and a Haiku forward function built from a config.

Configs describe a model as `config.model.name` plus `config.model.kwargs`; this module turns
that into a module (`create_model`) or a transformed forward pass (`make_forward`). Every
family goes through `hk.transform_with_state` so the training code has a single calling
convention whether or not the network has BatchNorm state:

    forward = make_forward('NF_ResNet', num_classes=1000, variant='ResNet50')
    params, state = forward.init(rng, images, is_training=True)
    outputs, state = forward.apply(params, state, rng, images, is_training=True)

A `variant` given as a mapping (e.g. from a config file) becomes the family's frozen
variant dataclass, so a config can describe a tiny network without Python objects.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import haiku as hk
import jax

from nfnets.nf_regnet import NF_RegNet, NFRegNetVariant
from nfnets.nf_resnet import NF_ResNet
from nfnets.nfnet import NFNet, NFNetVariant
from nfnets.resnet import ResNet, ResNetVariant

MODELS: dict[str, type[hk.Module]] = {
    'NFNet': NFNet,
    'NF_ResNet': NF_ResNet,
    'NF_RegNet': NF_RegNet,
    'ResNet': ResNet,
}

# The frozen dataclass each family's `variant` argument accepts besides a name.
VARIANT_TYPES: dict[str, type] = {
    'NFNet': NFNetVariant,
    'NF_ResNet': ResNetVariant,
    'NF_RegNet': NFRegNetVariant,
    'ResNet': ResNetVariant,
}


def _check_name(name: str) -> type[hk.Module]:
  if name not in MODELS:
    raise ValueError(f'Unknown model {name!r}; use one of {sorted(MODELS)}.')
  return MODELS[name]


def _check_num_classes(num_classes: int) -> None:
  if isinstance(num_classes, bool) or int(num_classes) != num_classes or num_classes < 1:
    raise ValueError(f'num_classes must be a positive integer, got {num_classes!r}.')


def _as_dict(value: Any) -> dict[str, Any] | None:
  """A plain dict for mappings and ml_collections ConfigDicts (which are not Mappings)."""
  if hasattr(value, 'to_dict') and callable(value.to_dict):
    return dict(value.to_dict())
  if isinstance(value, Mapping):
    return dict(value)
  return None


def variant_from_mapping(name: str, fields: Mapping[str, Any]) -> Any:
  """Builds family `name`'s variant dataclass from a mapping of its fields.

  Args:
    name: A key of `MODELS`.
    fields: Field values, e.g. {'depth': [1, 1, 1, 1]} for a ResNet; lists become tuples so
      the frozen dataclass stays hashable.

  Returns:
    The variant dataclass instance.
  """
  _check_name(name)
  variant_type = VARIANT_TYPES[name]
  fields = _as_dict(fields)
  known = {f.name for f in dataclasses.fields(variant_type)}
  unknown = sorted(set(fields) - known)
  if unknown:
    raise ValueError(f'Unknown {variant_type.__name__} fields {unknown} for {name}; '
                     f'use {sorted(known)}.')
  fields = {k: tuple(v) if isinstance(v, (list, tuple)) else v for k, v in fields.items()}
  return variant_type(**fields)


def resolve_kwargs(name: str, kwargs: Mapping[str, Any]) -> dict[str, Any]:
  """Validates constructor kwargs for `name` and converts a mapping `variant` to a dataclass.

  Args:
    name: A key of `MODELS`.
    kwargs: Constructor keyword arguments (a dict or a ConfigDict).

  Returns:
    A new dict of kwargs, safe to pass to the family's constructor.
  """
  cls = _check_name(name)
  kwargs = _as_dict(kwargs) if kwargs is not None else {}
  if 'num_classes' in kwargs:
    raise ValueError('Pass num_classes as its own argument, not inside the model kwargs.')
  variant = kwargs.get('variant')
  variant_dict = _as_dict(variant)
  if variant_dict is not None:
    kwargs['variant'] = variant_from_mapping(name, variant_dict)
  elif isinstance(variant, str) and variant not in cls.VARIANTS:
    # Checked here too so a bad config fails before anything is traced.
    raise ValueError(f'Unknown {name} variant {variant!r}; use one of {sorted(cls.VARIANTS)} '
                     f'or a dict of {VARIANT_TYPES[name].__name__} fields.')
  return kwargs


def create_model(name: str, num_classes: int, **kwargs: Any) -> hk.Module:
  """Builds family `name`; call inside an `hk.transform`ed function.

  Args:
    name: A key of `MODELS`.
    num_classes: Classifier outputs.
    **kwargs: The family's constructor arguments (`variant` may be a mapping).

  Returns:
    The Haiku module, called as `model(images, is_training=..., return_metrics=...)`.
  """
  cls = _check_name(name)
  kwargs = resolve_kwargs(name, kwargs)
  _check_num_classes(num_classes)
  return cls(num_classes=int(num_classes), **kwargs)


def make_forward(name: str, num_classes: int, **kwargs: Any) -> hk.TransformedWithState:
  """A transformed forward pass for family `name`.

  Args:
    name: A key of `MODELS`.
    num_classes: Classifier outputs.
    **kwargs: The family's constructor arguments (`variant` may be a mapping).

  Returns:
    `hk.TransformedWithState` with `init(rng, images, is_training)` and
    `apply(params, state, rng, images, is_training, return_metrics=False)
    -> (outputs, new_state)`; `outputs` has 'logits' and 'pool' (and the signal-propagation
    metrics with return_metrics=True). `is_training` must be a Python bool (static under jit).
  """
  # Validate eagerly, before any tracing, so config mistakes surface at build time.
  kwargs = resolve_kwargs(name, kwargs)
  _check_num_classes(num_classes)

  def forward(images: jax.Array, is_training: bool,
              return_metrics: bool = False) -> dict[str, jax.Array]:
    model = MODELS[name](num_classes=int(num_classes), **kwargs)
    return model(images, is_training=is_training, return_metrics=return_metrics)

  return hk.transform_with_state(forward)
