"""Normalizer-Free Networks (NFNets, NF-ResNets, NF-RegNets) in JAX/Haiku.

The package is split into parts, each a sub-package:

  nfnets.models     the Haiku networks (no TensorFlow, scipy or orbax)
  nfnets.train      options, train/eval steps, optimizer + AGC, the loop, checkpoints, reports
  nfnets.data       the host input pipeline (tf.data; TensorFlow is imported there only)
  nfnets.augment    MixUp/CutMix and RandAugment in JAX, run inside the train step
  nfnets.weights    DeepMind's released files, our npz format, the timm mapping, fine-tune merge
  nfnets.analysis   FLOP counts, signal-propagation statistics, gamma estimation (scipy)
  nfnets.inference  classify images, fold weight standardisation, export for serving

The names below are re-exported for convenience. They are loaded on first use, so
`import nfnets` stays cheap and only what a name needs is imported.
"""

import importlib
from typing import Any

__version__ = "0.1.0"

# Public name -> module that defines it.
_EXPORTS = {
    "GAMMAS": "nfnets.models.activations",
    "get_activation": "nfnets.models.activations",
    "SqueezeExcite": "nfnets.models.layers",
    "StochDepth": "nfnets.models.layers",
    "WSConv2D": "nfnets.models.layers",
    "NFNet": "nfnets.models.nfnet",
    "NFNetVariant": "nfnets.models.nfnet",
    "NF_ResNet": "nfnets.models.nf_resnet",
    "NF_RegNet": "nfnets.models.nf_regnet",
    "ResNet": "nfnets.models.resnet",
    "MODELS": "nfnets.models.registry",
    "create_model": "nfnets.models.registry",
    "make_forward": "nfnets.models.registry",
    "compute_gamma": "nfnets.analysis.gamma",
    "count_macs": "nfnets.analysis.flops",
    "count_params": "nfnets.analysis.flops",
    "adaptive_grad_clip": "nfnets.train.agc",
    "agc_metrics": "nfnets.train.agc",
    "build_optimizer": "nfnets.train.optim",
    "ema_update": "nfnets.train.optim",
    "UnsafeWeightsError": "nfnets.weights.official",
    "load_official": "nfnets.weights.official",
    "save_params": "nfnets.weights.npz",
    "load_params": "nfnets.weights.npz",
    "haiku_to_timm": "nfnets.weights.timm",
    "timm_to_haiku": "nfnets.weights.timm",
    "Classifier": "nfnets.inference.classifier",
    "fold_weight_standardization": "nfnets.inference.folding",
    "load_model": "nfnets.inference.loading",
    "workdir_params": "nfnets.inference.loading",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
  if name not in _EXPORTS:
    raise AttributeError(f"module 'nfnets' has no attribute {name!r}")
  value = getattr(importlib.import_module(_EXPORTS[name]), name)
  globals()[name] = value  # Later lookups skip this function.
  return value


def __dir__() -> list[str]:
  return sorted(set(globals()) | set(_EXPORTS))
