"""Adaptive Gradient Clipping (AGC) as an optax transformation, with exclusions and statistics.

AGC (Brock et al. 2021, "High-Performance Large-Scale Image Recognition Without
Normalization", arXiv 2102.06171, Sec. 4) rescales the gradient of each *unit* (one
output channel of a conv, one output column of a linear, a whole vector or scalar
otherwise) whenever its norm is too large relative to the norm of the matching weights:

    if ||G_i|| / max(||W_i||, eps) > clipping:  G_i <- clipping * max(||W_i||, eps) / ||G_i|| * G_i

The maths is optax's own `optax.adaptive_grad_clip`; this module adds what training
needs around it:

* exclusion of parameters by path pattern or predicate (the paper never clips the final
  classifier weight), with an error when an explicit pattern matches nothing, because a
  typo would otherwise silently clip the head;
* per-step clip statistics kept in the optimizer state, read back with `agc_metrics`.

Parameter paths are the pytree keys joined with '/', so the Haiku leaf
`params['NFNet/~/linear']['w']` has the path 'NFNet/~/linear/w'.
"""

import fnmatch
import re
from typing import Any, Callable, NamedTuple, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax

# A predicate receives the '/'-joined path and the leaf (the parameter at init, the update
# afterwards: both have the same shape) and returns True for leaves AGC must leave alone.
Predicate = Callable[[str, Any], bool]
Pattern = Union[str, "re.Pattern[str]", Predicate]
Exclude = Optional[Union[Pattern, Sequence[Pattern]]]

# The prefix that marks a string pattern as a regular expression (configs hold strings only).
REGEX_PREFIX = "re:"

# The final classifier of every model family here is a top-level `hk.Linear` called
# 'linear' ('NFNet/~/linear', 'NF_ResNet/~/linear', ...). Requiring exactly one module level
# ('<top>/~/linear') keeps the squeeze-excite linears ('.../squeeze_excite/~/linear') out.
CLASSIFIER_WEIGHT = REGEX_PREFIX + r"[^/]+/~/linear/w"
# timm's training script also leaves the classifier bias unclipped; the official code clips it.
CLASSIFIER_WEIGHT_AND_BIAS = REGEX_PREFIX + r"[^/]+/~/linear/(w|b)"


class AGCState(NamedTuple):
  """Clip statistics of the most recent update (all zeros before the first one).

  Attributes:
    units_clipped: int32, units whose gradient was rescaled at the last step.
    units_total: int32, units AGC looked at (excluded parameters are not counted).
    fraction_clipped: float32, units_clipped / units_total (0 when nothing is clipped-able).
    max_ratio: float32, the largest ||G_i|| / (clipping * max(||W_i||, eps)); above 1 means
      that unit was clipped, so it shows how hard the worst unit pushed against the limit.
  """
  units_clipped: jax.Array
  units_total: jax.Array
  fraction_clipped: jax.Array
  max_ratio: jax.Array


def path_to_str(path: Sequence[Any]) -> str:
  """Joins a `jax.tree_util` key path into 'module_path/param_name'."""
  return jax.tree_util.keystr(tuple(path), simple=True, separator="/")


def _is_concrete_number(x: Any) -> bool:
  return isinstance(x, (int, float, np.number)) or (isinstance(x, np.ndarray) and x.ndim == 0)


def _compile_pattern(pattern: Pattern) -> Callable[[str, Any], bool]:
  """Turns one exclusion pattern into a predicate over (path, leaf)."""
  if callable(pattern) and not isinstance(pattern, (str, re.Pattern)):
    return pattern
  if isinstance(pattern, re.Pattern):
    return lambda path, _: pattern.fullmatch(path) is not None
  if isinstance(pattern, str):
    if not pattern:
      raise ValueError("AGC exclude pattern is an empty string; remove it or name a parameter.")
    if pattern.startswith(REGEX_PREFIX):
      try:
        regex = re.compile(pattern[len(REGEX_PREFIX):])
      except re.error as e:
        raise ValueError(f"AGC exclude regex {pattern!r} does not compile ({e}); fix it.") from e
      return lambda path, _: regex.fullmatch(path) is not None
    # Haiku prints parameters as 'module:param'; accept that spelling for the last ':' so
    # 'NFNet/~/linear:w' and 'NFNet/~/linear/w' mean the same thing.
    head, sep, tail = pattern.rpartition(":")
    glob = f"{head}/{tail}" if sep else pattern
    return lambda path, _: fnmatch.fnmatchcase(path, glob)
  raise ValueError(
      f"AGC exclude entries must be str, re.Pattern or callable(path, leaf); got {type(pattern)}.")


def _as_pattern_list(exclude: Exclude) -> list:
  if exclude is None:
    return []
  if isinstance(exclude, (str, re.Pattern)) or callable(exclude):
    return [exclude]
  if not isinstance(exclude, (list, tuple)):
    raise ValueError(
        f"AGC exclude entries must be str, re.Pattern or callable(path, leaf); got {type(exclude)}.")
  return list(exclude)


def make_exclude_fn(exclude: Exclude) -> Callable[[Any], Any]:
  """Builds `tree -> bool tree` (True = AGC applies), raising on patterns that match nothing.

  Args:
    exclude: None (clip everything), one pattern, or a sequence of patterns. A pattern is a
      glob over the '/'-joined path ('NFNet/~/linear:w', '*/linear/b'), a regex string
      prefixed with 're:' or an `re.Pattern` (full match), or a predicate(path, leaf).

  Returns:
    A function mapping a parameter (or update) tree to a tree of Python bools.
  """
  patterns = _as_pattern_list(exclude)
  compiled = [_compile_pattern(p) for p in patterns]
  # Predicates are code, not spellings: one that matches nothing for some model may be
  # intended. String/regex patterns are checked, because a typo would clip the head.
  checked = [not (callable(p) and not isinstance(p, (str, re.Pattern))) for p in patterns]

  def apply_mask(tree: Any, check: bool = False) -> Any:
    flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
    paths = [path_to_str(path) for path, _ in flat]
    hits = [[bool(fn(p, leaf)) for p, (_, leaf) in zip(paths, flat)] for fn in compiled]
    if check:
      for pattern, is_checked, hit in zip(patterns, checked, hits):
        if is_checked and not any(hit):
          shown = ", ".join(paths[:8]) + (", ..." if len(paths) > 8 else "")
          raise ValueError(
              f"AGC exclude pattern {pattern!r} matches no parameter (paths look like: {shown});"
              " fix the pattern or set exclude=None.")
    keep = [not any(h[i] for h in hits) for i in range(len(paths))]
    return jax.tree_util.tree_unflatten(treedef, keep)

  return apply_mask


def _units_per_leaf(x: jax.Array) -> tuple:
  """(unit size, number of units) of a leaf, from its static shape alone.

  Mirrors the reduction axes of optax's `unitwise_norm` (squeezed rank <= 1: the whole
  tensor; rank 2-3: axis 0; rank 4: axes 0-2; rank 5: axes 0-3). Computing this from
  shapes matters: evaluating optax's function on a dummy array compiled one small XLA
  program per parameter shape, about 8 s before the first AGC step on a 2-core CPU.
  """
  shape = tuple(int(d) for d in x.shape)
  size = int(np.prod(shape)) if shape else 1
  if size == 0:
    return 1, 0
  if sum(d != 1 for d in shape) <= 1:
    unit_size = size
  elif len(shape) in (2, 3):
    unit_size = shape[0]
  elif len(shape) in (4, 5):
    unit_size = int(np.prod(shape[:-1]))
  else:
    raise ValueError(f'AGC has no unit-wise norm for rank-{len(shape)} parameters {shape}; '
                     'pass an exclusion for this parameter.')
  return unit_size, size // unit_size


def _clip_with_statistics(clipping: Any, eps: Any) -> optax.GradientTransformation:
  """optax's AGC on every leaf it is given, recording `AGCState` statistics.

  The clip is optax's own composition (`unitwise_norm`, then `unitwise_clip` against
  clipping * max(||W_i||, eps)), written out here so that the statistics read the same norms
  instead of computing them a second time (half the ops for XLA to compile).
  """

  def init_fn(params: Any) -> AGCState:
    del params
    zero_i, zero_f = jnp.zeros((), jnp.int32), jnp.zeros((), jnp.float32)
    return AGCState(zero_i, zero_i, zero_f, zero_f)

  def update_fn(updates: Any, state: AGCState, params: Optional[Any] = None):
    del state
    if params is None:
      raise ValueError("AGC needs the parameters: call update(grads, opt_state, params).")
    units_total = 0
    over, ratios = [], []  # Per unit, every leaf: ||G_i|| > max norm, and their ratio.
    leaves, treedef = jax.tree_util.tree_flatten(updates)
    clipped_leaves = []
    for g, p in zip(leaves, jax.tree.leaves(params)):
      unit_size, num_units = _units_per_leaf(g)
      if num_units == 0:
        clipped_leaves.append(g)
        continue
      g_norm = optax.transforms.unitwise_norm(g)
      max_norm = clipping * jnp.maximum(optax.transforms.unitwise_norm(p), eps)
      # optax promotes bf16 gradients to f32 (the threshold is f32); keep the caller's dtype
      # so AGC can sit anywhere in a chain without changing update dtypes.
      clipped_leaves.append(optax.transforms.unitwise_clip(g_norm, max_norm, g).astype(g.dtype))
      # The norms are constant over each unit's elements: one value per unit suffices, and
      # the statistics of all leaves then take one reduction each instead of two per leaf
      # (every reduction is a kernel of its own, and compile time grows with their number).
      # The units are the trailing axes, so row 0 of [unit_size, num_units] holds each once.
      g_unit = jnp.reshape(g_norm, (unit_size, num_units))[0]
      max_unit = jnp.reshape(max_norm, (unit_size, num_units))[0]
      # Strict '>' is the paper's condition; at equality the rescale factor is exactly 1, so
      # such a unit is unchanged either way and is not reported as clipped.
      over.append(g_unit > max_unit)
      ratios.append((g_unit / max_unit).astype(jnp.float32))
      units_total += num_units
    units_clipped = (jnp.sum(jnp.concatenate(over), dtype=jnp.int32) if over
                     else jnp.zeros((), jnp.int32))
    max_ratio = jnp.zeros((), jnp.float32)
    if ratios:
      max_ratio = jnp.maximum(max_ratio, jnp.max(jnp.concatenate(ratios)))
    stats = AGCState(units_clipped=units_clipped,
                     units_total=jnp.asarray(units_total, jnp.int32),
                     fraction_clipped=units_clipped.astype(jnp.float32) / max(units_total, 1),
                     max_ratio=max_ratio)
    return jax.tree_util.tree_unflatten(treedef, clipped_leaves), stats

  return optax.GradientTransformation(init_fn, update_fn)


def adaptive_grad_clip(clipping: float,
                       eps: float = 1e-3,
                       exclude: Exclude = None) -> optax.GradientTransformation:
  """Unit-wise Adaptive Gradient Clipping with exclusions and clip statistics.

  Args:
    clipping: lambda, the largest allowed ||G_i|| / max(||W_i||, eps). The paper uses 0.01
      for batch sizes 1024-4096 and recommends smaller values for larger batches.
    eps: floor on the weight norm, so zero-initialised parameters (biases, skip gains) can
      still move: their gradient is limited to clipping * eps instead of 0.
    exclude: parameters AGC must not touch; None clips everything. See `make_exclude_fn`
      for the pattern forms. Use `CLASSIFIER_WEIGHT` for the paper's recipe.

  Returns:
    An `optax.GradientTransformation` whose update needs `params`. Excluded leaves pass
    through unchanged; statistics are read with `agc_metrics(opt_state)`.

  Raises:
    ValueError: on clipping <= 0 or eps <= 0 (here), or, at `init`, when an explicit string
      or regex pattern matches no parameter.
  """
  if _is_concrete_number(clipping) and not float(clipping) > 0:
    raise ValueError(f"AGC clipping must be > 0 (got {clipping}); the paper uses 0.01.")
  if _is_concrete_number(eps) and not float(eps) > 0:
    raise ValueError(f"AGC eps must be > 0 (got {eps}); the paper uses 1e-3.")
  keep_fn = make_exclude_fn(exclude)
  masked = optax.masked(_clip_with_statistics(clipping, eps), keep_fn)

  def init_fn(params: Any) -> optax.MaskedState:
    keep_fn(params, check=True)  # Raises here, once, for patterns that match nothing.
    return masked.init(params)

  def update_fn(updates: Any, state: optax.MaskedState, params: Optional[Any] = None):
    if params is None:
      raise ValueError("AGC needs the parameters: call update(grads, opt_state, params).")
    return masked.update(updates, state, params)

  return optax.GradientTransformation(init_fn, update_fn)


def agc_metrics(opt_state: Any) -> dict:
  """Clip statistics found anywhere in an optimizer state (chain, masked, injected, ...).

  Args:
    opt_state: any optax state tree.

  Returns:
    {'agc/fraction_clipped', 'agc/units_clipped', 'agc/units_total', 'agc/max_ratio'} as
    arrays (with a leading device axis if the state is replicated); keys are prefixed
    'agc_1/', 'agc_2/', ... when several AGC transforms are present; {} when there is none.
  """
  found = [s for s in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, AGCState))
           if isinstance(s, AGCState)]
  metrics = {}
  for i, state in enumerate(found):
    prefix = "agc" if len(found) == 1 else f"agc_{i + 1}"
    for field in AGCState._fields:
      metrics[f"{prefix}/{field}"] = getattr(state, field)
  return metrics
