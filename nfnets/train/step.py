"""The train and eval steps: jit over the device mesh, a per-device body under shard_map.

Data parallelism in pmap's programming model (see `nfnets.train.mesh`): the per-device body
below sees its share of the global batch and averages gradients with `lax.pmean` over
DATA_AXIS, so one update equals a single-device step on the global batch (for models without
cross-example statistics); the state goes in and comes out as replicated global arrays.

Randomness is keyed by the step counter and by each example's place in the step's global
batch, never by the device: the step key is fold_in(rng, step); example i of the global batch
draws its dropout and stochastic-depth masks from fold_in(fold_in(step key, MODEL), i) (the
model runs per example under vmap, so its masks are per example), its RandAugment ops and its
MixUp/CutMix group's draws from the augmentation stream the same way (`nfnets.augment`). So a
run resumed from a checkpoint at step t draws exactly what it would have drawn, gradient
accumulation draws the masks of one pass, and a run resumed on another number of devices or
hosts sees the same examples with the same draws. Two things stay per device by nature: the
BatchNorm baseline's statistics (models with Haiku state run per device batch, with the key
fold_in(step key, device)), and SAM's ascent on each device's first examples (paper A.4).

Gradient accumulation (`grad_accum_steps` = k): each device splits its batch into k contiguous
micro-batches and `lax.scan`s over them inside the one compiled step, summing gradients; the
mean is what AGC, weight decay, SGD, the schedule and the EMA see, so k changes memory, not
the update (to float32 round-off). Targets (label smoothing, MixUp/CutMix) are built per
example before the split. BatchNorm statistics (the ResNet baseline) are those of each
micro-batch, applied in order.

SAM (`sam_rho` > 0, paper A.4): the ascent gradient is taken on the first
round(sam_fraction * device batch) examples of each device, not averaged across devices (each
replica probes its own neighbourhood); the descent gradient of the whole batch is then taken at
the perturbed parameters. Under accumulation the ascent examples are processed in chunks of at
most one micro-batch (rounded down to equal chunks), so the ascent is the same as with k = 1
whenever it fits in one micro-batch.

Non-finite steps: 'finite' in the metrics says whether a step's loss and gradients were
finite. With `skip_nonfinite`, a non-finite step keeps every parameter, optimizer, model and EMA
value and only moves the data position on ('skipped'); otherwise the loop stops the run at its
next check, before any checkpoint could hold the damage. The metrics are global (reduced over
every device of every host), so every host sees the same value and takes the same decision.

Decisions every host takes together: the step also takes each host's flags (`HOST_FLAGS`: a
stop signal arrived, a time-based checkpoint is due) and returns their maximum over all devices
in the metrics, so the loop on every host reads the same decision after the same step without
an extra synchronisation.
"""

from collections.abc import Callable, Mapping
from typing import Any, Optional

import chex
import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from nfnets.train import agc
from nfnets.train import distributed
from nfnets.train import mesh as mesh_lib
from nfnets.train import optim
from nfnets.train.mesh import DATA_AXIS
from nfnets.train.options import TrainOptions
from nfnets.train.state import TrainState, applied_updates, cast_floats, is_float

PyTree = Any
Schedule = Callable[[jax.Array], jax.Array]
# (device batch, the step's augmentation key, device index) -> model inputs (nfnets.augment).
Augment = Callable[[Mapping[str, jax.Array], jax.Array, jax.Array], dict]
# fold_in tags of the step key: independent streams for augmentation, the model's masks and
# the SAM ascent's masks.
_AUGMENT_STREAM, _SAM_STREAM, _MODEL_STREAM = 0x41554720, 0x53414D20, 0x4D4F4420
# Per-host flags the step reduces over every device (max), in this order (see the docstring).
HOST_FLAGS = ('stop_requested', 'save_due')


def step_key(rng: jax.Array, step: jax.Array) -> jax.Array:
  """The key of a whole step, the same on every device: fold_in(rng, step)."""
  return jax.random.fold_in(rng, step)


def example_keys(key: jax.Array, stream: int, first: jax.Array, num: int) -> jax.Array:
  """Keys of examples [first, first + num) of the global batch in one stream of `key`."""
  base = jax.random.fold_in(key, stream)
  return jax.vmap(lambda i: jax.random.fold_in(base, i))(first + jnp.arange(num))


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
    y = optax.smooth_labels(y, label_smoothing)
  return y


def softmax_cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """Per-example -sum(targets * log_softmax(logits)), computed in float32."""
  return optax.losses.softmax_cross_entropy(logits.astype(jnp.float32), targets)


def topk_correct(logits: jax.Array, labels: jax.Array, k: int) -> jax.Array:
  """float32 [B]: 1 where the label is among the k largest logits (k capped at #classes)."""
  k = min(k, logits.shape[-1])
  _, top = lax.top_k(logits, k)
  return jnp.any(top == labels[:, None], axis=-1).astype(jnp.float32)


def _all_finite(tree: PyTree) -> jax.Array:
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree) if is_float(x)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def _pmean_floats(tree: PyTree) -> PyTree:
  # Integer state (counters) is identical on every replica; averaging it would change dtype.
  return jax.tree.map(lambda x: lax.pmean(x, DATA_AXIS) if is_float(x) else x, tree)


def _check_batch(batch: Mapping[str, jax.Array]) -> None:
  for key in ('images', 'labels'):
    if key not in batch:
      raise ValueError(f"batch is missing '{key}': the iterator must yield images and labels.")
  if ('mix_labels' in batch) != ('mix_ratio' in batch):
    raise ValueError("batch must hold both 'mix_labels' and 'mix_ratio', or neither.")
  # Per device: NHWC images and one label (and mix weight) per image.
  chex.assert_rank(batch['images'], 4)
  per_example = [batch[k] for k in ('labels', 'mix_labels', 'mix_ratio') if k in batch]
  chex.assert_rank(per_example, 1)
  chex.assert_equal_shape_prefix([batch['images']] + per_example, 1)


def grad_accum_steps(train: TrainOptions, per_device_batch: int) -> int:
  """k: the configured accumulation, or the smallest one whose micro-batch fits the limit.

  Args:
    train: `config.train` (grad_accum_steps, or device_batch_limit).
    per_device_batch: examples per device per step.

  Raises:
    ValueError: when the device batch does not split into k equal micro-batches (before
      anything is compiled).
  """
  if train.device_batch_limit:
    for k in range(1, per_device_batch + 1):
      if per_device_batch % k == 0 and per_device_batch // k <= train.device_batch_limit:
        return k
  k = train.grad_accum_steps
  if per_device_batch % k:
    raise ValueError(f'The per-device batch {per_device_batch} does not split into '
                     f'train.grad_accum_steps={k} equal micro-batches; choose k dividing it '
                     f'(e.g. {max(d for d in range(1, k + 1) if per_device_batch % d == 0)}).')
  return k


def _micro(x: jax.Array, k: int) -> jax.Array:
  return x.reshape((k, x.shape[0] // k) + x.shape[1:])


def has_model_state(forward: hk.TransformedWithState, image_shape: tuple[int, ...]) -> bool:
  """Whether the model carries Haiku state (BatchNorm statistics): it then runs per device."""
  _, state = jax.eval_shape(lambda: forward.init(jax.random.PRNGKey(0),
                                                 jnp.zeros((1,) + tuple(image_shape)),
                                                 is_training=True))
  return bool(jax.tree.leaves(state))


def _make_loss(forward: hk.TransformedWithState, bfloat16: bool, per_example: bool):
  """value_and_grad of the mean loss; `keys` are per example ([B] keys) or one device key."""
  compute_dtype = jnp.bfloat16 if bfloat16 else jnp.float32

  def loss_fn(params, state, keys, images, targets):
    # Casting inside the differentiated function makes the cotangent of the cast a cast
    # back: gradients come out float32 (from bf16 backprop) before any reduction.
    params, model_state = cast_floats(params, compute_dtype), cast_floats(state, compute_dtype)
    images = images.astype(compute_dtype)
    if per_example:
      # One example at a time under vmap (the convolutions still run batched): each example
      # draws its masks from its own key, wherever it sits.
      def one(key, image):
        out, _ = forward.apply(params, model_state, key, image[None], is_training=True)
        return out['logits'][0]
      logits, new_state = jax.vmap(one)(keys, images), state
    else:
      outputs, new_state = forward.apply(params, model_state, keys, images, is_training=True)
      logits, new_state = outputs['logits'], cast_floats(new_state, jnp.float32)
    logits = logits.astype(jnp.float32)
    loss = jnp.mean(softmax_cross_entropy(logits, targets))
    return loss, (logits, new_state)

  return jax.value_and_grad(loss_fn, has_aux=True)


def _accumulate(grad_fn, params, state, keys, images, targets, labels, k):
  """Mean loss and gradients over k micro-batches, and the top-1/5 correct counts.

  `keys` is [B] per-example keys (split with the examples) or, per device, one key folded
  with the micro-batch index.
  """
  per_example = keys.ndim > 1
  if k == 1:
    (loss, (logits, state)), grads = grad_fn(params, state, keys, images, targets)
    return (loss, cast_floats(grads, jnp.float32), state,
            jnp.sum(topk_correct(logits, labels, 1)), jnp.sum(topk_correct(logits, labels, 5)))

  def body(carry, xs):
    grad_sum, state, loss_sum, top1, top5 = carry
    j, key, x, y, lab = xs
    key = key if per_example else jax.random.fold_in(keys, j)
    (loss, (logits, state)), grads = grad_fn(params, state, key, x, y)
    grad_sum = jax.tree.map(lambda a, g: a + g.astype(jnp.float32), grad_sum, grads)
    return (grad_sum, state, loss_sum + loss, top1 + jnp.sum(topk_correct(logits, lab, 1)),
            top5 + jnp.sum(topk_correct(logits, lab, 5))), None

  zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
  init = (zeros, state, jnp.zeros([], jnp.float32), jnp.zeros([]), jnp.zeros([]))
  micro_keys = _micro(keys, k) if per_example else jnp.zeros((k,), jnp.uint32)
  xs = (jnp.arange(k), micro_keys, _micro(images, k), _micro(targets, k), _micro(labels, k))
  (grad_sum, state, loss_sum, top1, top5), _ = lax.scan(body, init, xs)
  return loss_sum / k, jax.tree.map(lambda g: g / k, grad_sum), state, top1, top5


def _sam_params(grad_fn, params, state, keys, images, targets, rho, fraction, micro):
  """Parameters moved rho along the normalised ascent gradient of this device's first slice."""
  per_example = keys.ndim > 1
  n = max(1, int(round(images.shape[0] * fraction)))
  chunks = -(-n // micro)
  size = n // chunks
  x = images[:size * chunks].reshape((chunks, size) + images.shape[1:])
  y = targets[:size * chunks].reshape((chunks, size) + targets.shape[1:])
  chunk_keys = (keys[:size * chunks].reshape((chunks, size) + keys.shape[1:]) if per_example
                else jnp.zeros((chunks,), jnp.uint32))

  def chunk_grad(carry, xs):
    j, kj, xj, yj = xs
    _, g = grad_fn(params, state, kj if per_example else jax.random.fold_in(keys, j), xj, yj)
    return jax.tree.map(lambda a, b: a + b.astype(jnp.float32), carry, g), None

  zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
  ascent, _ = lax.scan(chunk_grad, zeros, (jnp.arange(chunks), chunk_keys, x, y))
  # Not pmean'd (paper A.4); the norm is global over parameters, so the chunk mean's scale
  # cancels in the normalisation.
  scale = rho / (optax.tree.norm(ascent) + 1e-12)
  return jax.tree.map(lambda p, g: p + (scale * g).astype(p.dtype), params, ascent)


class TrainStep:
  """The compiled train step (TrainState, global batch[, host flags]) -> (TrainState, metrics).

  Built by `make_train_step`. The state argument is donated. `flags` is a host-local int32
  array [local devices, len(HOST_FLAGS)] (made by `host_flags`); without it, no flag is set.

  Attributes:
    mesh: the device mesh the step runs on.
    jitted: the underlying `jax.jit` function (for `.lower(...)`).
  """

  def __init__(self, jitted: Callable, mesh: Mesh):
    self.jitted = jitted
    self.mesh = mesh
    self._program = distributed.CompiledTogether(jitted)
    self._no_flags = None

  def host_flags(self, **flags: bool) -> jax.Array:
    """This host's flags as the step's input (each local device carries the same row)."""
    row = np.array([int(bool(flags.get(name, False))) for name in HOST_FLAGS], np.int32)
    _, count = mesh_lib.local_share(self.mesh)
    local = np.tile(row, (self.mesh.devices.size // count, 1))
    return mesh_lib.global_batch({'flags': local}, self.mesh)['flags']

  def __call__(self, ts: TrainState, batch: Mapping[str, jax.Array],
               flags: Optional[jax.Array] = None):
    if flags is None:
      if self._no_flags is None:
        self._no_flags = self.host_flags()
      flags = self._no_flags
    return self._program(ts, batch, flags)

  def lower(self, ts: TrainState, batch: Mapping[str, Any]):
    flags = self._no_flags if self._no_flags is not None else self.host_flags()
    return self.jitted.lower(ts, batch, flags)


def make_train_step(forward: hk.TransformedWithState,
                    optimizer: optax.GradientTransformation,
                    schedule: Schedule,
                    train: TrainOptions,
                    num_classes: int,
                    *,
                    ema_decay: float,
                    augment: Optional[Augment] = None,
                    accum_steps: int = 1,
                    mesh: Optional[Mesh] = None,
                    per_example_keys: bool = True) -> TrainStep:
  """Builds the training step (TrainState, batch) -> (TrainState, metrics) over `mesh`.

  Args:
    forward: transformed model, apply(params, state, rng, images, is_training).
    optimizer: optax transformation (e.g. from optim.build_optimizer).
    schedule: update count -> learning rate, only reported as a metric.
    train: `config.train` (label_smoothing, bfloat16, sam_rho, sam_fraction).
    num_classes: number of classes of the one-hot targets.
    ema_decay: EMA decay ceiling (config.optimizer.ema_decay).
    augment: optional per-device batch transformation run first (nfnets.augment: MixUp,
      CutMix, RandAugment, normalisation), keyed by the step's augmentation key.
    accum_steps: k micro-batches per device (see `grad_accum_steps`).
    mesh: the device mesh; default every device of every host (`mesh.make_mesh()`).
    per_example_keys: draw the model's masks per example (see the module docstring); must be
      False for models with Haiku state (BatchNorm), which run per device batch.

  Returns:
    A `TrainStep`. Batch leaves are global arrays [global batch (x inputs per example), ...]
    sharded over DATA_AXIS. Metrics are float32 replicated scalars, means over all devices.
  """
  if num_classes < 1:
    raise ValueError(f'num_classes must be >= 1, got {num_classes}.')
  if not 0.0 <= ema_decay < 1.0:
    raise ValueError(f'ema_decay must be in [0, 1), got {ema_decay}.')
  if accum_steps < 1:
    raise ValueError(f'accum_steps must be >= 1, got {accum_steps}.')
  mesh = mesh if mesh is not None else mesh_lib.make_mesh()
  grad_fn = _make_loss(forward, train.bfloat16, per_example_keys)

  def train_step(ts: TrainState, batch: Mapping[str, jax.Array], flags: jax.Array):
    device = lax.axis_index(DATA_AXIS)
    key = step_key(ts.rng, ts.step)
    if augment is not None:
      batch = augment(batch, jax.random.fold_in(key, _AUGMENT_STREAM), device)
    _check_batch(batch)
    images, labels = batch['images'], batch['labels']
    num = images.shape[0]
    if train.debug_nan_step:
      # Debug knob (compiled in only when set): the last device's inputs of that 1-based step
      # become NaN (one host's data), to try the non-finite handling end to end.
      last = device == lax.psum(1, DATA_AXIS) - 1
      images = jnp.where((ts.step + 1 == train.debug_nan_step) & last, jnp.nan, images)
    if num % accum_steps:
      raise ValueError(f'Per-device batch {num} does not split into {accum_steps} '
                       'micro-batches.')
    targets = make_targets(labels, num_classes, train.label_smoothing, batch.get('mix_labels'),
                           batch.get('mix_ratio'))
    if per_example_keys:
      model_keys = example_keys(key, _MODEL_STREAM, device * num, num)
      sam_keys = example_keys(key, _SAM_STREAM, device * num, num)
    else:
      model_keys = jax.random.fold_in(key, device)
      sam_keys = jax.random.fold_in(jax.random.fold_in(key, _SAM_STREAM), device)
    params = ts.params
    if train.sam_rho > 0:
      params = _sam_params(grad_fn, params, ts.state, sam_keys, images, targets, train.sam_rho,
                           train.sam_fraction, num // accum_steps)
    loss, grads, new_state, top1, top5 = _accumulate(grad_fn, params, ts.state, model_keys,
                                                     images, targets, labels, accum_steps)
    grads = lax.pmean(grads, DATA_AXIS)
    loss = lax.pmean(loss, DATA_AXIS)
    new_state = _pmean_floats(new_state)
    count = applied_updates(ts.opt_state, default=ts.step)
    updates, opt_state = optimizer.update(grads, ts.opt_state, ts.params)
    new_params = optax.apply_updates(ts.params, updates)
    ema_params = optim.ema_update(ts.ema_params, new_params, count, ema_decay)
    ema_state = optim.ema_update(ts.ema_state, new_state, count, ema_decay)
    finite = jnp.isfinite(loss) & _all_finite(grads)
    if train.skip_nonfinite or train.debug_nan_step:
      # A non-finite step changes nothing but the data position. (Also with the debug knob,
      # so trying the stop and the skip behaviour compiles one program, not two: whether to
      # stop is the loop's decision.) A cond, not a where per leaf: the same semantics, and
      # it compiles in about half the time on XLA:CPU.
      new_params, opt_state, new_state, ema_params, ema_state = lax.cond(
          finite, lambda new, old: new, lambda new, old: old,
          (new_params, opt_state, new_state, ema_params, ema_state),
          (ts.params, ts.opt_state, ts.state, ts.ema_params, ts.ema_state))
    metrics = {
        'loss': loss,
        'top_1_acc': top1 / num,
        'top_5_acc': top5 / num,
        'learning_rate': jnp.asarray(schedule(count)),
        'grad_norm': optax.tree.norm(grads),
        'param_norm': optax.tree.norm(new_params),
        'update_norm': optax.tree.norm(updates),
        'finite': finite,
        # Not masked by `skip_nonfinite`: a non-finite step is counted only when the loop goes
        # on past it, which is when skipping. So the option stays out of the program, and the
        # stop and skip behaviours of the debug knob share one compiled step.
        'skipped': jnp.logical_not(finite),
        **agc.agc_metrics(opt_state),
    }
    metrics = lax.pmean(jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), metrics), DATA_AXIS)
    # The hosts' flags: any host's flag is every host's decision after this step.
    decided = lax.pmax(jnp.max(flags, axis=0), DATA_AXIS)
    metrics.update({name: decided[i].astype(jnp.float32) for i, name in enumerate(HOST_FLAGS)})
    new_ts = TrainState(step=ts.step + 1, params=new_params, state=new_state,
                        opt_state=opt_state, ema_params=ema_params, ema_state=ema_state,
                        rng=ts.rng)
    return new_ts, metrics

  # check_vma=False: the replicated outputs are replicated by construction (everything that
  # leaves the body went through pmean/pmax or depends only on replicated inputs).
  body = jax.shard_map(train_step, mesh=mesh, in_specs=(P(), P(DATA_AXIS), P(DATA_AXIS)),
                       out_specs=(P(), P()), check_vma=False)
  return TrainStep(jax.jit(body, donate_argnums=(0,)), mesh)


def make_eval_step(forward: hk.TransformedWithState, num_classes: int, *,
                   mesh: Optional[Mesh] = None) -> Callable:
  """Builds the eval step (params, state, global batch) -> summed counts.

  Args:
    forward: transformed model, run with is_training=False in float32.
    num_classes: number of classes.
    mesh: the device mesh; default every device of every host.

  Returns:
    A function (compiled on its first call) returning replicated float32 {'top_1_correct',
    'top_5_correct', 'loss_sum' (cross-entropy without label smoothing), 'count'}, summed over
    the global batch; examples with batch['mask'] == 0 (padding) are excluded. Divide by
    'count'.
  """
  if num_classes < 1:
    raise ValueError(f'num_classes must be >= 1, got {num_classes}.')
  mesh = mesh if mesh is not None else mesh_lib.make_mesh()

  def eval_step(params, state, batch):
    _check_batch(batch)
    labels = batch['labels']
    mask = jnp.asarray(batch.get('mask', jnp.ones(labels.shape)), jnp.float32)
    # Fixed key: eval is deterministic (is_training=False disables dropout/stochdepth).
    outputs, _ = forward.apply(cast_floats(params, jnp.float32), cast_floats(state, jnp.float32),
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
    return lax.psum(sums, DATA_AXIS)

  body = jax.shard_map(eval_step, mesh=mesh, in_specs=(P(), P(), P(DATA_AXIS)), out_specs=P(),
                       check_vma=False)
  return distributed.CompiledTogether(jax.jit(body))
