"""Putting loaded weights into a freshly initialised model: the fine-tuning merge.

`merge_params` takes every parameter of the new model from the loaded file, except (with
`drop_head`) the classifier, whose fresh initialisation is kept for a new set of classes. Before
anything is trained, it refuses weights that would silently train something else: a missing or
misshapen parameter, a non-float array (int32 weights would be cast without a word) and
non-finite values (a NaN file would otherwise evaluate to "loss nan" with exit status 0).
"""

from __future__ import annotations

import re
from typing import Any, Mapping

import numpy as np

from nfnets.weights import npz

Params = dict[str, dict[str, np.ndarray]]


def check_finite(params: Mapping[str, Mapping[str, Any]], source: str) -> None:
  """Raises a ValueError naming the first parameter of `source` holding NaN or Inf."""
  for module, leaves in params.items():
    for name, value in leaves.items():
      arr = np.asarray(value)
      if npz.is_floating(arr.dtype) and not np.all(np.isfinite(arr.astype(np.float32))):
        raise ValueError(f"{source}: {module}/{name} holds NaN or Inf values; these weights "
                         "cannot be evaluated or trained, use another file")


def merge_params(fresh: Mapping[str, Mapping[str, Any]], loaded: Mapping[str, Mapping[str, Any]],
                 drop_head: bool, head_pattern: str, source: str = "Initial weights") -> Params:
  """Takes every parameter from `loaded`, except the classifier when `drop_head`.

  Args:
    fresh: the newly initialised params (define the required structure, shapes and dtypes).
    loaded: released or saved params.
    drop_head: keep the fresh classifier (modules matching `head_pattern`), e.g. for new classes.
    head_pattern: regex over module names, e.g. '^[^/]+/~/linear$'.
    source: what `loaded` is, for messages (e.g. the file name).

  Returns:
    Params with the structure of `fresh`, in its dtypes.
  """
  head = re.compile(head_pattern)
  out: Params = {}
  problems = []
  for module, leaves in fresh.items():
    out[module] = {}
    for name, value in leaves.items():
      if drop_head and head.search(module):
        out[module][name] = np.asarray(value)
        continue
      got = loaded.get(module, {}).get(name)
      want_dtype = np.asarray(value).dtype
      if got is None:
        problems.append(f"{module}/{name} missing")
      elif tuple(np.shape(got)) != tuple(np.shape(value)):
        problems.append(f"{module}/{name} has shape {tuple(np.shape(got))}, "
                        f"model needs {tuple(np.shape(value))}")
      elif npz.is_floating(want_dtype) != npz.is_floating(np.asarray(got).dtype):
        problems.append(f"{module}/{name} has dtype {np.asarray(got).dtype}, "
                        f"model needs {want_dtype}")
      else:
        out[module][name] = np.asarray(got, want_dtype)
  if problems:
    hint = ("set --config.init.drop_head=True for a new classifier" if not drop_head else
            "check config.model.kwargs (variant/width) against the weights")
    raise ValueError(f"{source} do not fit the model ({len(problems)} problems, first: "
                     f"{'; '.join(problems[:3])}); {hint}.")
  check_finite(out, source)
  return out
