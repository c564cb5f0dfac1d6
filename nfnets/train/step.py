"""The pmapped train and eval steps: loss, bf16 compute, gradient accumulation, SAM, EMA.

Everything here is a pure function of (TrainState, batch). The per-step randomness is derived
from the step counter rather than carried as a split chain: the key of step t on device d is
fold_in(fold_in(rng, t), d), so a run resumed from a checkpoint at step t draws exactly the
augmentation, dropout and stochastic-depth masks it would have drawn, and every device draws
its own. Data parallelism uses `jax.pmap` over the axis 'batch'; gradients are averaged over
it, so one update equals a single-device step on the global batch (for models without
cross-example statistics).

Gradient accumulation (`grad_accum_steps` = k): each device splits its batch into k contiguous
micro-batches and `lax.scan`s over them inside the one compiled step, summing gradients; the
mean is what AGC, weight decay, SGD, the schedule and the EMA see, so k changes memory, not
the update (to float32 round-off). Micro-batch j draws its dropout / stochastic-depth masks
from fold_in(key, j), so no two micro-batches share masks; targets (label smoothing,
MixUp/CutMix) are built per example before the split. BatchNorm statistics (the ResNet
baseline) are those of each micro-batch, applied in order.

SAM (`sam_rho` > 0, paper A.4): the ascent gradient is taken on the first
round(sam_fraction * device batch) examples of each device, not averaged across devices (each
replica probes its own neighbourhood); the descent gradient of the whole batch is then taken at
the perturbed parameters. Under accumulation the ascent examples are processed in chunks of at
most one micro-batch (rounded down to equal chunks), so the ascent is the same as with k = 1
whenever it fits in one micro-batch.

Non-finite steps: 'finite' in the metrics says whether a step's loss and gradients were
finite. With `skip_nonfinite`, a non-finite step keeps every parameter, optimizer, model and EMA
value and only moves the data position on ('skipped'); otherwise the loop stops the run at its
next check, before any checkpoint could hold the damage.
"""

from collections.abc import Callable, Mapping
from typing import Any, Optional, Sequence

import chex
import haiku as hk
import jax
import jax.numpy as jnp
import optax
from jax import lax

from nfnets.train import agc
from nfnets.train import optim
from nfnets.train.options import TrainOptions
from nfnets.train.state import (AXIS_NAME, TrainState, applied_updates, cast_floats, is_float)

PyTree = Any
Schedule = Callable[[jax.Array], jax.Array]
# A per-device batch transformation run at the start of the step (see nfnets.augment).
Augment = Callable[[Mapping[str, jax.Array], jax.Array], dict]
# fold_in tags of the per-step key: independent streams for augmentation and the SAM ascent.
_AUGMENT_STREAM, _SAM_STREAM = 0x41554720, 0x53414D20


def device_key(rng: jax.Array, step: jax.Array) -> jax.Array:
  """The key of `step` on this device, fold_in(fold_in(rng, step), device); inside the pmap."""
  return jax.random.fold_in(jax.random.fold_in(rng, step), lax.axis_index(AXIS_NAME))


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
  return jax.tree.map(lambda x: lax.pmean(x, AXIS_NAME) if is_float(x) else x, tree)


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


def _make_loss(forward: hk.TransformedWithState, bfloat16: bool):
  compute_dtype = jnp.bfloat16 if bfloat16 else jnp.float32

  def loss_fn(params, state, rng, images, targets):
    # Casting inside the differentiated function makes the cotangent of the cast a cast
    # back: gradients come out float32 (from bf16 backprop) before any reduction.
    outputs, new_state = forward.apply(
        cast_floats(params, compute_dtype), cast_floats(state, compute_dtype), rng,
        images.astype(compute_dtype), is_training=True)
    logits = outputs['logits'].astype(jnp.float32)
    loss = jnp.mean(softmax_cross_entropy(logits, targets))
    return loss, (logits, cast_floats(new_state, jnp.float32))

  return jax.value_and_grad(loss_fn, has_aux=True)


def _accumulate(grad_fn, params, state, rng, images, targets, labels, k):
  """Mean loss and gradients over k micro-batches, and the top-1/5 correct counts."""
  if k == 1:
    (loss, (logits, state)), grads = grad_fn(params, state, rng, images, targets)
    return (loss, cast_floats(grads, jnp.float32), state,
            jnp.sum(topk_correct(logits, labels, 1)), jnp.sum(topk_correct(logits, labels, 5)))

  def body(carry, xs):
    grad_sum, state, loss_sum, top1, top5 = carry
    j, x, y, lab = xs
    (loss, (logits, state)), grads = grad_fn(params, state, jax.random.fold_in(rng, j), x, y)
    grad_sum = jax.tree.map(lambda a, g: a + g.astype(jnp.float32), grad_sum, grads)
    return (grad_sum, state, loss_sum + loss, top1 + jnp.sum(topk_correct(logits, lab, 1)),
            top5 + jnp.sum(topk_correct(logits, lab, 5))), None

  zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
  init = (zeros, state, jnp.zeros([], jnp.float32), jnp.zeros([]), jnp.zeros([]))
  xs = (jnp.arange(k), _micro(images, k), _micro(targets, k), _micro(labels, k))
  (grad_sum, state, loss_sum, top1, top5), _ = lax.scan(body, init, xs)
  return loss_sum / k, jax.tree.map(lambda g: g / k, grad_sum), state, top1, top5


def _sam_params(grad_fn, params, state, rng, images, targets, rho, fraction, micro):
  """Parameters moved rho along the normalised ascent gradient of this device's first slice."""
  n = max(1, int(round(images.shape[0] * fraction)))
  chunks = -(-n // micro)
  size = n // chunks
  x = images[:size * chunks].reshape((chunks, size) + images.shape[1:])
  y = targets[:size * chunks].reshape((chunks, size) + targets.shape[1:])

  def chunk_grad(carry, xs):
    j, xj, yj = xs
    _, g = grad_fn(params, state, jax.random.fold_in(rng, j), xj, yj)
    return jax.tree.map(lambda a, b: a + b.astype(jnp.float32), carry, g), None

  zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
  ascent, _ = lax.scan(chunk_grad, zeros, (jnp.arange(chunks), x, y))
  # Not pmean'd (paper A.4); the norm is global over parameters, so the chunk mean's scale
  # cancels in the normalisation.
  scale = rho / (optax.tree.norm(ascent) + 1e-12)
  return jax.tree.map(lambda p, g: p + (scale * g).astype(p.dtype), params, ascent)


def make_train_step(forward: hk.TransformedWithState,
                    optimizer: optax.GradientTransformation,
                    schedule: Schedule,
                    train: TrainOptions,
                    num_classes: int,
                    *,
                    ema_decay: float,
                    augment: Optional[Augment] = None,
                    accum_steps: int = 1,
                    devices: Optional[Sequence[jax.Device]] = None) -> Callable:
  """Builds the pmapped training step (TrainState, batch) -> (TrainState, metrics).

  Args:
    forward: transformed model, apply(params, state, rng, images, is_training).
    optimizer: optax transformation (e.g. from optim.build_optimizer).
    schedule: update count -> learning rate, only reported as a metric.
    train: `config.train` (label_smoothing, bfloat16, sam_rho, sam_fraction).
    num_classes: number of classes of the one-hot targets.
    ema_decay: EMA decay ceiling (config.optimizer.ema_decay).
    augment: optional per-device batch transformation run first (nfnets.augment: MixUp,
      CutMix, RandAugment, normalisation), keyed by the step's key.
    accum_steps: k micro-batches per device (see `grad_accum_steps`).
    devices: pmap devices; default all local devices.

  Returns:
    A pmapped function; the TrainState argument is donated. Batch leaves are
    [devices, per_device_batch, ...]. Metrics are float32, averaged over devices.
  """
  if num_classes < 1:
    raise ValueError(f'num_classes must be >= 1, got {num_classes}.')
  if not 0.0 <= ema_decay < 1.0:
    raise ValueError(f'ema_decay must be in [0, 1), got {ema_decay}.')
  if accum_steps < 1:
    raise ValueError(f'accum_steps must be >= 1, got {accum_steps}.')
  grad_fn = _make_loss(forward, train.bfloat16)

  def train_step(ts: TrainState, batch: Mapping[str, jax.Array]):
    key = device_key(ts.rng, ts.step)
    if augment is not None:
      batch = augment(batch, jax.random.fold_in(key, _AUGMENT_STREAM))
    _check_batch(batch)
    images, labels = batch['images'], batch['labels']
    if train.debug_nan_step:
      # Debug knob (compiled in only when set): the inputs of that 1-based step become NaN,
      # to try the non-finite handling end to end.
      images = jnp.where(ts.step + 1 == train.debug_nan_step, jnp.nan, images)
    if images.shape[0] % accum_steps:
      raise ValueError(f'Per-device batch {images.shape[0]} does not split into '
                       f'{accum_steps} micro-batches.')
    targets = make_targets(labels, num_classes, train.label_smoothing, batch.get('mix_labels'),
                           batch.get('mix_ratio'))
    params = ts.params
    if train.sam_rho > 0:
      params = _sam_params(grad_fn, params, ts.state, jax.random.fold_in(key, _SAM_STREAM),
                           images, targets, train.sam_rho, train.sam_fraction,
                           images.shape[0] // accum_steps)
    loss, grads, new_state, top1, top5 = _accumulate(grad_fn, params, ts.state, key, images,
                                                     targets, labels, accum_steps)
    grads = lax.pmean(grads, AXIS_NAME)
    loss = lax.pmean(loss, AXIS_NAME)
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
    num = images.shape[0]
    metrics = {
        'loss': loss,
        'top_1_acc': top1 / num,
        'top_5_acc': top5 / num,
        'learning_rate': jnp.asarray(schedule(count)),
        'grad_norm': optax.tree.norm(grads),
        'param_norm': optax.tree.norm(new_params),
        'update_norm': optax.tree.norm(updates),
        'finite': finite,
        'skipped': jnp.logical_not(finite) & train.skip_nonfinite,
        **agc.agc_metrics(opt_state),
    }
    metrics = lax.pmean(jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), metrics), AXIS_NAME)
    new_ts = TrainState(step=ts.step + 1, params=new_params, state=new_state,
                        opt_state=opt_state, ema_params=ema_params, ema_state=ema_state,
                        rng=ts.rng)
    return new_ts, metrics

  return jax.pmap(train_step, axis_name=AXIS_NAME, donate_argnums=(0,), devices=devices)


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
    return lax.psum(sums, AXIS_NAME)

  return jax.pmap(eval_step, axis_name=AXIS_NAME, devices=devices)
