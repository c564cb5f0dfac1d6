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

import contextlib
import inspect
from collections.abc import Mapping
from typing import Any

import haiku as hk
import jax

from nfnets.models import blocks
from nfnets.models import layers
from nfnets.models import variants
from nfnets.models.nf_regnet import NF_RegNet, NFRegNetVariant
from nfnets.models.nf_resnet import NF_ResNet
from nfnets.models.nfnet import NFNet, NFNetVariant
from nfnets.models.resnet import ResNet
from nfnets.models.variants import ResNetVariant

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

# Not architecture: how the forward pass runs. Passed as `make_forward(..., remat=...)`, never
# inside the kwargs that identify a model (and its checkpoints).
_EXECUTION_OPTIONS = ('remat', 'folded', 'scan_blocks')


def model_class(name: str) -> type[hk.Module]:
  """The family registered as `name`, or a ValueError listing the registered names."""
  if name not in MODELS:
    raise ValueError(f'Unknown model {name!r}; use one of {sorted(MODELS)}.')
  return MODELS[name]


def resolve_kwargs(name: str, kwargs: Mapping[str, Any] | None) -> dict[str, Any]:
  """Validates constructor kwargs for `name` and converts a mapping `variant` to a dataclass.

  Args:
    name: A key of `MODELS`.
    kwargs: Constructor keyword arguments (a dict or a ConfigDict).

  Returns:
    A new dict of kwargs, safe to pass to the family's constructor.
  """
  cls = model_class(name)
  kwargs = variants.as_mapping(kwargs) if kwargs is not None else {}
  if kwargs is None:
    raise ValueError(f'Model kwargs for {name} must be a mapping of constructor arguments.')
  for reserved in ('num_classes',) + _EXECUTION_OPTIONS:
    if reserved in kwargs:
      raise ValueError(f'Pass {reserved} as its own argument, not inside the model kwargs.')
  accepted = set(inspect.signature(cls.__init__).parameters) - {'self', 'num_classes', 'name'}
  unknown = sorted(set(kwargs) - accepted)
  if unknown:
    raise ValueError(f'{name} has no argument(s) {unknown}; its arguments are '
                     f'{sorted(accepted - set(_EXECUTION_OPTIONS))}.')
  if 'variant' in kwargs:
    # Resolved here too so a bad config fails before anything is traced.
    kwargs['variant'] = variants.resolve_variant(name, cls.VARIANTS, VARIANT_TYPES[name],
                                                 kwargs['variant'])
  return kwargs


def create_model(name: str, num_classes: int, *, remat: str = 'none', scan_blocks: bool = False,
                 **kwargs: Any) -> hk.Module:
  """Builds family `name`; call inside an `hk.transform`ed function.

  Args:
    name: A key of `MODELS`.
    num_classes: Classifier outputs.
    remat: 'none' or 'block' (recompute each residual block in the backward pass).
    scan_blocks: run each stage's repeated blocks as one `lax.scan` (see `make_forward`).
    **kwargs: The family's constructor arguments (`variant` may be a mapping).

  Returns:
    The Haiku module, called as `model(images, is_training=..., return_metrics=...)`.
  """
  cls = model_class(name)
  kwargs = resolve_kwargs(name, kwargs)
  return cls(num_classes=variants.check_num_classes(num_classes),
             remat=blocks.check_remat(remat), scan_blocks=bool(scan_blocks), **kwargs)


def make_forward(name: str, num_classes: int, *, remat: str = 'none', folded: bool = False,
                 scan_blocks: bool = False, **kwargs: Any) -> hk.TransformedWithState:
  """A transformed forward pass for family `name`.

  Args:
    name: A key of `MODELS`.
    num_classes: Classifier outputs.
    remat: 'none' or 'block' (recompute each residual block in the backward pass; the
      parameters and outputs are the same either way).
    folded: run every WSConv2D as a plain convolution on pre-standardised kernels (params
      from `nfnets.inference.folding.fold_weight_standardization`; inference only).
    scan_blocks: run the repeated (identity-shortcut) blocks of each stage of an NF family as
      one `lax.scan` over parameters stacked inside the traced function: the program holds
      one copy of such a block per stage instead of one per block. `init`, the parameter tree,
      the outputs, the gradients and the random draws are those of the unscanned model up to
      float rounding (BatchNorm ResNets always run unscanned). Where it pays off, and where
      not, see `nfnets.models.blocks.apply_blocks`.
    **kwargs: The family's constructor arguments (`variant` may be a mapping).

  Returns:
    `hk.TransformedWithState` with `init(rng, images, is_training)` and
    `apply(params, state, rng, images, is_training, return_metrics=False)
    -> (outputs, new_state)`; `outputs` has 'logits' and 'pool' (and the signal-propagation
    metrics with return_metrics=True). `is_training` must be a Python bool (static under jit).
  """
  # Validate eagerly, before any tracing, so config mistakes surface at build time.
  kwargs = resolve_kwargs(name, kwargs)
  num_classes = variants.check_num_classes(num_classes)
  blocks.check_remat(remat)

  def forward(images: jax.Array, is_training: bool,
              return_metrics: bool = False) -> dict[str, jax.Array]:
    model = MODELS[name](num_classes=num_classes, remat=remat, scan_blocks=scan_blocks, **kwargs)
    folding = layers.folded_weight_standardization() if folded else contextlib.nullcontext()
    with folding:
      return model(images, is_training=is_training, return_metrics=return_metrics)

  return hk.transform_with_state(forward)
