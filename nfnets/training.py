"""Pure, pmapped train and eval steps: loss, bf16 compute, SAM, EMA, AGC metrics.

Everything here is a pure function of (TrainState, batch). The per-step randomness is
derived from the step counter rather than carried as a split chain, so a run resumed from a
checkpoint at step k draws exactly the dropout / stochastic-depth masks it would have drawn.
Data-parallelism uses `jax.pmap` over the axis name 'batch'; gradients are averaged over it,
so one update equals a single-device step on the global batch (for models without
cross-example statistics).
"""

from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple, Optional

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from nfnets import agc
from nfnets import optim

AXIS_NAME = 'batch'
# The official tf1_ema decay, used when neither the caller nor train_config gives one.
DEFAULT_EMA_DECAY = 0.99999
_INIT_COMPILER_OPTIONS = {'xla_backend_optimization_level': 0}
PyTree = Any
Schedule = Callable[[jax.Array], jax.Array]


class TrainState(NamedTuple):
  """Everything that changes during training; a pytree, so it can be pmapped and saved.

  Attributes:
    step: int32 scalar, number of steps taken so far (also the schedule / EMA index).
    params: float32 Haiku params.
    state: Haiku state (float32 where floating).
    opt_state: optax state of `optimizer`.
    ema_params: exponential moving average of `params`.
    ema_state: exponential moving average of `state`.
    rng: raw uint32 PRNG key; the per-step key is fold_in(fold_in(rng, step), device).
  """
  step: jax.Array
  params: hk.Params
  state: hk.State
  opt_state: optax.OptState
  ema_params: hk.Params
  ema_state: hk.State
  rng: jax.Array


def _raw_key(rng: Any) -> jax.Array:
  """Returns a raw uint32 key: typed keys do not survive numpy round trips (checkpoints)."""
  if isinstance(rng, (int, np.integer)):
    return jax.random.PRNGKey(int(rng))
  rng = jnp.asarray(rng)
  if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key):
    return jax.random.key_data(rng)
  if rng.dtype != jnp.uint32:
    raise ValueError(f'rng must be an int seed or a PRNG key, got dtype {rng.dtype}.')
  return rng


def _is_float(x: Any) -> bool:
  return jnp.issubdtype(jnp.result_type(x), jnp.floating)


def _cast_floats(tree: PyTree, dtype: Any) -> PyTree:
  """Casts floating leaves only: integer state (e.g. counters) must keep its dtype."""
  return jax.tree.map(lambda x: x.astype(dtype) if _is_float(x) else x, tree)


def init_train_state(forward: hk.TransformedWithState,
                     optimizer: optax.GradientTransformation,
                     rng: Any,
                     image_shape: Sequence[int]) -> TrainState:
  """Initialises params, state, optimizer state and EMA copies on the host's default device.

  Args:
    forward: transformed model; `forward.init(rng, images, is_training=True)`.
    optimizer: the optax transformation used by the train step.
    rng: int seed or PRNG key; split into an init key and the per-run base key.
    image_shape: (H, W, C) or (B, H, W, C) of one example / batch (only shapes matter).

  Returns:
    An unreplicated TrainState with step 0; pass it through `replicate` for the train step.
  """
  shape = tuple(int(d) for d in image_shape)
  if len(shape) == 3:
    shape = (1,) + shape
  if len(shape) != 4:
    raise ValueError(f'image_shape must be (H, W, C) or (B, H, W, C), got {image_shape}.')
  init_rng, base_rng = jax.random.split(_raw_key(rng))
  # jit so big models are initialised by one compiled program, not op by op.
  images = jnp.zeros(shape, jnp.float32)
  lowered = jax.jit(lambda r, x: forward.init(r, x, is_training=True)).lower(init_rng, images)
  # Init runs once and takes milliseconds, but its program holds one random-number kernel per
  # parameter, which XLA:CPU's LLVM backend spends a long time optimising (demo NFNet: 23 s at
  # the default level, 10 s at level 0, on the 2-core CI machine). Accelerators keep defaults.
  options = _INIT_COMPILER_OPTIONS if jax.default_backend() == 'cpu' else None
  params, state = lowered.compile(compiler_options=options)(init_rng, images)
  params, state = _cast_floats(params, jnp.float32), _cast_floats(state, jnp.float32)
  opt_state = jax.jit(optimizer.init)(params)
  # Separate buffers for the EMA copies: the train step donates the whole state.
  return TrainState(step=jnp.zeros([], jnp.int32), params=params, state=state,
                    opt_state=opt_state, ema_params=jax.tree.map(jnp.copy, params),
                    ema_state=jax.tree.map(jnp.copy, state), rng=base_rng)


def replicate(tree: PyTree, devices: Optional[Sequence[jax.Device]] = None) -> PyTree:
  """Puts one copy of every leaf on each device, laid out as a pmap input [D, ...].

  The NamedSharding over a 1-D mesh named 'batch' is exactly what `jax.pmap` returns, so
  feeding the result to a pmapped step causes no resharding.

  Args:
    tree: host-local pytree of arrays.
    devices: the devices of the pmap; default `jax.local_devices()`.
  """
  devices = list(jax.local_devices() if devices is None else devices)
  sharding = NamedSharding(Mesh(np.array(devices), (AXIS_NAME,)), PartitionSpec(AXIS_NAME))

  def put(x):
    x = np.asarray(x)
    # broadcast_to is a view: the host never holds D copies, device_put slices it per device.
    return jax.device_put(np.broadcast_to(x, (len(devices),) + x.shape), sharding)

  return jax.tree.map(put, tree)


def unreplicate(tree: PyTree) -> PyTree:
  """Host (numpy) copy of the first local device's replica (replicas agree after a synced step).

  Reads the first shard's buffer directly and copies it: `x[0]` on a device array would compile
  one tiny program per leaf shape in every (re)started process (seconds of start-up on a small
  CPU), and the copy stays valid after the replicated input is donated to the next step.

  Args:
    tree: replicated pytree (leading device axis) of device or host arrays.
  """
  def first(x):
    if isinstance(x, jax.Array):
      return np.array(x.addressable_shards[0].data)[0]
    return np.array(x)[0]

  return jax.tree.map(first, tree)


def make_targets(labels: jax.Array, num_classes: int, label_smoothing: float = 0.0,
                 mix_labels: Optional[jax.Array] = None,
                 mix_ratio: Optional[jax.Array] = None) -> jax.Array:
  """One-hot targets, mixed for MixUp/CutMix, then label-smoothed (the official order).

  Args:
    labels: int [B] labels.
    num_classes: number of classes.
    label_smoothing: s; targets become y*(1-s) + s/num_classes.
    mix_labels: optional int [B] labels of the second mixed example.
    mix_ratio: optional float [B] weight of `labels` (so 1-ratio weighs `mix_labels`).

  Returns:
    float32 [B, num_classes] targets, each row summing to 1.
  """
  y = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
  if mix_labels is not None:
    ratio = jnp.asarray(mix_ratio, jnp.float32)[:, None]
    y = ratio * y + (1.0 - ratio) * jax.nn.one_hot(mix_labels, num_classes, dtype=jnp.float32)
  if label_smoothing > 0:
    y = y * (1.0 - label_smoothing) + label_smoothing / num_classes
  return y


def softmax_cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """Per-example -sum(targets * log_softmax(logits)), computed in float32."""
  return -jnp.sum(targets * jax.nn.log_softmax(logits.astype(jnp.float32)), axis=-1)


def topk_correct(logits: jax.Array, labels: jax.Array, k: int) -> jax.Array:
  """float32 [B]: 1 where the label is among the k largest logits (k capped at #classes)."""
  k = min(k, logits.shape[-1])
  _, top = lax.top_k(logits, k)
  return jnp.any(top == labels[:, None], axis=-1).astype(jnp.float32)


def _all_finite(tree: PyTree) -> jax.Array:
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree) if _is_float(x)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def _pmean_floats(tree: PyTree) -> PyTree:
  # Integer state (counters) is identical on every replica; averaging it would change dtype.
  return jax.tree.map(lambda x: lax.pmean(x, AXIS_NAME) if _is_float(x) else x, tree)


def _config_get(config: Any, key: str, default: Any) -> Any:
  """Reads an optional key from a ConfigDict, dict or None."""
  if config is None:
    return default
  value = config.get(key, default)
  return default if value is None else value


def _check_batch(batch: Mapping[str, jax.Array]) -> None:
  for key in ('images', 'labels'):
    if key not in batch:
      raise ValueError(f"batch is missing '{key}': the iterator must yield images and labels.")
  if ('mix_labels' in batch) != ('mix_ratio' in batch):
    raise ValueError("batch must hold both 'mix_labels' and 'mix_ratio', or neither.")


def _make_grad_computation(forward: hk.TransformedWithState, train_config: Any,
                           num_classes: int) -> Callable[..., tuple]:
  """Builds (ts, batch) -> (loss, grads, logits, new_state, labels); all but logits synced.

  Must run inside a pmap over AXIS_NAME. With SAM, loss, logits and new_state are those
  of the descent pass, i.e. at the perturbed params.
  """
  smoothing = float(_config_get(train_config, 'label_smoothing', 0.0))
  bfloat16 = bool(_config_get(train_config, 'bfloat16', False))
  sam_rho = float(_config_get(train_config, 'sam_rho', 0.0))
  sam_fraction = float(_config_get(train_config, 'sam_fraction', 0.2))
  if not 0.0 <= smoothing < 1.0:
    raise ValueError(f'train.label_smoothing must be in [0, 1), got {smoothing}.')
  if sam_rho < 0:
    raise ValueError(f'train.sam_rho must be >= 0 (0 disables SAM), got {sam_rho}.')
  if not 0.0 < sam_fraction <= 1.0:
    raise ValueError(f'train.sam_fraction must be in (0, 1], got {sam_fraction}.')
  compute_dtype = jnp.bfloat16 if bfloat16 else jnp.float32

  def loss_fn(params, state, rng, images, targets):
    # Casting inside the differentiated function makes the cotangent of the cast a cast
    # back: gradients come out float32 (from bf16 backprop) before any reduction.
    outputs, new_state = forward.apply(
        _cast_floats(params, compute_dtype), _cast_floats(state, compute_dtype), rng,
        images.astype(compute_dtype), is_training=True)
    logits = outputs['logits'].astype(jnp.float32)
    loss = jnp.mean(softmax_cross_entropy(logits, targets))
    return loss, (logits, _cast_floats(new_state, jnp.float32))

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def compute(ts: TrainState, batch: Mapping[str, jax.Array]):
    _check_batch(batch)
    images, labels = batch['images'], batch['labels']
    targets = make_targets(labels, num_classes, smoothing, batch.get('mix_labels'),
                           batch.get('mix_ratio'))
    # Keyed by step and device: reproducible after resume, different masks per device.
    rng = jax.random.fold_in(jax.random.fold_in(ts.rng, ts.step), lax.axis_index(AXIS_NAME))
    params = ts.params
    if sam_rho > 0:
      ascent_rng, rng = jax.random.split(rng)
      n = max(1, int(round(images.shape[0] * sam_fraction)))
      # SAM ascent on a slice of the local batch, deliberately NOT synced across devices:
      # each replica probes its own neighbourhood (paper A.4), at ~fraction of the cost.
      _, ascent_grads = grad_fn(params, ts.state, ascent_rng, images[:n], targets[:n])
      scale = sam_rho / (optax.tree.norm(ascent_grads) + 1e-12)
      params = jax.tree.map(lambda p, g: p + (scale * g).astype(p.dtype), params, ascent_grads)
    (loss, (logits, new_state)), grads = grad_fn(params, ts.state, rng, images, targets)
    grads = _cast_floats(grads, jnp.float32)  # float32 before the cross-device mean
    grads = lax.pmean(grads, AXIS_NAME)
    loss = lax.pmean(loss, AXIS_NAME)
    return loss, grads, logits, _pmean_floats(new_state), labels

  return compute


def make_train_step(forward: hk.TransformedWithState,
                    optimizer: optax.GradientTransformation,
                    schedule: Schedule,
                    train_config: Any,
                    num_classes: int,
                    *,
                    ema_decay: Optional[float] = None,
                    devices: Optional[Sequence[jax.Device]] = None) -> Callable:
  """Builds the pmapped training step (TrainState, batch) -> (TrainState, metrics).

  Args:
    forward: transformed model, apply(params, state, rng, images, is_training).
    optimizer: optax transformation (e.g. from optim.build_optimizer).
    schedule: step -> learning rate, only reported as a metric.
    train_config: `config.train`; reads label_smoothing, bfloat16, sam_rho, sam_fraction
      (default 0.2), skip_nonfinite (default False) and ema_decay (if `ema_decay` is None).
    num_classes: number of classes of the one-hot targets.
    ema_decay: EMA decay (e.g. config.optimizer.ema_decay); default train_config.ema_decay,
      else DEFAULT_EMA_DECAY.
    devices: pmap devices; default all local devices.

  Returns:
    A pmapped function; the TrainState argument is donated. Batch leaves are
    [devices, per_device_batch, ...]. Metrics are float32, averaged over devices.
  """
  if num_classes < 1:
    raise ValueError(f'num_classes must be >= 1, got {num_classes}.')
  skip_nonfinite = bool(_config_get(train_config, 'skip_nonfinite', False))
  if ema_decay is None:
    ema_decay = float(_config_get(train_config, 'ema_decay', DEFAULT_EMA_DECAY))
  if not 0.0 <= ema_decay < 1.0:
    raise ValueError(f'ema_decay must be in [0, 1), got {ema_decay}.')
  compute = _make_grad_computation(forward, train_config, num_classes)

  def train_step(ts: TrainState, batch: Mapping[str, jax.Array]):
    loss, grads, logits, new_state, labels = compute(ts, batch)
    updates, opt_state = optimizer.update(grads, ts.opt_state, ts.params)
    params = optax.apply_updates(ts.params, updates)
    # EMA index = steps taken before this update, so step 0 uses decay min(d, 1/10).
    ema_params = optim.ema_update(ts.ema_params, params, ts.step, ema_decay)
    ema_state = optim.ema_update(ts.ema_state, new_state, ts.step, ema_decay)
    finite = jnp.isfinite(loss) & _all_finite(grads)
    if skip_nonfinite:
      def keep_old_if_bad(new, old):
        return jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
      params, opt_state, new_state, ema_params, ema_state = keep_old_if_bad(
          (params, opt_state, new_state, ema_params, ema_state),
          (ts.params, ts.opt_state, ts.state, ts.ema_params, ts.ema_state))
    skipped = jnp.logical_not(finite) if skip_nonfinite else jnp.array(False)
    metrics = {
        'loss': loss,
        'top_1_acc': jnp.mean(topk_correct(logits, labels, 1)),
        'top_5_acc': jnp.mean(topk_correct(logits, labels, 5)),
        'learning_rate': jnp.asarray(schedule(ts.step)),
        'grad_norm': optax.tree.norm(grads),
        'param_norm': optax.tree.norm(params),
        'update_norm': optax.tree.norm(updates),
        'finite': finite,
        'skipped': skipped,
        **agc.agc_metrics(opt_state),
    }
    metrics = lax.pmean(jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), metrics), AXIS_NAME)
    new_ts = TrainState(step=ts.step + 1, params=params, state=new_state, opt_state=opt_state,
                        ema_params=ema_params, ema_state=ema_state, rng=ts.rng)
    return new_ts, metrics

  return jax.pmap(train_step, axis_name=AXIS_NAME, donate_argnums=(0,), devices=devices)


def make_grad_step(forward: hk.TransformedWithState, train_config: Any, num_classes: int,
                   *, devices: Optional[Sequence[jax.Device]] = None) -> Callable:
  """Builds a pmapped (TrainState, batch) -> {'loss', 'grads'} for diagnosing a bad step.

  Same loss, bf16 and SAM handling as the train step, no update. Use it after a step
  reports finite == 0: `first_nonfinite(unreplicate(grad_step(ts, batch)))`.

  Args:
    forward: transformed model.
    train_config: `config.train` (see make_train_step).
    num_classes: number of classes.
    devices: pmap devices; default all local devices.
  """
  compute = _make_grad_computation(forward, train_config, num_classes)

  def grad_step(ts, batch):
    loss, grads, _, _, _ = compute(ts, batch)
    return {'loss': loss, 'grads': grads}

  return jax.pmap(grad_step, axis_name=AXIS_NAME, devices=devices)


def _key_name(key: Any) -> str:
  for attr in ('key', 'name', 'idx'):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


_UPSTREAM_FIRST = ('loss', 'grads', 'params')


def first_nonfinite(tree: PyTree) -> Optional[str]:
  """Names the first leaf holding a NaN or Inf, e.g. 'loss' or 'grads/linear/w'.

  Top-level mapping keys are visited upstream first: 'loss', then 'grads', then 'params',
  then the rest in the mapping's order (pmap outputs come back with sorted keys, so
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
        parts = ([] if name is None else [str(name)]) + [_key_name(k) for k in path]
        return '/'.join(parts)
  return None


def make_eval_step(forward: hk.TransformedWithState, num_classes: int, *,
                   devices: Optional[Sequence[jax.Device]] = None) -> Callable:
  """Builds the pmapped eval step (params, state, batch) -> summed counts.

  Args:
    forward: transformed model, run with is_training=False in float32.
    num_classes: number of classes.
    devices: pmap devices; default all local devices.

  Returns:
    A pmapped function returning psum'd float32 {'top_1_correct', 'top_5_correct',
    'loss_sum' (cross-entropy without label smoothing), 'count'}; examples with
    batch['mask'] == 0 (padding) are excluded. Divide by 'count' for means.
  """
  if num_classes < 1:
    raise ValueError(f'num_classes must be >= 1, got {num_classes}.')

  def eval_step(params, state, batch):
    _check_batch(batch)
    labels = batch['labels']
    mask = jnp.asarray(batch.get('mask', jnp.ones(labels.shape)), jnp.float32)
    # Fixed key: eval is deterministic (is_training=False disables dropout/stochdepth).
    outputs, _ = forward.apply(_cast_floats(params, jnp.float32), _cast_floats(state, jnp.float32),
                               jax.random.PRNGKey(0), batch['images'].astype(jnp.float32),
                               is_training=False)
    logits = outputs['logits'].astype(jnp.float32)
    loss = softmax_cross_entropy(logits, jax.nn.one_hot(labels, num_classes))
    valid = mask > 0
    # where, not multiply: padded examples may have garbage logits (NaN * 0 is NaN).
    sums = {
        'top_1_correct': jnp.sum(jnp.where(valid, topk_correct(logits, labels, 1), 0.0)),
        'top_5_correct': jnp.sum(jnp.where(valid, topk_correct(logits, labels, 5), 0.0)),
        'loss_sum': jnp.sum(jnp.where(valid, loss, 0.0)),
        'count': jnp.sum(valid.astype(jnp.float32)),
    }
    return lax.psum(sums, AXIS_NAME)

  return jax.pmap(eval_step, axis_name=AXIS_NAME, devices=devices)
