"""Folding weight standardisation into plain convolution kernels, for inference and export.

A WSConv2D computes conv(x, (w - mean) * gain / sqrt(max(N * var, eps))) + bias, with the mean
and variance over each output filter's fan-in. During training the standardisation is part of
the differentiated function; at inference `w` and `gain` are constants, so the standardised
kernel is too. Computing it once turns every WSConv2D into a plain convolution with bias: the
network is then convolutions, linears and elementwise ops only, which serving stacks and
converters accept (timm's `dm_nfnet` fails to export on its standardisation op: timm issues
442 and 522).

  folded = fold_weight_standardization(params)
  forward = nfnets.models.make_forward(name, num_classes, folded=True, **kwargs)
  forward.apply(folded, state, None, images, is_training=False)   # same logits, plain convs
"""

from __future__ import annotations

from typing import Any, Mapping

import jax.numpy as jnp
import numpy as np

from nfnets.models.layers import standardize_weight

Params = dict[str, dict[str, Any]]


def is_ws_conv(leaves: Mapping[str, Any]) -> bool:
  """A module's params are a weight-standardised conv's: a 4-D kernel `w` with a `gain`."""
  return "gain" in leaves and "w" in leaves and np.ndim(leaves["w"]) == 4


def fold_weight_standardization(params: Mapping[str, Mapping[str, Any]],
                                eps: float = 1e-4) -> Params:
  """Params of the same network in which every WSConv2D is a plain conv.

  Args:
    params: Haiku params of an NF model (NFNet, NF-ResNet, NF-RegNet); other modules (linears,
      BatchNorm convs) pass through unchanged.
    eps: The WSConv2D floor on fan_in * var (the models' default, 1e-4).

  Returns:
    New params: each WS conv's `w` is the standardised kernel with the gain folded in, in
    float32, and its `gain` is gone; run them with `make_forward(..., folded=True)`.
  """
  folded: Params = {}
  for module, leaves in params.items():
    if is_ws_conv(leaves):
      w = jnp.asarray(leaves["w"], jnp.float32)
      gain = jnp.asarray(leaves["gain"], jnp.float32)
      folded[module] = {k: np.asarray(v) for k, v in leaves.items() if k not in ("w", "gain")}
      folded[module]["w"] = np.asarray(standardize_weight(w, gain, eps=eps))
    else:
      folded[module] = dict(leaves)
  return folded
