"""The training state: one pytree holding everything a step changes.

`TrainState` is what a checkpoint saves (under its field names: `params/...`, `opt_state/...`,
`step`, `rng`) and what the train step donates and returns, as replicated global arrays on the
device mesh (`nfnets.train.mesh`): no leading device axis, whatever the topology.
"""

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple, Optional

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

from nfnets.train import mesh as mesh_lib

PyTree = Any


def fast_compile_options() -> Optional[dict[str, Any]]:
  """Compiler options for programs whose speed does not matter (init, memory analysis).

  XLA:CPU's LLVM backend spends long optimising code that runs once or never; level 0 skips
  that and does not change buffer assignment. Accelerators keep their defaults.
  """
  return {'xla_backend_optimization_level': 0} if jax.default_backend() == 'cpu' else None


class TrainState(NamedTuple):
  """Everything that changes during training; a pytree, so it can be jitted and saved.

  Attributes:
    step: int32 scalar, steps taken so far: the data position (batch `step` comes next).
      The schedule and EMA index is `applied_updates(opt_state)`, which stays behind after a
      skipped non-finite step.
    params: float32 Haiku params.
    state: Haiku state (float32 where floating).
    opt_state: optax state of `optimizer`.
    ema_params: exponential moving average of `params`.
    ema_state: exponential moving average of `state`.
    rng: raw uint32 PRNG key; the step's key is fold_in(rng, step) (see nfnets.train.step).
  """
  step: jax.Array
  params: hk.Params
  state: hk.State
  opt_state: optax.OptState
  ema_params: hk.Params
  ema_state: hk.State
  rng: jax.Array


def raw_key(rng: Any) -> jax.Array:
  """Returns a raw uint32 key: typed keys do not survive numpy round trips (checkpoints)."""
  if isinstance(rng, (int, np.integer)):
    return jax.random.PRNGKey(int(rng))
  rng = jnp.asarray(rng)
  if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key):
    return jax.random.key_data(rng)
  if rng.dtype != jnp.uint32:
    raise ValueError(f'rng must be an int seed or a PRNG key, got dtype {rng.dtype}.')
  return rng


def is_float(x: Any) -> bool:
  return jnp.issubdtype(jnp.result_type(x), jnp.floating)


def cast_floats(tree: PyTree, dtype: Any) -> PyTree:
  """Casts floating leaves only: integer state (e.g. counters) must keep its dtype."""
  return jax.tree.map(lambda x: x.astype(dtype) if is_float(x) else x, tree)


def init_train_state(forward: hk.TransformedWithState,
                     optimizer: optax.GradientTransformation,
                     rng: Any,
                     image_shape: Sequence[int],
                     mesh: Optional[Mesh] = None) -> TrainState:
  """Initialises params, state, optimizer state and EMA copies.

  Args:
    forward: transformed model; `forward.init(rng, images, is_training=True)`.
    optimizer: the optax transformation used by the train step.
    rng: int seed or PRNG key; split into an init key and the per-run base key.
    image_shape: (H, W, C) or (B, H, W, C) of one example / batch (only shapes matter).
    mesh: put the state on this mesh as replicated global arrays (what the train step
      takes); None: on the default device.

  Returns:
    A TrainState with step 0.
  """
  shape = tuple(int(d) for d in image_shape)
  if len(shape) == 3:
    shape = (1,) + shape
  if len(shape) != 4:
    raise ValueError(f'image_shape must be (H, W, C) or (B, H, W, C), got {image_shape}.')

  def build(key: jax.Array, images: jax.Array) -> TrainState:
    init_rng, base_rng = jax.random.split(key)
    params, state = forward.init(init_rng, images, is_training=True)
    params, state = cast_floats(params, jnp.float32), cast_floats(state, jnp.float32)
    # The EMA copies start as the weights. Outputs of one program never share a buffer (XLA
    # copies a value returned twice), which the train step needs: it donates the whole state.
    return TrainState(step=jnp.zeros([], jnp.int32), params=params, state=state,
                      opt_state=optimizer.init(params), ema_params=params, ema_state=state,
                      rng=base_rng)

  # One compiled program for the whole state: op-by-op, every distinct parameter shape would
  # be a program of its own (an EMA copy, a cast), each traced, compiled or loaded at start-up.
  key, images = raw_key(rng), np.zeros(shape, np.float32)
  lowered = jax.jit(build).lower(key, images)
  # Init runs once and takes milliseconds, but its program holds one random-number kernel per
  # parameter, which XLA:CPU's LLVM backend spends a long time optimising (demo NFNet: 23 s at
  # the default level, 10 s at level 0, on the 2-core CI machine).
  ts = lowered.compile(compiler_options=fast_compile_options())(key, images)
  # Every process computed the same values from the same seed: each places its own copies.
  return mesh_lib.replicate(jax.device_get(ts), mesh) if mesh is not None else ts


def make_forward(model: Any, num_classes: int) -> hk.TransformedWithState:
  """The transformed model of `config.model` (a ModelOptions) with `num_classes` outputs."""
  from nfnets.models import registry  # pylint: disable=g-import-not-at-top
  return registry.make_forward(model.name, num_classes, remat=model.remat,
                               scan_blocks=model.scan_blocks, **model.kwargs)


def model_shapes(forward: hk.TransformedWithState, image_shape: Sequence[int]
                 ) -> tuple[Any, Any]:
  """(params, state) of the model as ShapeDtypeStructs, computing nothing."""
  return jax.eval_shape(
      lambda r, x: forward.init(r, x, is_training=True),
      jax.ShapeDtypeStruct((2,), jnp.uint32),
      jax.ShapeDtypeStruct((1,) + tuple(image_shape), jnp.float32))


def abstract_train_state(forward: hk.TransformedWithState,
                         optimizer: optax.GradientTransformation,
                         image_shape: Sequence[int]) -> TrainState:
  """The TrainState's shapes and dtypes (jax.ShapeDtypeStruct leaves), computing nothing."""
  def build():
    rng = jax.random.PRNGKey(0)
    params, state = forward.init(rng, jnp.zeros((1,) + tuple(image_shape), jnp.float32),
                                 is_training=True)
    params, state = cast_floats(params, jnp.float32), cast_floats(state, jnp.float32)
    return TrainState(step=jnp.zeros([], jnp.int32), params=params, state=state,
                      opt_state=optimizer.init(params), ema_params=params, ema_state=state,
                      rng=jax.random.key_data(jax.random.key(0)))
  return jax.eval_shape(build)


def applied_updates(opt_state: Any, default: jax.Array) -> jax.Array:
  """How many updates the optimizer has applied: its learning-rate schedule's own counter.

  It differs from `TrainState.step` (the data position) after a skipped non-finite step,
  which moves on to the next batch but applies nothing. The schedule and the EMA index are
  this count, so the logged learning rate is the one the update used.

  Args:
    opt_state: an optax state holding one `ScaleByScheduleState` (every optimizer built by
      `nfnets.train.optim`).
    default: returned when there is no schedule counter (a constant-lr optimizer).
  """
  def is_schedule(path: Any, _: Any) -> bool:
    return any(getattr(k, 'tuple_name', None) == 'ScaleByScheduleState' for k in path)
  count = optax.tree_utils.tree_get(opt_state, 'count', default=None, filtering=is_schedule)
  return default if count is None else jnp.asarray(count, jnp.int32)


_UPSTREAM_FIRST = ('loss', 'grads', 'params')


def first_nonfinite(tree: PyTree) -> Optional[str]:
  """Names the first leaf holding a NaN or Inf, e.g. 'loss' or 'grads/linear/w'.

  Top-level mapping keys are visited upstream first: 'loss', then 'grads', then 'params',
  then the rest in the mapping's order (jit outputs come back with sorted keys, so
  insertion order cannot carry this); below that, pytree order.

  Args:
    tree: a metrics dict or any pytree of (host or device) arrays.

  Returns:
    The '/'-joined path of the first non-finite floating leaf, or None if all are finite.
  """
  if isinstance(tree, Mapping):
    rank = {name: i for i, name in enumerate(_UPSTREAM_FIRST)}
    items = sorted(tree.items(), key=lambda kv: rank.get(kv[0], len(rank)))  # stable
  else:
    items = [(None, tree)]
  for name, sub in items:
    for path, leaf in jax.tree_util.tree_flatten_with_path(sub)[0]:
      arr = np.asarray(leaf)
      if not jnp.issubdtype(arr.dtype, jnp.inexact):
        continue
      if not np.all(np.isfinite(arr.astype(np.float32))):
        parts = ([] if name is None else [str(name)]) + (
            [jax.tree_util.keystr(path, simple=True, separator='/')] if path else [])
        return '/'.join(parts)
  return None
