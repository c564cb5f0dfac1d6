"""Evaluation: top-1, top-5 and loss of one or several parameter sets over an eval split.

The eval step (`step.make_eval_step`) returns counts summed over a global batch, padding
excluded; this module sums them over the split, on the host in float64, so every example counts
exactly once across all devices and hosts.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np
from jax.sharding import Mesh

from nfnets.train import mesh as mesh_lib


def evaluate(eval_step: Callable[..., Mapping[str, Any]],
             params_by_prefix: Mapping[str, tuple[Any, Any]],
             batches: Iterable[Mapping[str, np.ndarray]],
             mesh: Mesh, max_batches: int = 0) -> dict[str, float]:
  """Top-1, top-5 and loss of each (replicated) parameter set over the eval batches.

  Args:
    eval_step: from step.make_eval_step (counts summed over the global batch).
    params_by_prefix: e.g. {'': (params, state), 'ema_': (ema_params, ema_state)}, replicated.
    batches: this host's rows of each eval batch (with 'mask' for padding).
    mesh: the device mesh of `eval_step`.
    max_batches: stop after this many batches (0: all).

  Returns:
    {prefix + 'top_1_acc' / 'top_5_acc' / 'loss': float, 'num_examples': float}.
  """
  sums: dict[str, Any] = {p: None for p in params_by_prefix}
  for i, batch in enumerate(batches):
    if max_batches and i >= max_batches:
      break
    batch = mesh_lib.global_batch(batch, mesh)
    for prefix, (params, state) in params_by_prefix.items():
      counts = mesh_lib.host_copy(eval_step(params, state, batch))
      out = {k: np.float64(v) for k, v in counts.items()}
      sums[prefix] = out if sums[prefix] is None else {k: sums[prefix][k] + out[k] for k in out}
  results = {}
  for prefix, s in sums.items():
    if s is None or s["count"] == 0:
      raise ValueError("The eval split yielded no examples: check data.eval_split.")
    results[prefix + "top_1_acc"] = float(s["top_1_correct"] / s["count"])
    results[prefix + "top_5_acc"] = float(s["top_5_correct"] / s["count"])
    results[prefix + "loss"] = float(s["loss_sum"] / s["count"])
    results["num_examples"] = float(s["count"])
  return results
