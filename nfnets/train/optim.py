"""The paper's optimizer, learning-rate schedule and EMA, assembled from optax pieces.

The NFNet recipe (Brock et al. 2021, arXiv 2102.06171; official `experiment_nfnets.py`):

* AGC with lambda=0.01, eps=1e-3 on every parameter except the classifier weight;
* coupled weight decay 2e-5 (added to the gradient, after clipping) on conv and linear
  weights only, never on gains, biases or skip gains;
* SGD with Nesterov momentum 0.9 (dampening 0, as optax's `trace`);
* lr 0.1 per 256 examples (1.6 at batch 4096), linear warm-up from 0 over 5 epochs, then
  cosine decay to 0 at the last step;
* an EMA of the weights with decay 0.99999 and the TF1-style warm-up of the decay.

`build_optimizer(OptimizerOptions(), ...)` is that chain (the defaults are the paper's):
    masked AGC -> masked add_decayed_weights -> sgd(schedule, momentum, nesterov).
"""

from typing import Any, Callable, Optional, Union

import jax
import jax.numpy as jnp
import optax

from nfnets.train import agc as agc_lib
from nfnets.train.options import OptimizerOptions

Schedule = Callable[[Union[int, jax.Array]], jax.Array]

# The reference batch size of the linear scaling rule "lr 0.1 per 256 examples".
LR_REFERENCE_BATCH = 256


def weight_decay_mask(params: Any) -> Any:
  """True for leaves named 'w' (conv and linear kernels), False for gains/biases/skip gains.

  Membership is by parameter name, not rank: WS `gain`/`bias`, `hk.Linear` `b`,
  `skip_gain` and BatchNorm `scale`/`offset` are all excluded, as in the paper.

  Args:
    params: a Haiku-style parameter tree (or an update tree of the same structure).

  Returns:
    A tree of Python bools with the structure of `params`.
  """
  def is_weight(path: Any, _: Any) -> bool:
    return agc_lib.path_to_str(path).rsplit("/", 1)[-1] == "w"
  return jax.tree_util.tree_map_with_path(is_weight, params)


def peak_learning_rate(opt_config: OptimizerOptions, batch_size: int) -> float:
  """The learning rate at the end of warm-up, after the linear batch-size scaling rule."""
  if opt_config.lr_scale_by_batch:
    return opt_config.lr * batch_size / LR_REFERENCE_BATCH
  return opt_config.lr


def make_schedule(opt_config: OptimizerOptions, *, batch_size: int,
                  steps_per_epoch: float, total_steps: int) -> Schedule:
  """Linear warm-up from 0, then cosine decay to `end_lr` at `total_steps`.

  The official warm-up length is `warmup_epochs * steps_per_epoch`, a float (1563.9 for
  ImageNet at batch 4096); optax needs an integer, so it is rounded to the nearest step
  (1564). The largest learning-rate difference this causes is ~peak/warmup_steps near the
  end of warm-up (< 0.1% of the peak for the paper's setting).

  Args:
    opt_config: the `config.optimizer` section.
    batch_size: global batch size.
    steps_per_epoch: training steps per epoch (may be fractional).
    total_steps: length of the whole schedule.

  Returns:
    A schedule `step -> learning rate`.
  """
  peak = peak_learning_rate(opt_config, batch_size)
  warmup_steps = int(round(opt_config.warmup_epochs * steps_per_epoch))
  if warmup_steps >= total_steps:
    raise ValueError(f"Warm-up ({warmup_steps} steps) must be shorter than total_steps="
                     f"{total_steps}; lower optimizer.warmup_epochs or train longer.")
  # optax's decay_steps counts the warm-up too, which matches the official schedule's
  # cosine over (total_steps - warmup_steps).
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=peak, warmup_steps=warmup_steps,
      decay_steps=total_steps, end_value=opt_config.end_lr)


def _agc(opt_config: OptimizerOptions) -> optax.GradientTransformation:
  exclude = opt_config.agc.exclude
  return agc_lib.adaptive_grad_clip(
      opt_config.agc.clipping, opt_config.agc.eps, exclude=tuple(exclude) if exclude else None)


def _coupled_decay(opt_config: OptimizerOptions) -> list:
  # Coupled decay: g += wd * w before momentum, as the official SGD (so it is lr-scaled
  # and clipped-after: AGC sees the raw gradient only).
  if opt_config.weight_decay == 0:
    return []
  return [optax.masked(optax.add_decayed_weights(opt_config.weight_decay), weight_decay_mask)]


def _sgd(opt_config: OptimizerOptions, schedule: Schedule,
         use_agc: bool) -> optax.GradientTransformation:
  return optax.chain(
      *([_agc(opt_config)] if use_agc else []),
      *_coupled_decay(opt_config),
      optax.sgd(schedule, momentum=opt_config.momentum, nesterov=opt_config.nesterov))


def _sgd_agc(opt_config, schedule):
  return _sgd(opt_config, schedule, use_agc=True)


def _sgd_plain(opt_config, schedule):
  return _sgd(opt_config, schedule, use_agc=False)


def _adam(opt_config, schedule):
  return optax.chain(
      *([_agc(opt_config)] if opt_config.agc.with_adam else []),
      *_coupled_decay(opt_config),
      optax.adam(schedule, b1=opt_config.b1, b2=opt_config.b2, eps=opt_config.adam_eps))


def _adamw(opt_config, schedule):
  # Decoupled decay (w -= lr * wd * w); typical AdamW values (~0.05) are far above the
  # paper's SGD value, so set optimizer.weight_decay accordingly.
  return optax.chain(
      *([_agc(opt_config)] if opt_config.agc.with_adam else []),
      optax.adamw(schedule, b1=opt_config.b1, b2=opt_config.b2, eps=opt_config.adam_eps,
                  weight_decay=opt_config.weight_decay, mask=weight_decay_mask))


OPTIMIZERS: dict = {
    "sgd_agc": _sgd_agc,
    "sgd": _sgd_plain,
    "adam": _adam,
    "adamw": _adamw,
}


def build_optimizer(opt_config: Optional[OptimizerOptions] = None, *, batch_size: int,
                    steps_per_epoch: float,
                    total_steps: int) -> tuple[optax.GradientTransformation, Schedule]:
  """Builds the optimizer named by `opt_config.name` and its learning-rate schedule.

  Args:
    opt_config: the `config.optimizer` options; None is the paper's recipe.
    batch_size: global batch size (for the linear lr scaling rule).
    steps_per_epoch: training steps per epoch, may be fractional (1281167 / 4096).
    total_steps: number of training steps; the cosine reaches `end_lr` there.

  Returns:
    (transformation, schedule). The transformation's update needs `params`; log the
    learning rate of step t as `schedule(t)`, and AGC statistics with `agc.agc_metrics`.
  """
  opt_config = opt_config or OptimizerOptions()
  if batch_size <= 0 or steps_per_epoch <= 0 or total_steps <= 0:
    raise ValueError(f"batch_size, steps_per_epoch and total_steps must be > 0 (got "
                     f"{batch_size}, {steps_per_epoch}, {total_steps}).")
  schedule = make_schedule(opt_config, batch_size=batch_size,
                           steps_per_epoch=steps_per_epoch, total_steps=total_steps)
  return OPTIMIZERS[opt_config.name](opt_config, schedule), schedule


def ema_decay_at(step: Union[int, jax.Array], decay: float) -> jax.Array:
  """TF1-style EMA decay warm-up: min(decay, (1 + t) / (10 + t)).

  Early on the average forgets the random init quickly (0.1 at t=0, 0.5 at t=8); the
  ceiling `decay` takes over only after (10 * decay - 1) / (1 - decay) steps (~1M for
  0.99999), so in the paper's 112,602-step run the warm-up formula is in force throughout.
  """
  step = jnp.asarray(step, jnp.float32)
  return jnp.minimum(jnp.float32(decay), (1.0 + step) / (10.0 + step))


def ema_update(ema_tree: Any, new_tree: Any, step: Union[int, jax.Array],
               decay: float) -> Any:
  """One EMA step, ema <- ema * d_t + new * (1 - d_t), in float32.

  Args:
    ema_tree: the running average (float32 leaves, or the initial copy of the params).
    new_tree: the current values, same structure (may be bf16: computed in float32).
    step: the training step t used in the decay warm-up (0 for the first update).
    decay: the ceiling decay, e.g. 0.99999.

  Returns:
    The new average, float32 for floating leaves. Non-floating leaves (e.g. integer
    counters in a model state) are not averaged: they take the new value.
  """
  if isinstance(decay, (int, float)) and not 0.0 <= decay < 1.0:
    raise ValueError(f"EMA decay must be in [0, 1) (got {decay}); the paper uses 0.99999.")
  d = ema_decay_at(step, decay)

  def update(ema: jax.Array, new: jax.Array) -> jax.Array:
    if not jnp.issubdtype(jnp.result_type(new), jnp.floating):
      return new
    ema32, new32 = jnp.asarray(ema, jnp.float32), jnp.asarray(new, jnp.float32)
    return ema32 * d + new32 * (1.0 - d)

  return jax.tree.map(update, ema_tree, new_tree)
