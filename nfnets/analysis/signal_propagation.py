"""Signal Propagation Plots (SPPs): per-block statistics of a network at initialisation.

Brock, De & Smith (ICLR 2021, arXiv 2101.08692, Sec. 3) inspect an untrained residual network
by feeding it N(0, 1) inputs and recording, after every residual block,

* the average channel squared mean, mean_c (E_{b,h,w}[x])^2 -- a mean shift shows up here;
* the average channel variance, mean_c Var_{b,h,w}[x] -- the scale of the skip path;
* the average channel variance of the residual branch, before it joins the skip path.

The models return these as 'avg_sq_mean_i' / 'avg_var_i' (i = 0 after the stem, i = k + 1 after
block k) and 'res_avg_var_k' with `return_metrics=True`; this module turns them into arrays,
states the NF analysis as numbers to compare against, and handles the SkipInit gains.

The NF analysis: block k computes x_{k+1} = x_k + alpha * g * f(act(x_k) * beta_k), where
beta_k = 1 / sqrt(Var x_k) (predicted, not measured) gives the branch f a unit-variance input and
scaled weight standardisation + gamma-scaled activations keep Var f ~ 1. At initialisation the
branch is uncorrelated with the skip path, so

    Var x_{k+1} = Var(shortcut_k) + (alpha * g)^2 * Var f,

with shortcut_k = x_k inside a stage (growth (alpha g)^2 per block) and, for the first block of
a stage, a WS conv of act(x_k) * beta_k, whose variance is ~1: the variance resets to
1 + (alpha g)^2 at every transition. g is the `skip_gain` (0 at init in the official NFNet /
NF-ResNet, which makes every block the identity on its shortcut; 1 gives the paper's plots).
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Mapping, Sequence
from typing import Any

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np

from nfnets.models import residual_scaling

_METRIC_RE = re.compile(r'^(avg_sq_mean|avg_var|res_avg_var)_(\d+)$')


@dataclasses.dataclass(frozen=True)
class SignalStats:
  """Per-block statistics of one network on one batch.

  Attributes:
    avg_sq_mean: [num_blocks + 1] average squared channel mean; entry 0 is the stem output,
      entry k + 1 the output of block k.
    avg_var: [num_blocks + 1] average channel variance, indexed like `avg_sq_mean`.
    res_avg_var: [num_blocks] average channel variance of block k's residual branch (before the
      skip gain).
  """
  avg_sq_mean: np.ndarray
  avg_var: np.ndarray
  res_avg_var: np.ndarray

  def to_dict(self) -> dict[str, list[float]]:
    """JSON-friendly lists of floats."""
    return {f.name: [float(v) for v in getattr(self, f.name)] for f in dataclasses.fields(self)}


def collect_stats(outputs: Mapping[str, Any]) -> SignalStats:
  """Gathers the 'avg_sq_mean_i' / 'avg_var_i' / 'res_avg_var_k' outputs into ordered arrays.

  Args:
    outputs: A model's output dict from `apply(..., return_metrics=True)` (other keys such as
      'logits' are ignored).

  Returns:
    The statistics as float64 numpy arrays, in block order.
  """
  found: dict[str, dict[int, float]] = {'avg_sq_mean': {}, 'avg_var': {}, 'res_avg_var': {}}
  for key, value in outputs.items():
    match = _METRIC_RE.match(key)
    if match:
      found[match.group(1)][int(match.group(2))] = float(np.asarray(value))
  num_blocks = len(found['res_avg_var'])
  if num_blocks == 0:
    raise ValueError('No signal-propagation metrics in the outputs: call the model with '
                     'return_metrics=True.')
  # The indices must be contiguous, otherwise a plot would silently shift blocks.
  for name, expected in (('avg_sq_mean', num_blocks + 1), ('avg_var', num_blocks + 1),
                         ('res_avg_var', num_blocks)):
    if sorted(found[name]) != list(range(expected)):
      raise ValueError(f"Metrics '{name}_i' have indices {sorted(found[name])}, expected "
                       f'0..{expected - 1}: pass the full output dict of one model.')
  as_array = lambda d: np.array([d[i] for i in range(len(d))], np.float64)
  return SignalStats(avg_sq_mean=as_array(found['avg_sq_mean']),
                     avg_var=as_array(found['avg_var']),
                     res_avg_var=as_array(found['res_avg_var']))


def stage_starts(depths: Sequence[int]) -> list[int]:
  """Global indices of the first (transition) block of each stage, e.g. (3,4,6,3) -> [0,3,7,13]."""
  blocks = residual_scaling.nf_block_scalings(depths, 0.0)
  return [block.index for block in blocks if block.first_in_stage]


def predicted_nf_variance(depths: Sequence[int], alpha: float,
                          skip_gain: float = 1.0) -> np.ndarray:
  """The NF analysis' output variance of every block, for unit-variance branch outputs.

  Args:
    depths: Blocks per stage.
    alpha: Residual branch scale.
    skip_gain: Value of every block's scalar skip gain (0 at init, 1 for the paper's plots).

  Returns:
    [num_blocks] predicted Var x_{k+1}: 1 + (alpha g)^2 after each transition, then
    + (alpha g)^2 per block within the stage (the models' residual scaling with alpha * g).
  """
  plans = residual_scaling.nf_block_scalings(depths, alpha * skip_gain)
  return np.array([plan.expected_var for plan in plans], np.float64)


def predicted_betas(depths: Sequence[int], alpha: float) -> np.ndarray:
  """beta_k = 1 / sqrt(predicted Var of block k's input), exactly as the NF models use it.

  The models always assume skip_gain = 1 here (it is a trained parameter), so with the
  initial gains of 0 the betas over-correct within a stage; that is harmless at init because
  the branches are switched off.
  """
  blocks = residual_scaling.nf_block_scalings(depths, alpha)
  return np.array([block.beta for block in blocks], np.float64)


def variance_increments(stats: SignalStats, depths: Sequence[int]) -> dict[str, np.ndarray]:
  """Splits the measured per-block variance changes into within-stage and transition ones.

  Args:
    stats: Measured statistics.
    depths: Blocks per stage of the same network.

  Returns:
    {'within': Var x_{k+1} - Var x_k for every non-transition block k,
     'transition': Var x_{k+1} for every transition block k (the value after the reset)}.
  """
  num_blocks = sum(int(d) for d in depths)
  if len(stats.res_avg_var) != num_blocks:
    raise ValueError(f'stats has {len(stats.res_avg_var)} blocks but depths {tuple(depths)} '
                     f'describe {num_blocks}: pass the depths of the measured network.')
  starts = set(stage_starts(depths))
  var_out = stats.avg_var[1:]
  within = [var_out[k] - var_out[k - 1] for k in range(num_blocks) if k not in starts]
  transition = [var_out[k] for k in sorted(starts)]
  return {'within': np.array(within, np.float64), 'transition': np.array(transition, np.float64)}


def set_skip_gains(params: hk.Params, value: float) -> hk.Params:
  """Returns a copy of `params` with every scalar 'skip_gain' set to `value`.

  NF blocks initialise skip_gain to 0 (SkipInit); setting 1 shows the signal propagation the
  network would have with its residual branches switched on.

  Args:
    params: Haiku params of an NF model.
    value: New skip gain.

  Returns:
    New params; the input is not modified.
  """
  found = []

  def replace(path: Any, leaf: jax.Array) -> jax.Array:
    name = path[-1].key if isinstance(path[-1], jax.tree_util.DictKey) else None
    if name == 'skip_gain':
      found.append(path)
      return jnp.full_like(leaf, value)
    return leaf

  new_params = jax.tree_util.tree_map_with_path(replace, params)
  if not found:
    raise ValueError("params have no 'skip_gain' leaf: set_skip_gains is for NF models "
                     '(NFNet, NF_ResNet, NF_RegNet).')
  return new_params


@functools.lru_cache(maxsize=16)
def _jitted_apply(forward: hk.TransformedWithState, is_training: bool):
  """One compiled metrics pass per (model, mode), reused across params (e.g. skip gains)."""
  def apply(params, state, images):
    outputs, _ = forward.apply(params, state, jax.random.PRNGKey(0), images,
                               is_training=is_training, return_metrics=True)
    # Only the scalar metrics leave the program, not the feature maps.
    return {k: v for k, v in outputs.items() if _METRIC_RE.match(k)}
  return jax.jit(apply)


def measure(forward: hk.TransformedWithState, params: hk.Params, state: hk.State,
            images: jax.Array, is_training: bool) -> SignalStats:
  """Runs one forward pass with metrics and collects the per-block statistics.

  Args:
    forward: From `models.make_forward`.
    params: Model params.
    state: Model state (BatchNorm statistics; empty for NF models).
    images: NHWC inputs, e.g. N(0, 1) noise.
    is_training: True for BatchNorm models (batch statistics, as the paper's SPPs), False for
      NF models so stochastic depth and dropout stay off.

  Returns:
    The statistics.
  """
  return collect_stats(_jitted_apply(forward, bool(is_training))(params, state, images))
