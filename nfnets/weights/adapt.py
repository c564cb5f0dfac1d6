"""Weights for a model that takes another number of input channels (grey <-> RGB fine-tuning).

A model trained on grey images (the MNIST demo) fine-tuned on colour photographs, or an
ImageNet model fine-tuned on grey scans, differs only in its first convolution's input
channels. `adapt_input_channels` rewrites that kernel the way timm's `adapt_input_conv` does --
summed over the input channels for 1-channel inputs, otherwise repeated and scaled by
C_source / C_target -- but in the kernel's *effective* form: for a weight-standardised conv
(WSConv2D: w_hat = (w - mean) * gain / sqrt(N * var)) the standardisation would undo a plain
rescaling, so the standardised kernel is adapted and then stored with a gain that reproduces
it exactly. Either way a grey image gives the same features as its RGB copy (R = G = B) did.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

Params = dict[str, dict[str, np.ndarray]]


def _effective(leaves: Mapping[str, np.ndarray], eps: float) -> np.ndarray:
  """The kernel the conv applies: standardised per output filter when it has a gain."""
  w = np.asarray(leaves["w"], np.float64)
  if "gain" not in leaves:
    return w
  fan_in = np.prod(w.shape[:-1])
  mean = w.mean(axis=(0, 1, 2), keepdims=True)
  var = w.var(axis=(0, 1, 2), keepdims=True)
  gain = np.asarray(leaves["gain"], np.float64).reshape((1, 1, 1, -1))
  return (w - mean) * gain / np.sqrt(np.maximum(fan_in * var, eps))


def _adapt_kernel(kernel: np.ndarray, channels: int) -> np.ndarray:
  source = kernel.shape[2]
  if channels == 1:
    return kernel.sum(axis=2, keepdims=True)
  repeats = -(-channels // source)
  return np.tile(kernel, (1, 1, repeats, 1))[:, :, :channels] * (source / channels)


def adapt_input_channels(params: Mapping[str, Mapping[str, Any]],
                         expected: Mapping[str, Mapping[str, Any]],
                         eps: float = 1e-4) -> tuple[Params, list[str]]:
  """Adapts every conv kernel whose input channels differ from what the model expects.

  Args:
    params: the loaded params.
    expected: the model's params (or their ShapeDtypeStructs), for the shapes.
    eps: WSConv2D's floor on N * var.

  Returns:
    (params with the adapted kernels, the names of the modules adapted). A kernel is adapted
    when only its input-channel axis (2) differs from the expected shape.
  """
  out: Params = {m: dict(leaves) for m, leaves in params.items()}
  adapted = []
  for module, leaves in params.items():
    want = expected.get(module, {}).get("w")
    have = leaves.get("w")
    if want is None or have is None or np.ndim(have) != 4:
      continue
    hs, ws = tuple(np.shape(have)), tuple(want.shape)
    if hs == ws or hs[:2] != ws[:2] or hs[3] != ws[3]:
      continue
    target = _adapt_kernel(_effective(leaves, eps), ws[2])
    dtype = np.asarray(have).dtype
    out[module]["w"] = target.astype(dtype)
    if "gain" in leaves:
      # WS of `target` gives back `target` when its gain is sqrt(N * var) (its mean is 0).
      fan_in = np.prod(target.shape[:-1])
      centred = target - target.mean(axis=(0, 1, 2), keepdims=True)
      out[module]["w"] = centred.astype(dtype)
      gain = np.sqrt(np.maximum(fan_in * centred.var(axis=(0, 1, 2)), eps))
      out[module]["gain"] = gain.reshape(np.shape(leaves["gain"])).astype(
          np.asarray(leaves["gain"]).dtype)
    adapted.append(module)
  return out, adapted
