"""The experiment: options -> data -> model -> step -> loop -> evaluation, checkpoints, reports.

`run(options, workdir, mode)` is what `python experiment.py` calls. Everything a user can get
wrong (the options, the data, the weights, a workdir of another model or in use by another
run) is checked before the first compilation, so such mistakes fail in seconds with one line.

The step loop never waits for the device without need: metrics stay on the device and are
summed there (`MetricSums`); the host fetches them only every `train.log_every_steps` steps
(as interval means) and before a checkpoint, and the next batch is sent to the devices while
the current step runs (`prefetch_to_device`).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import itertools
import os
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from nfnets.data import datasets
from nfnets.data.options import DatasetInfo
from nfnets.models import registry
from nfnets.train import checkpoints
from nfnets.train import distributed
from nfnets.train import evaluation
from nfnets.train import optim
from nfnets.train import reporting
from nfnets.train import signals
from nfnets.train import state as state_lib
from nfnets.train import step as step_lib
from nfnets.train import workdir as workdir_lib
from nfnets.train.options import ExperimentOptions

MODES = ("train", "eval", "train_and_eval", "plan")
# Ordered upstream first: the first non-finite of these names what went wrong.
_DIAGNOSTICS = ("loss", "grad_norm", "update_norm", "param_norm")


class NonFiniteError(RuntimeError):
  """Training produced NaN/Inf; the last good checkpoint was left intact."""


@dataclasses.dataclass(frozen=True)
class Setup:
  """What `run` derives from the options before building anything.

  Attributes:
    data: sizes and classes of the data set.
    total_steps: steps of the whole run.
    steps_per_epoch: training steps per epoch (fractional).
    per_device_batch: training examples per device per step.
    accum_steps: micro-batches per device per step (gradient accumulation).
  """
  data: DatasetInfo
  total_steps: int
  steps_per_epoch: float
  per_device_batch: int
  accum_steps: int


def validate(options: ExperimentOptions, mode: str, device_count: int) -> None:
  """Fails fast with a one-line ValueError on settings that would fail much later."""
  if mode not in MODES:
    raise ValueError(f"Unknown --mode={mode!r}; use one of {list(MODES)}.")
  registry.resolve_kwargs(options.model.name, options.model.kwargs)  # Names, variant fields.
  if options.optimizer.name not in optim.OPTIMIZERS:
    raise ValueError(f"Unknown optimizer.name {options.optimizer.name!r}; "
                     f"use one of {sorted(optim.OPTIMIZERS)}.")
  if mode == "plan":
    return
  for key in ("train", "eval"):
    bs = getattr(options, key).batch_size
    if bs % device_count:
      raise ValueError(f"{key}.batch_size={bs} must be a positive multiple of the device count "
                       f"({device_count}); e.g. --config.{key}.batch_size={device_count * 8}.")
  if options.data.name == "folder" and not os.path.isdir(options.data.folder):
    raise ValueError(f"data.folder={options.data.folder!r} is not a directory; point "
                     "--config.data.folder at a folder of class sub-folders.")
  for path in (options.init.official_weights, options.init.params_path):
    if path and not os.path.isfile(path):
      raise ValueError(f"Initial weights file {path!r} does not exist.")


def derive_setup(options: ExperimentOptions, data: DatasetInfo, device_count: int) -> Setup:
  """Steps, per-device batch and accumulation of a run (no compilation)."""
  batch_size = options.train.batch_size
  # As the official code: floor(examples * epochs / batch), e.g. 112602 for F0.
  total_steps = options.train.num_steps or int(data.num_train * options.train.num_epochs //
                                               batch_size)
  if total_steps < 1:
    raise ValueError(f"train.num_epochs={options.train.num_epochs} gives 0 steps at batch "
                     f"{batch_size}; raise it or set train.num_steps.")
  per_device = batch_size // device_count
  return Setup(data=data, total_steps=total_steps, steps_per_epoch=data.num_train / batch_size,
               per_device_batch=per_device,
               accum_steps=step_lib.grad_accum_steps(options.train, per_device))


def make_forward(options: ExperimentOptions, num_classes: int):
  return registry.make_forward(options.model.name, num_classes, remat=options.model.remat,
                               **options.model.kwargs)


def make_augment(options: ExperimentOptions):
  """The device-side augmentation of the training batches (uint8 in, normalised out)."""
  from nfnets.augment import batch as augment_batch  # pylint: disable=g-import-not-at-top
  return augment_batch.make_augment(options.data)


# ------------------------------------------------------------------------- device plumbing
def prefetch_to_device(batches: Iterable[Mapping[str, np.ndarray]], size: int = 2
                       ) -> Iterator[Any]:
  """Sends each batch to the devices `size` steps before it is needed (asynchronously)."""
  queue: collections.deque = collections.deque()
  for batch in batches:
    queue.append(state_lib.shard(batch))
    if len(queue) > size:
      yield queue.popleft()
  while queue:
    yield queue.popleft()


class MetricSums:
  """Train metrics summed on the device between log steps, and the first non-finite step.

  `add` is one small jitted program per step (dispatched asynchronously, no host sync);
  `fetch` copies the sums to the host and starts a new interval.
  """

  def __init__(self):
    self._acc: Optional[dict[str, jax.Array]] = None
    self._add = jax.jit(self._add_impl, donate_argnums=(0,))

  @staticmethod
  def _add_impl(acc, metrics, step):
    bad = metrics["finite"] < 1.0
    first = acc["first_bad_step"] < 0
    take = bad & first
    out = {k: acc[k] + metrics[k] for k in metrics}
    out["count"] = acc["count"] + 1.0
    out["first_bad_step"] = jnp.where(take, step, acc["first_bad_step"])
    for k in _DIAGNOSTICS:
      out[f"first_bad_{k}"] = jnp.where(take, metrics[k], acc[f"first_bad_{k}"])
    return out

  def _zeros(self, metrics: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
    acc = {k: jnp.zeros_like(v) for k, v in metrics.items()}
    acc["count"] = jnp.zeros_like(metrics["loss"])
    acc["first_bad_step"] = jnp.full_like(metrics["loss"], -1.0)
    acc.update({f"first_bad_{k}": jnp.zeros_like(metrics[k]) for k in _DIAGNOSTICS})
    return acc

  def add(self, metrics: Mapping[str, jax.Array], step: int) -> None:
    if self._acc is None:
      self._acc = self._zeros(metrics)
    self._acc = self._add(self._acc, dict(metrics), jnp.float32(step))

  def fetch(self) -> Optional[dict[str, float]]:
    """Interval means (plus 'count', 'first_bad_*'), or None when nothing was added."""
    if self._acc is None:
      return None
    host = {k: float(v) for k, v in state_lib.unreplicate(self._acc).items()}
    self._acc = None
    count = max(host.pop("count"), 1.0)
    special = {k: host.pop(k) for k in list(host) if k.startswith("first_bad_")}
    means = {k: v / count for k, v in host.items()}
    means["steps_in_interval"] = count
    means.update(special)
    return means


def nonfinite_error(sums: Mapping[str, float], ckpt: checkpoints.Checkpointer) -> NonFiniteError:
  """The error naming the first non-finite step and quantity and the last good checkpoint."""
  ckpt.wait()  # A write of the last good step may still be in flight: name it once landed.
  step = int(sums["first_bad_step"])
  what = next((k for k in _DIAGNOSTICS if not np.isfinite(sums[f"first_bad_{k}"])), "gradient")
  steps = ckpt.all_steps()
  kept = f"last good checkpoint: step {steps[-1]}" if steps else "no checkpoint was written"
  return NonFiniteError(
      f"Non-finite {what} at step {step}; {kept}. Lower "
      "optimizer.lr or agc.clipping, or set train.skip_nonfinite=True.")


class Profiler:
  """A jax.profiler trace of steps [start, start + num) on host 0, under <workdir>/profile."""

  def __init__(self, start_step: int, num_steps: int, logdir: str, enabled: bool):
    self.start, self.stop = start_step, start_step + max(num_steps, 1)
    self.logdir = logdir
    self.enabled = enabled and start_step > 0
    self.active = False

  def before_step(self, step: int) -> None:
    """`step` is the 1-based step about to run."""
    if self.enabled and not self.active and step == self.start:
      jax.profiler.start_trace(self.logdir)
      self.active = True

  def after_step(self, step: int, block_on: Any) -> None:
    if self.active and step + 1 >= self.stop:
      jax.block_until_ready(block_on)
      jax.profiler.stop_trace()
      self.active = False


# ------------------------------------------------------------------------------- the loop
@dataclasses.dataclass
class LoopContext:
  """What the step loop uses besides the state (built once by `run`)."""
  options: ExperimentOptions
  train_step: Callable
  ckpt: checkpoints.Checkpointer
  reporter: reporting.Reporter
  run_eval: Optional[Callable[[Any, int, int], dict]]
  workdir: str
  skipped_steps: int = 0


def _save(ctx: LoopContext, sums: MetricSums, rts: Any, step: int, force: bool,
          pending: list) -> None:
  """Checkpoints when due (or forced), after making sure no non-finite step slipped in."""
  if not ctx.ckpt.is_writer or not (force or ctx.ckpt.should_save(step)):
    return
  _drain(ctx, sums, pending, step, log=False)
  ctx.ckpt.save(step, state_lib.unreplicate(rts))


def _drain(ctx: LoopContext, sums: MetricSums, pending: list, step: int, log: bool) -> None:
  """Fetches the interval's metrics; raises if a step was non-finite (unless skipping)."""
  interval = sums.fetch()
  if interval is None:
    return
  if interval["first_bad_step"] >= 0:
    if not ctx.options.train.skip_nonfinite:
      raise nonfinite_error(interval, ctx.ckpt)
  ctx.skipped_steps += int(round(interval["skipped"] * interval["steps_in_interval"]))
  pending.append(interval)
  if log:
    merged = _merge_intervals(pending)
    pending.clear()
    merged["skipped_steps"] = float(ctx.skipped_steps)
    ctx.reporter.log_train(step, merged)


def _merge_intervals(intervals: list[dict[str, float]]) -> dict[str, float]:
  """Weighted means of several fetched intervals (a save split a log interval)."""
  total = sum(i["steps_in_interval"] for i in intervals)
  keys = [k for k in intervals[-1] if not k.startswith("first_bad_") and k != "steps_in_interval"]
  merged = {k: sum(i[k] * i["steps_in_interval"] for i in intervals) / total for k in keys}
  merged["steps_in_interval"] = total
  return merged


# After each step: (step just completed, state, that step's metrics on the device) -> go on?
AfterStep = Callable[[int, Any, Mapping[str, jax.Array]], bool]


def run_steps(train_step: Callable, rts: Any, batches: Iterable[Mapping[str, np.ndarray]],
              step: int, total_steps: int, after_step: AfterStep) -> tuple[Any, int, bool]:
  """The one step loop: batches to the devices one ahead, steps, a hook after each.

  Both `train_loop` (checkpoints, reports, evaluation, signals) and the reproduce/ studies
  (materialised batches, divergence stops) drive their steps through it.

  Args:
    train_step: the pmapped step (state, device batch) -> (state, metrics).
    rts: the replicated TrainState.
    batches: host batches from `step` on.
    step: steps done so far.
    total_steps: stop after this step.
    after_step: called after every step; returning False stops the loop.

  Returns:
    (state, steps done, whether `after_step` stopped the loop).
  """
  device_batches = prefetch_to_device(batches)
  while step < total_steps:
    rts, metrics = train_step(rts, next(device_batches))
    step += 1
    if not after_step(step, rts, metrics):
      return rts, step, True
  return rts, step, False


def train_loop(ctx: LoopContext, rts: Any, step: int, total_steps: int,
               batches: Iterator[Mapping[str, np.ndarray]]) -> tuple[bool, Any, int]:
  """The training run from `step` to `total_steps`; returns (stopped by a signal, state, step)."""
  options = ctx.options
  log_every = max(1, options.train.log_every_steps)
  sums = MetricSums()
  pending: list = []
  first_step = step
  profiler = Profiler(options.profile.start_step, options.profile.num_steps,
                      os.path.join(ctx.workdir, "profile"), ctx.ckpt.is_writer)
  profiler.before_step(step + 1)
  t0 = time.monotonic()

  def after_step(done: int, rts: Any, metrics: Mapping[str, jax.Array]) -> bool:
    profiler.after_step(done, rts.step)
    sums.add(metrics, done)
    if done == first_step + 1:
      jax.block_until_ready(rts.step)
      ctx.reporter.compile_done(done, time.monotonic() - t0)
    if done % log_every == 0 or done == total_steps:
      _drain(ctx, sums, pending, done, log=True)
    else:
      ctx.reporter.tick(done)
    if signals.STOP:
      _save(ctx, sums, rts, done, force=True, pending=pending)
      ctx.ckpt.wait()
      ctx.reporter.print(f"Stopped by {signals.STOP.name} at step {done}; checkpoint saved, "
                         "exiting.")
      return False
    if done < total_steps:
      _save(ctx, sums, rts, done, force=False, pending=pending)
    if (ctx.run_eval is not None and options.eval.every_steps and done < total_steps
        and done % options.eval.every_steps == 0):
      ctx.run_eval(rts, done, options.eval.max_batches)
    profiler.before_step(done + 1)
    return True

  rts, step, stopped = run_steps(ctx.train_step, rts, batches, step, total_steps, after_step)
  if not stopped:
    _save(ctx, sums, rts, step, force=True, pending=pending)
  return stopped, rts, step


# ------------------------------------------------------------------------------------- run
def _load_init_weights(options: ExperimentOptions, expected: Any) -> Optional[dict]:
  """config.init weights (official pickle or our npz), checked against the model, or None."""
  from nfnets import weights  # pylint: disable=g-import-not-at-top
  init = options.init
  if init.official_weights:
    return weights.load_official(init.official_weights)
  if init.params_path:
    # The file's headers are checked against the model before any array is read, unless the
    # classifier is to be replaced (then its shape may differ).
    return weights.load_params(init.params_path, None if init.drop_head else expected)
  return None


def _eval_prefix(options: ExperimentOptions, workdir: str, mode: str) -> str:
  """'eval' for the run's own eval split; 'eval_<split>' for another one in --mode=eval."""
  if mode != "eval":
    return "eval"
  try:
    own = workdir_lib.saved_options(workdir).data.eval_split
  except workdir_lib.WorkdirError:
    return "eval"
  split = options.data.eval_split
  return "eval" if split == own else "eval_" + "".join(c if c.isalnum() else "_" for c in split)


def _startup_summary(options: ExperimentOptions, setup: Setup, forward: Any, shapes: Any,
                     macs: Optional[int]) -> str:
  params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))
  size = options.data.image_size
  micro = setup.per_device_batch // setup.accum_steps
  lines = [
      f"Model {options.model.name} ({params:,} parameters"
      + (f", {macs / 1e9:.3g} GMACs per image at {size} px" if macs else "") + ")"
      + (", blocks rematerialised" if options.model.remat == "block" else ""),
      f"Devices {jax.device_count()} ({jax.devices()[0].device_kind}) on {jax.process_count()} "
      f"host(s); global batch {options.train.batch_size}, {setup.per_device_batch} per device"
      + (f" in {setup.accum_steps} micro-batches of {micro}" if setup.accum_steps > 1 else ""),
      f"Data {options.data.name}: {setup.data.num_train:,} train / {setup.data.num_eval:,} eval "
      f"examples, {setup.data.num_classes} classes; {setup.total_steps:,} steps "
      f"({setup.total_steps / setup.steps_per_epoch:.3g} epochs)",
  ]
  del forward
  return "\n".join(lines)


def run(options: ExperimentOptions, workdir: str, mode: str = "train_and_eval") -> dict:
  """Trains and/or evaluates as the options say; returns the last eval metrics.

  Args:
    options: the experiment (see nfnets.train.options).
    workdir: output root.
    mode: 'train', 'eval', 'train_and_eval' or 'plan' (memory and throughput plan, no data).

  Returns:
    The final evaluation metrics ({} in 'train' mode or when stopped by a signal; the plan
    in 'plan' mode).
  """
  signals.STOP.install()
  distributed.setup_jax(options.distributed, options.compilation_cache_dir, workdir)
  validate(options, mode, jax.device_count())
  if mode == "plan":
    from nfnets.train import plan  # pylint: disable=g-import-not-at-top
    return plan.print_plan(options)
  host0 = distributed.is_host0()
  with contextlib.ExitStack() as cleanup:
    error = None
    if host0:
      try:
        workdir = workdir_lib.prepare(workdir)
        cleanup.enter_context(workdir_lib.WorkdirLock(workdir))
      except workdir_lib.WorkdirError as e:
        error = e
    distributed.raise_together(error)
    reporting.route_library_logs(workdir if host0 else None)
    signals.STOP.check_startup("reading the data set")
    data_info = datasets.dataset_info(options.data)
    setup = derive_setup(options, data_info, jax.device_count())
    num_classes = data_info.num_classes
    forward = make_forward(options, num_classes)
    image_shape = (options.data.image_size, options.data.image_size, data_info.channels)
    shapes, _ = jax.eval_shape(
        lambda r, x: forward.init(r, x, is_training=True),
        jax.ShapeDtypeStruct((2,), jnp.uint32), jax.ShapeDtypeStruct((1,) + image_shape,
                                                                     jnp.float32))
    optimizer, schedule = optim.build_optimizer(
        options.optimizer, batch_size=options.train.batch_size,
        steps_per_epoch=setup.steps_per_epoch, total_steps=setup.total_steps)
    ckpt = checkpoints.Checkpointer(os.path.join(workdir, "checkpoints"), options.checkpoint,
                                    is_writer=host0)
    cleanup.callback(ckpt.close)  # Waits for a pending asynchronous write before exiting.
    on_disk = ckpt.all_steps()
    # Weights are read before anything compiles (a bad or unsafe file fails in seconds);
    # they are not needed when resuming.
    loaded = _load_init_weights(options, shapes) if not on_disk else None
    # Only host 0 sees the checkpoints (the others get them by broadcast when restoring), so
    # only host 0 can refuse the workdir; raise_together stops every host with its message.
    refusal = None
    try:
      if mode == "eval" and host0 and not on_disk and loaded is None:
        raise ValueError(f"Nothing to evaluate: no checkpoint in {ckpt.directory} and no "
                         "config.init.official_weights / config.init.params_path.")
      ckpt.check_signature(checkpoints.model_signature(options.model.name,
                                                       options.model.kwargs, shapes))
    except ValueError as e:
      refusal = e
    distributed.raise_together(refusal)
    macs = _train_macs(options, forward, image_shape)
    peak = reporting.peak_flops(jax.devices()[0].device_kind)
    reporter = reporting.Reporter(
        workdir, total_steps=setup.total_steps, images_per_step=options.train.batch_size,
        num_devices=jax.device_count(), is_writer=host0, tensorboard=options.tensorboard,
        train_flops_per_image=6.0 * macs if macs else None, peak_flops_per_device=peak)
    cleanup.callback(reporter.close)
    # Only now: a refused run must not overwrite the config.json of the run it refused, and an
    # evaluation must not rewrite the record of the training run it evaluates.
    if host0 and not (mode == "eval" and os.path.exists(
        os.path.join(workdir, workdir_lib.CONFIG_FILE))):
      workdir_lib.write_json(workdir, workdir_lib.CONFIG_FILE, options.to_json())
      workdir_lib.write_json(workdir, workdir_lib.DATASET_FILE, to_jsonable(data_info))
    reporter.print(_startup_summary(options, setup, forward, shapes, macs))
    signals.STOP.check_startup("compiling")
    # Restoring needs only shapes; the initial state is built (and its init compiled) only
    # when there is nothing to restore.
    template = state_lib.abstract_train_state(forward, optimizer, image_shape)
    restored, step = ckpt.restore_latest(template)
    ts = restored if restored is not None else state_lib.init_train_state(
        forward, optimizer, options.seed, image_shape)
    for name, reason in ckpt.unreadable:
      reporter.print(f"Checkpoint {name} is unreadable ({reason}); set aside, using the "
                     "previous one.")
    if restored is not None:
      reporter.print(f"Resumed from step {step} ({ckpt.directory}).")
    elif loaded is not None:
      from nfnets import weights  # pylint: disable=g-import-not-at-top
      params = weights.merge_params(
          jax.device_get(ts.params), loaded, options.init.drop_head, options.init.head_pattern,
          source=options.init.official_weights or options.init.params_path)
      # Fresh optimizer state for the new weights; EMA starts from them too.
      ts = ts._replace(params=params, ema_params=params, opt_state=optimizer.init(params))
      reporter.print("Initialised from "
                     f"{options.init.official_weights or options.init.params_path}.")
    if mode != "eval" and step >= setup.total_steps:
      reporter.print(f"Already trained: step {step} >= {setup.total_steps}.")
    eval_step = step_lib.make_eval_step(forward, num_classes) if mode != "train" else None
    prefix = _eval_prefix(options, workdir, mode)

    def run_eval(rts: Any, at_step: int, max_batches: int = 0) -> dict[str, float]:
      sets = {"": (rts.params, rts.state), "ema_": (rts.ema_params, rts.ema_state)}
      batches = datasets.eval_iterator(
          options.data, global_batch_size=options.eval.batch_size,
          host_index=jax.process_index(), host_count=jax.process_count(),
          local_device_count=jax.local_device_count(), num_classes=num_classes,
          num_examples=data_info.num_eval)
      res = evaluation.evaluate(eval_step, sets, batches, max_batches)
      reporter.log_eval(at_step, res, prefix=prefix)
      return res

    rts = state_lib.replicate(ts)
    del ts
    results: dict[str, float] = {}
    if mode != "eval" and step < setup.total_steps:
      train_step = step_lib.make_train_step(
          forward, optimizer, schedule, options.train, num_classes,
          ema_decay=options.optimizer.ema_decay, augment=make_augment(options),
          accum_steps=setup.accum_steps)
      batches = datasets.train_iterator(
          options.data, global_batch_size=options.train.batch_size,
          host_index=jax.process_index(), host_count=jax.process_count(),
          local_device_count=jax.local_device_count(), num_classes=num_classes,
          start_step=step)
      ctx = LoopContext(options=options, train_step=train_step, ckpt=ckpt, reporter=reporter,
                        run_eval=run_eval if mode == "train_and_eval" else None,
                        workdir=workdir)
      stopped, rts, step = train_loop(ctx, rts, step, setup.total_steps, batches)
      if stopped:
        return {}
    if mode != "train":
      results = run_eval(rts, step)
      reporter.print(f"FINAL step {step}: top-1 {results['top_1_acc']:.4f} | "
                     f"EMA top-1 {results['ema_top_1_acc']:.4f} | "
                     f"top-5 {results['top_5_acc']:.4f} | loss {results['loss']:.4f} "
                     f"({int(results['num_examples'])} examples)")
    return results


def to_jsonable(info: DatasetInfo) -> dict:
  return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(info).items()}


def _train_macs(options: ExperimentOptions, forward: Any, image_shape: tuple) -> Optional[int]:
  """Forward MACs per image at the training resolution (from shapes; None if not countable)."""
  from nfnets.analysis import flops  # pylint: disable=g-import-not-at-top
  try:
    return flops.model_cost(forward, image_shape[:2], channels=image_shape[2],
                            call_kwargs={"is_training": False})["macs"]
  except Exception:  # pylint: disable=broad-except  (a summary must never stop a run)
    return None
