"""Train metrics summed on the device between log steps, and the first non-finite step.

The step loop never waits for the device without need: `MetricSums.add` is one small jitted
program per step (dispatched asynchronously, no host sync); `fetch` copies the sums to the host
every `train.log_every_steps` steps (as interval means) and before a checkpoint. The metrics
are global (reduced over every device of every host), so every host fetches the same values and
takes the same decisions (stop on a non-finite step) at the same step.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from nfnets.train import mesh as mesh_lib

# Ordered upstream first: the first non-finite of these names what went wrong.
DIAGNOSTICS = ("loss", "grad_norm", "update_norm", "param_norm")


class NonFiniteError(RuntimeError):
  """Training produced NaN/Inf; the last good checkpoint was left intact."""


class MetricSums:
  """Interval sums of the train metrics on the device, and the first non-finite step."""

  def __init__(self):
    self._acc: Optional[dict[str, jax.Array]] = None
    self._add = jax.jit(self._add_impl, donate_argnums=(0,))

  @staticmethod
  def _add_impl(acc, metrics, step):
    bad = metrics["finite"] < 1.0
    first = acc["first_bad_step"] < 0
    take = bad & first
    out = {k: acc[k] + metrics[k] for k in acc if k in metrics}
    out["count"] = acc["count"] + 1.0
    out["first_bad_step"] = jnp.where(take, step, acc["first_bad_step"])
    for k in DIAGNOSTICS:
      out[f"first_bad_{k}"] = jnp.where(take, metrics[k], acc[f"first_bad_{k}"])
    return out

  @staticmethod
  def _zeros(metrics: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
    acc = {k: jnp.zeros_like(v) for k, v in metrics.items()}
    acc["count"] = jnp.zeros_like(metrics["loss"])
    acc["first_bad_step"] = jnp.full_like(metrics["loss"], -1.0)
    acc.update({f"first_bad_{k}": jnp.zeros_like(metrics[k]) for k in DIAGNOSTICS})
    return acc

  def add(self, metrics: Mapping[str, jax.Array], step: int) -> None:
    if self._acc is None:
      self._acc = jax.jit(self._zeros)(dict(metrics))
    self._acc = self._add(self._acc, dict(metrics), jnp.float32(step))

  def fetch(self) -> Optional[dict[str, float]]:
    """Interval means (plus 'steps_in_interval', 'first_bad_*'), or None when nothing was added."""
    if self._acc is None:
      return None
    host = {k: float(v) for k, v in mesh_lib.host_copy(self._acc).items()}
    self._acc = None
    count = max(host.pop("count"), 1.0)
    special = {k: host.pop(k) for k in list(host) if k.startswith("first_bad_")}
    means = {k: v / count for k, v in host.items()}
    means["steps_in_interval"] = count
    means.update(special)
    return means


def merge_intervals(intervals: list[dict[str, float]]) -> dict[str, float]:
  """Weighted means of several fetched intervals (a save split a log interval)."""
  total = sum(i["steps_in_interval"] for i in intervals)
  keys = [k for k in intervals[-1] if not k.startswith("first_bad_") and k != "steps_in_interval"]
  merged = {k: sum(i[k] * i["steps_in_interval"] for i in intervals) / total for k in keys}
  merged["steps_in_interval"] = total
  return merged


def nonfinite_error(sums: Mapping[str, float], last_checkpoint: Optional[int]) -> NonFiniteError:
  """The error naming the first non-finite step and quantity and the last good checkpoint."""
  step = int(sums["first_bad_step"])
  what = next((k for k in DIAGNOSTICS if not np.isfinite(sums[f"first_bad_{k}"])), "gradient")
  kept = (f"last good checkpoint: step {last_checkpoint}" if last_checkpoint
          else "no checkpoint was written")
  return NonFiniteError(
      f"Non-finite {what} at step {step}; {kept}. Lower "
      "optimizer.lr or agc.clipping, or set train.skip_nonfinite=True.")
