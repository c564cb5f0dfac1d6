"""Weight files: DeepMind's released pickles, our npz format, the timm mapping, fine-tune merge.

  official.py  `load_official`: the released `F*_haiku.npz` dill pickles, restricted unpickler
  npz.py       `save_params` / `load_params` / `read_npz`: our format, headers checked first
  timm.py      `haiku_to_timm` / `timm_to_haiku`: timm's `dm_nfnet_f*` state_dict names
  merge.py     `merge_params`: loaded weights into a fresh model (optionally a new head)

Imports numpy, ml_dtypes and nfnets.files only (no JAX, TensorFlow or orbax).
"""

from nfnets.weights.merge import check_finite
from nfnets.weights.merge import merge_params
from nfnets.weights.npz import load_params
from nfnets.weights.npz import ModelSpec
from nfnets.weights.npz import read_npz
from nfnets.weights.npz import save_params
from nfnets.weights.official import load_official
from nfnets.weights.official import UnsafeWeightsError
from nfnets.weights.timm import haiku_to_timm
from nfnets.weights.timm import timm_to_haiku

__all__ = ["check_finite", "merge_params", "load_params", "ModelSpec", "read_npz",
           "save_params", "load_official", "UnsafeWeightsError", "haiku_to_timm",
           "timm_to_haiku"]
