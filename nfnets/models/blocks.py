"""Running a network's residual blocks: one after another, rematerialised, or scanned.

`apply_blocks` is the body loop every NF family shares. With `scan_blocks`, each run of
consecutive blocks of one stage with the same structure and parameter shapes (every block after
the stage's transition) executes as one `lax.scan` over their parameters, stacked inside the
traced function: the parameter tree stays one entry per block (the official layout), and the
per-block differences (beta, the stochastic-depth keep probability) are scanned inputs
(`BlockScalars`). With `remat='block'`, each block's activations are recomputed in the backward
pass instead of stored.
"""

import functools
from typing import Callable, Dict, Mapping, NamedTuple, Optional, Sequence

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np

from nfnets.models.layers import StochDepth, signal_metrics

# A residual block: (x, is_training) -> (output, variance of the residual branch).
Block = Callable[[jax.Array, bool], "tuple[jax.Array, jax.Array]"]


class BlockScalars(NamedTuple):
  """The numbers in which the repeated blocks of a stage differ, as arrays `lax.scan` slices.

  Blocks of one stage after its transition have identical structure and parameter shapes;
  only these two numbers from the NF residual scaling (`nfnets.models.residual_scaling`) change
  from block to block, so one traced block body serves them all when they are scanned inputs.

  Attributes:
    beta: 1 / expected std of the block input, a scalar in the input's dtype.
    keep_prob: 1 - the stochastic-depth rate, a scalar in the input's dtype (ignored by
      blocks without stochastic depth).
  """
  beta: jax.Array
  keep_prob: jax.Array


class NFResidualBlock(hk.Module):
  """Base of the NF residual blocks that `apply_blocks` may run as one `lax.scan`.

  A subclass sets, in its constructor:

  - `beta` (float): the input pre-multiplier from the NF residual scaling;
  - `use_projection` (bool): False when the shortcut is the raw input (stride 1, same
    channels) -- only such blocks repeat, and so only they are scanned;
  - `stoch_depth` (`StochDepth` or None).

  and its `__call__(x, is_training, scalars=None)` uses `scalars.beta` and passes
  `scalars.keep_prob` to `merge_nf_residual` when `scalars` is given, `self.beta` and the
  layer's own rate otherwise. Everything else about the block must be the same for every
  block of a run (the parameter shapes are checked).
  """

  beta: float
  use_projection: bool
  stoch_depth: Optional[StochDepth]


REMAT_MODES = ('none', 'block')


def check_remat(remat: str) -> str:
  """Returns `remat`, raising unless it is one of REMAT_MODES."""
  if remat not in REMAT_MODES:
    raise ValueError(f"remat must be one of {REMAT_MODES}, got {remat!r}.")
  return remat


def _own_params(block: hk.Module, params: Mapping[str, Mapping[str, jax.Array]]
                ) -> Dict[str, Mapping[str, jax.Array]]:
  """The parameter bundles of `block` and its sub-modules, keyed by the path below the block.

  E.g. for 'NFNet/~/nf_block_3': '' (its skip_gain), '/~/conv0', '/~/squeeze_excite/~/linear'.
  """
  name = block.module_name
  return {bundle[len(name):]: values for bundle, values in params.items()
          if bundle == name or bundle.startswith(name + '/')}


def _signature(block: hk.Module, params: Mapping[str, Mapping[str, jax.Array]]) -> tuple:
  """What must agree for two blocks to share one traced body: class, stochastic depth and the
  name, shape and dtype of every parameter."""
  own = _own_params(block, params)
  shapes = tuple(sorted((path, name, tuple(v.shape), str(v.dtype))
                        for path, bundle in own.items() for name, v in bundle.items()))
  return type(block), block.stoch_depth is None, shapes


def _runs(blocks: Sequence[Block], stage_ends: Sequence[int],
          params: Mapping[str, Mapping[str, jax.Array]]) -> "list[tuple[int, int]]":
  """Splits the blocks into [start, stop) runs; a run of two or more blocks is scanned.

  A run is a maximal sequence of identity-shortcut NF blocks with one signature, ending at
  the latest at a stage end (whose output is recorded). Transitions (projection shortcuts)
  and blocks that are plain callables stay runs of one.
  """
  def repeatable(block):
    return isinstance(block, NFResidualBlock) and not block.use_projection

  runs, start = [], 0
  while start < len(blocks):
    stop = start + 1
    if repeatable(blocks[start]):
      head = _signature(blocks[start], params)
      while (stop < len(blocks) and stop - 1 not in stage_ends and repeatable(blocks[stop])
             and _signature(blocks[stop], params) == head):
        stop += 1
    runs.append((start, stop))
    start = stop
  return runs


def _scan_run(run: Sequence[NFResidualBlock], x: jax.Array, is_training: bool, remat: str,
              return_metrics: bool, params: Mapping[str, Mapping[str, jax.Array]]
              ) -> "tuple[jax.Array, Optional[tuple[jax.Array, jax.Array, jax.Array]]]":
  """Runs identical blocks as one `hk.scan` of the first block over the stacked parameters.

  The parameter tree keeps one entry per block: the per-block arrays are stacked here,
  inside the traced function (the stack's transpose hands each block its own gradient), and
  the first block's module reads its slice of the stack through a custom getter. beta and the
  stochastic-depth keep probability are scanned inputs, converted from the Python floats to
  the input's dtype exactly as the unscanned blocks' `x * beta` converts them, so every step
  computes what the unscanned block computes.

  Random draws: a scanned block calls `hk.next_rng_key()` as the unscanned one does, and
  `hk.scan` threads Haiku's key sequence through the loop carry, splitting one key per call in
  the same order: the stochastic-depth masks are the unscanned model's.

  Custom getters registered outside the model see the first block's stored parameters, not
  the scanned slices; run with scan_blocks off under such getters.

  Args:
    run: Two or more blocks with one `_signature`.
    x: Input of the first block.
    is_training: Static; passed to every block.
    remat: 'block' checkpoints the scan body (each step is recomputed in the backward pass).
    return_metrics: Whether to return the per-block metrics.
    params: The transform's parameters (`hk.get_params()`).

  Returns:
    (output of the last block, metrics): with `return_metrics`, metrics are
    (res_avg_var, avg_sq_mean, avg_var), each [len(run)]: the residual-branch variance and the
    signal metrics of each block's output; None otherwise.
  """
  head = run[0]
  stacked = jax.tree.map(lambda *leaves: jnp.stack(leaves), *[_own_params(b, params) for b in run])
  scalars = BlockScalars(
      beta=jnp.asarray(np.asarray([b.beta for b in run], np.float64).astype(x.dtype)),
      keep_prob=jnp.asarray(np.asarray(
          [1.0 - (b.stoch_depth.drop_rate if b.stoch_depth is not None else 0.0) for b in run],
          np.float64).astype(x.dtype)))
  prefix = head.module_name

  def block_step(h, block_params, block_scalars):
    def getter(next_getter, value, context):
      bundle = context.module_name
      if bundle == prefix or bundle.startswith(prefix + '/'):
        value = block_params[bundle[len(prefix):]][context.name]
      return next_getter(value)
    with hk.custom_getter(getter):
      return head(h, is_training, block_scalars)

  if remat == 'block':
    block_step = hk.remat(block_step)

  def body(h, xs):
    h, res_avg_var = block_step(h, *xs)
    if not return_metrics:
      # Nothing per step leaves the loop: unused loop outputs are not reliably removed.
      return h, None
    metrics = signal_metrics(h, '')
    return h, (res_avg_var, metrics['avg_sq_mean_'], metrics['avg_var_'])

  return hk.scan(body, x, (stacked, scalars))


def apply_blocks(blocks: Sequence[Block], x: jax.Array, is_training: bool,
                 outputs: Dict[str, jax.Array], return_metrics: bool,
                 stage_ends: Sequence[int] = (), remat: str = 'none',
                 scan_blocks: bool = False) -> jax.Array:
  """Runs the residual blocks in order, recording what the signal-propagation plots need.

  Args:
    blocks: The blocks, each returning (output, residual-branch average variance).
    x: NHWC input of the first block (the stem output).
    is_training: Passed to every block.
    outputs: The model's output dict. With `return_metrics`, 'avg_sq_mean_i'/'avg_var_i'
      (i = 0: the input, i + 1: after block i) and 'res_avg_var_i' are added; 'stage_k' is
      the output of block `stage_ends[k]` (feature maps for detection-style heads).
    return_metrics: Whether to compute the metrics (they cost two reductions per block).
    stage_ends: Indices of the last block of each stage.
    remat: 'block' recomputes each block's activations in the backward pass instead of
      keeping them (`hk.remat`): activation memory falls from all blocks' to about one
      block's, for roughly one extra forward pass. The values are unchanged.
    scan_blocks: Run each stage's repeated blocks (identity shortcut, same parameter shapes;
      `NFResidualBlock`s only) as one `lax.scan`, so the program holds one copy of the block
      per stage instead of one per block. The parameter tree, the outputs and the random
      draws are the unscanned ones, up to float rounding (see `_scan_run`); `init` always
      runs unscanned, creating the per-block parameters. What stays per block is one stack
      and one gradient slice per parameter array: on XLA:CPU, which compiles a kernel for
      each, that costs about what the unscanned block did, and the convolutions of the
      backward loop, which its Eigen canonicalisation does not reach, run as generic loops
      (slower steps): on a CPU, leave it off.

  Returns:
    The output of the last block.
  """
  check_remat(remat)
  if return_metrics:
    outputs.update(signal_metrics(x, 0))
  stage_ends = list(stage_ends)
  if scan_blocks and not hk.running_init():
    params = hk.get_params()
    runs = _runs(blocks, stage_ends, params)
  else:
    params, runs = None, [(i, i + 1) for i in range(len(blocks))]
  for start, stop in runs:
    if stop - start > 1:
      x, metrics = _scan_run(blocks[start:stop], x, is_training, remat, return_metrics, params)
      if return_metrics:
        res_avg_vars, avg_sq_means, avg_vars = metrics
        for k, i in enumerate(range(start, stop)):
          outputs[f'avg_sq_mean_{i + 1}'] = avg_sq_means[k]
          outputs[f'avg_var_{i + 1}'] = avg_vars[k]
          outputs[f'res_avg_var_{i}'] = res_avg_vars[k]
    else:
      block = blocks[start]
      if remat == 'block':
        # is_training is a Python bool (it selects code), so it is closed over, not traced.
        x, res_avg_var = hk.remat(functools.partial(block, is_training=is_training))(x)
      else:
        x, res_avg_var = block(x, is_training)
      if return_metrics:
        outputs.update(signal_metrics(x, start + 1))
        outputs[f'res_avg_var_{start}'] = res_avg_var
    if stop - 1 in stage_ends:
      outputs[f'stage_{stage_ends.index(stop - 1)}'] = x
  return x
