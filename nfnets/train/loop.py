"""The experiment: options -> data -> model -> step -> loop -> evaluation, checkpoints, reports.

`run(options, workdir, mode)` is what `python experiment.py` calls. Everything a user can get
wrong (the options, the data, the weights, a workdir of another model or in use by another
run) is checked before the first compilation, so such mistakes fail in seconds with one line.

Every process of a multi-host job runs this same code and takes every decision at the same
step: the step's metrics are global, and a signal or a due checkpoint on any one host reaches
all of them through the step's host flags (`nfnets.train.step.HOST_FLAGS`), read one step late
so that the loop never waits for the device without need. Metrics stay on the device and are
summed there (`nfnets.train.metrics`); the host fetches them every `train.log_every_steps`
steps and before a checkpoint, and the next batch is sent to the devices while the current
step runs (`mesh.prefetch`).

`--mode=eval` only reads the workdir (`evaluation.evaluate_run`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, Optional

import jax
import numpy as np

from nfnets import paths
from nfnets.data import datasets
from nfnets.data.options import DatasetInfo
from nfnets.models import registry
from nfnets.train import checkpoints
from nfnets.train import distributed
from nfnets.train import evaluation
from nfnets.train import finetune
from nfnets.train import integrity
from nfnets.train import mesh as mesh_lib
from nfnets.train import optim
from nfnets.train import reporting
from nfnets.train import signals
from nfnets.train import state as state_lib
from nfnets.train import step as step_lib
from nfnets.train import workdir as workdir_lib
from nfnets.train.metrics import MetricSums, NonFiniteError, merge_intervals, nonfinite_error
from nfnets.train.options import ExperimentOptions

MODES = ("train", "eval", "train_and_eval", "plan")
__all__ = ["MODES", "NonFiniteError", "run", "run_steps", "Setup"]


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


def validate(options: ExperimentOptions, mode: str, device_count: Optional[int]) -> None:
  """Fails fast with a one-line ValueError on settings that would fail much later."""
  if mode not in MODES:
    raise ValueError(f"Unknown --mode={mode!r}; use one of {list(MODES)}.")
  registry.resolve_kwargs(options.model.name, options.model.kwargs)  # Names, variant fields.
  if mode == "plan" or device_count is None:
    return
  for key in ("train", "eval"):
    bs = getattr(options, key).batch_size
    if bs % device_count:
      raise ValueError(f"{key}.batch_size={bs} must be a positive multiple of the device count "
                       f"({device_count}); e.g. --config.{key}.batch_size={device_count * 8}.")
  if options.data.name == "folder" and not paths.resolve(options.data.folder).is_dir():
    raise ValueError(f"data.folder={options.data.folder!r} is not a directory; point "
                     "--config.data.folder at a folder of class sub-folders.")
  if options.init.weights and not paths.resolve(options.init.weights).exists():
    raise ValueError(f"init.weights={options.init.weights!r} does not exist; pass a weights "
                     "file (.npz) or a run's workdir.")


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
  group = options.data.mix_group_size
  if options.data.mixes and per_device % group:
    raise ValueError(f"The per-device batch {per_device} does not hold whole MixUp/CutMix groups "
                     f"of data.mix_group_size={group}; set --config.data.mix_group_size to a "
                     f"divisor of {per_device} (the same value on every topology a run resumes "
                     "on).")
  return Setup(data=data, total_steps=total_steps, steps_per_epoch=data.num_train / batch_size,
               per_device_batch=per_device,
               accum_steps=step_lib.grad_accum_steps(options.train, per_device))


def make_augment(options: ExperimentOptions):
  """The device-side augmentation of the training batches (uint8 in, normalised out)."""
  from nfnets.augment import batch as augment_batch  # pylint: disable=g-import-not-at-top
  return augment_batch.make_augment(options.data)


# ------------------------------------------------------------------------------- the loop
@dataclasses.dataclass
class LoopContext:
  """What the step loop uses besides the state (built once by `run`)."""
  options: ExperimentOptions
  train_step: step_lib.TrainStep
  ckpt: checkpoints.Checkpointer
  reporter: reporting.Reporter
  run_eval: Optional[Callable[[Any, int, int], dict]]
  workdir: str
  skipped_steps: int = 0


def _save(ctx: LoopContext, sums: MetricSums, ts: Any, step: int, pending: list) -> None:
  """Checkpoints `step`, after making sure no non-finite step slipped in (every process)."""
  _drain(ctx, sums, pending, step, log=False)
  ctx.ckpt.save(step, ts)


def _drain(ctx: LoopContext, sums: MetricSums, pending: list, step: int, log: bool) -> None:
  """Fetches the interval's metrics; raises if a step was non-finite (unless skipping)."""
  interval = sums.fetch()
  if interval is None:
    return
  if interval["first_bad_step"] >= 0 and not ctx.options.train.skip_nonfinite:
    ctx.ckpt.wait()  # A write of the last good step may still be in flight: name it once landed.
    steps = ctx.ckpt.all_steps()
    raise nonfinite_error(interval, steps[-1] if steps else None)
  ctx.skipped_steps += int(round(interval["skipped"] * interval["steps_in_interval"]))
  pending.append(interval)
  if log:
    merged = merge_intervals(pending)
    pending.clear()
    merged["skipped_steps"] = float(ctx.skipped_steps)
    ctx.reporter.log_train(step, merged)


# After each step: (step just completed, state, that step's metrics on the device) -> go on?
AfterStep = Callable[[int, Any, Mapping[str, jax.Array]], bool]


def run_steps(train_step: step_lib.TrainStep, ts: Any,
              batches: Iterable[Mapping[str, np.ndarray]], step: int, total_steps: int,
              after_step: AfterStep,
              host_flags: Optional[Callable[[], jax.Array]] = None) -> tuple[Any, int, bool]:
  """The one step loop: batches to the devices one ahead, steps, a hook after each.

  Both `train_loop` (checkpoints, reports, evaluation, signals) and the reproduce/ studies
  (materialised batches, divergence stops) drive their steps through it.

  Args:
    train_step: the compiled step (state, global batch, flags) -> (state, metrics).
    ts: the TrainState (global arrays).
    batches: this host's rows of each batch, from `step` on.
    step: steps done so far.
    total_steps: stop after this step.
    after_step: called after every step; returning False stops the loop.
    host_flags: this host's flags for the next step (default: none set).

  Returns:
    (state, steps done, whether `after_step` stopped the loop).
  """
  device_batches = mesh_lib.prefetch(batches, train_step.mesh)
  try:
    while step < total_steps:
      flags = host_flags() if host_flags is not None else None
      ts, metrics = train_step(ts, next(device_batches), flags)
      step += 1
      if not after_step(step, ts, metrics):
        return ts, step, True
  except distributed.COLLECTIVE_ERRORS as e:
    if distributed.is_collective_failure(e):
      distributed.exit_lost_process(e)  # Does not return: no cleanup waits for the lost peer.
    raise
  return ts, step, False


def train_loop(ctx: LoopContext, ts: Any, step: int, total_steps: int,
               batches: Iterator[Mapping[str, np.ndarray]]) -> tuple[bool, Any, int]:
  """The training run from `step` to `total_steps`; returns (stopped by a signal, state, step)."""
  options = ctx.options
  log_every = max(1, options.train.log_every_steps)
  sums = MetricSums()
  pending: list = []
  first_step = step
  profiler = reporting.Profiler(options.profile.start_step, options.profile.num_steps,
                                os.path.join(ctx.workdir, "profile"), ctx.ckpt.is_primary)
  profiler.before_step(step + 1)
  previous: dict[str, jax.Array] = {}  # The last step's decisions, read one step late.
  flag_cache: dict[tuple[bool, bool], jax.Array] = {}
  t0 = time.monotonic()

  def host_flags() -> jax.Array:
    key = (bool(signals.STOP), ctx.ckpt.time_due())
    if key not in flag_cache:
      flag_cache[key] = ctx.train_step.host_flags(stop_requested=key[0], save_due=key[1])
    return flag_cache[key]

  def after_step(done: int, ts: Any, metrics: Mapping[str, jax.Array]) -> bool:
    profiler.after_step(done, ts.step)
    sums.add({k: v for k, v in metrics.items() if k not in step_lib.HOST_FLAGS}, done)
    if done == first_step + 1:
      jax.block_until_ready(ts.step)
      ctx.reporter.compile_done(done, time.monotonic() - t0)
    # Waits for the previous step only: this one is already queued behind it.
    decided = {k: bool(v) for k, v in mesh_lib.host_copy(previous).items()}
    previous.clear()
    previous.update({k: metrics[k] for k in step_lib.HOST_FLAGS})
    if done % log_every == 0 or done == total_steps:
      _drain(ctx, sums, pending, done, log=True)
    else:
      ctx.reporter.tick(done)
    if decided.get("stop_requested"):
      _save(ctx, sums, ts, done, pending)
      ctx.ckpt.wait()
      ctx.reporter.print(f"Stopped by {signals.STOP.name or 'a signal on another host'} at "
                         f"step {done}; checkpoint saved, exiting.")
      return False
    if done < total_steps and (ctx.ckpt.step_due(done) or decided.get("save_due")):
      _save(ctx, sums, ts, done, pending)
    if (ctx.run_eval is not None and options.eval.every_steps and done < total_steps
        and done % options.eval.every_steps == 0):
      ctx.run_eval(ts, done, options.eval.max_batches)
    profiler.before_step(done + 1)
    return True

  ts, step, stopped = run_steps(ctx.train_step, ts, batches, step, total_steps, after_step,
                                host_flags)
  if not stopped:
    _save(ctx, sums, ts, step, pending)
  return stopped, ts, step


# ------------------------------------------------------------------------------------- run
def _startup_summary(options: ExperimentOptions, setup: Setup, shapes: Any,
                     macs: Optional[int]) -> str:
  params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))
  size = options.data.image_size
  micro = setup.per_device_batch // setup.accum_steps
  return "\n".join([
      f"Model {options.model.name} ({params:,} parameters"
      + (f", {macs / 1e9:.3g} GMACs per image at {size} px" if macs else "") + ")"
      + (", blocks rematerialised" if options.model.remat == "block" else ""),
      f"Devices {jax.device_count()} ({jax.devices()[0].device_kind}) on {jax.process_count()} "
      f"host(s); global batch {options.train.batch_size}, {setup.per_device_batch} per device"
      + (f" in {setup.accum_steps} micro-batches of {micro}" if setup.accum_steps > 1 else ""),
      f"Data {options.data.name}: {setup.data.num_train:,} train / {setup.data.num_eval:,} eval "
      f"examples, {setup.data.num_classes} classes; {setup.total_steps:,} steps "
      f"({setup.total_steps / setup.steps_per_epoch:.3g} epochs)",
  ])


def run(options: ExperimentOptions, workdir: Optional[str], mode: str = "train_and_eval") -> dict:
  """Trains and/or evaluates as the options say; returns the last eval metrics.

  Args:
    options: the experiment (see nfnets.train.options).
    workdir: output root (local or gs://); not needed for 'plan'.
    mode: 'train', 'eval', 'train_and_eval' or 'plan' (memory and throughput plan, no data).

  Returns:
    The final evaluation metrics ({} in 'train' mode or when stopped by a signal; the plan
    in 'plan' mode).
  """
  signals.STOP.install()
  validate(options, mode, None)
  readers_cache = options.compilation_cache_dir or paths.compilation_cache_dir()
  if mode == "plan":
    # Writes nothing but the user's compilation cache: no workdir is needed.
    distributed.setup_jax(options.distributed, readers_cache, "")
    from nfnets.train import plan  # pylint: disable=g-import-not-at-top
    return plan.print_plan(options)
  if not workdir:
    raise ValueError(f"--mode={mode} needs --workdir.")
  workdir = paths.absolute(workdir)
  # An evaluation only reads the workdir: its compiled programs go to the user's cache.
  distributed.setup_jax(options.distributed,
                        readers_cache if mode == "eval" else options.compilation_cache_dir,
                        workdir)
  validate(options, mode, jax.device_count())
  mesh = mesh_lib.make_mesh()
  try:
    if mode == "eval":
      return evaluation.evaluate_run(options, workdir, mesh)
    return train(options, workdir, mode, mesh)
  except distributed.COLLECTIVE_ERRORS as e:
    if distributed.is_collective_failure(e):
      distributed.exit_lost_process(e)
    raise


def train(options: ExperimentOptions, workdir: str, mode: str, mesh: Any) -> dict:
  """'train' / 'train_and_eval': the writer of `workdir` (see `run`)."""
  host0 = distributed.is_host0()
  with contextlib.ExitStack() as cleanup:
    error = None
    if host0:
      try:
        workdir_lib.prepare(workdir)
        cleanup.enter_context(workdir_lib.lock(workdir))
      except workdir_lib.WorkdirError as e:
        error = e
    distributed.raise_together(error)
    reporting.route_library_logs(workdir if host0 else None)
    signals.STOP.check_startup("reading the data set")
    data_info = datasets.dataset_info(options.data)
    source = None
    if options.init.weights:
      source = finetune.describe(options.init.weights)
      options = finetune.with_source_architecture(options, source)
    setup = derive_setup(options, data_info, jax.device_count())
    num_classes = data_info.num_classes
    forward = state_lib.make_forward(options.model, num_classes)
    image_shape = (options.data.image_size, options.data.image_size, data_info.channels)
    shapes, state_shapes = state_lib.model_shapes(forward, image_shape)
    optimizer, schedule = optim.build_optimizer(
        options.optimizer, batch_size=options.train.batch_size,
        steps_per_epoch=setup.steps_per_epoch, total_steps=setup.total_steps)
    ckpt = checkpoints.Checkpointer(paths.resolve(workdir) / "checkpoints", options.checkpoint)
    cleanup.callback(ckpt.close)  # Waits for a pending asynchronous write before exiting.
    on_disk = ckpt.all_steps()
    # Weights are read before anything compiles (a bad or unsafe file fails in seconds);
    # they are not needed when resuming.
    loaded, error = None, None
    if source is not None and not on_disk:
      try:
        loaded = finetune.load(source, options, shapes, data_info)
      except ValueError as e:
        error = e
    distributed.raise_together(error)
    ckpt.check_signature(integrity.model_signature(options.model.name, options.model.kwargs,
                                                   shapes, data_info))
    macs = _train_macs(forward, image_shape)
    reporter = reporting.Reporter(
        workdir, total_steps=setup.total_steps, images_per_step=options.train.batch_size,
        num_devices=jax.device_count(), is_writer=host0, tensorboard=options.tensorboard,
        train_flops_per_image=6.0 * macs if macs else None,
        peak_flops_per_device=reporting.peak_flops(jax.devices()[0].device_kind))
    cleanup.callback(reporter.close)
    if host0:  # After the checks: a refused run must not overwrite the record of another.
      workdir_lib.write_run_record(workdir, options, data_info)
    reporter.print(_startup_summary(options, setup, shapes, macs))
    signals.STOP.check_startup("compiling")
    # Restoring needs only shapes; the initial state is built (and its init compiled) only
    # when there is nothing to restore.
    template = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=mesh_lib.replicated(mesh)),
        state_lib.abstract_train_state(forward, optimizer, image_shape))
    restored, step = ckpt.restore_latest(template)
    for name, reason in ckpt.unreadable:
      reporter.print(f"Checkpoint {name} is unreadable ({reason}); set aside, using the "
                     "previous one.")
    if restored is not None:
      ts = restored
      reporter.print(f"Resumed from step {step} ({ckpt.directory}).")
      reporter.forget_after(step)
    else:
      ts = state_lib.init_train_state(forward, optimizer, options.seed, image_shape, mesh)
      if loaded is not None:
        ts = finetune.start_from(ts, loaded, optimizer, mesh)
        reporter.print(loaded.summary)
    if step >= setup.total_steps:
      reporter.print(f"Already trained: step {step} >= {setup.total_steps}.")
    run_eval = None
    if mode == "train_and_eval":
      run_eval = _periodic_evaluation(
          evaluation.make_evaluator(options, forward, num_classes, data_info.num_eval, mesh),
          reporter)

    if step < setup.total_steps:
      train_step = step_lib.make_train_step(
          forward, optimizer, schedule, options.train, num_classes,
          ema_decay=options.optimizer.ema_decay, augment=make_augment(options),
          accum_steps=setup.accum_steps, mesh=mesh,
          per_example_keys=not jax.tree.leaves(state_shapes))
      rows = mesh_lib.local_rows(options.train.batch_size, mesh)
      batches = _device_inputs(datasets.train_iterator(
          options.data, global_batch_size=options.train.batch_size, rows=rows,
          num_classes=num_classes, start_step=step), step, rows,
          workdir if options.train.record_examples else None)
      ctx = LoopContext(options=options, train_step=train_step, ckpt=ckpt, reporter=reporter,
                        run_eval=run_eval, workdir=workdir)
      stopped, ts, step = train_loop(ctx, ts, step, setup.total_steps, batches)
      if stopped:
        return {}
    if run_eval is None:
      return {}
    results = run_eval(ts, step)
    reporter.print(evaluation.final_line(step, results))
    return results


def _periodic_evaluation(evaluate: Callable[..., dict], reporter: reporting.Reporter
                         ) -> Callable[[Any, int, int], dict]:
  """run_eval(state, step, max_batches): both weight sets evaluated and reported."""
  def run_eval(ts: Any, at_step: int, max_batches: int = 0) -> dict[str, float]:
    res = evaluate({"": (ts.params, ts.state), "ema_": (ts.ema_params, ts.ema_state)},
                   max_batches)
    reporter.log_eval(at_step, res)
    return res
  return run_eval


def _device_inputs(batches: Iterator[dict], step: int, rows: tuple[int, int],
                   record_to: Optional[str]) -> Iterator[dict]:
  """The batches without their example ids (host-side only), recorded when asked."""
  log = None
  if record_to is not None and not paths.is_url(record_to):
    os.makedirs(os.path.join(record_to, "examples"), exist_ok=True)
    log = open(os.path.join(record_to, "examples", f"process_{jax.process_index()}.jsonl"),
               "a", buffering=1)
  try:
    for batch in batches:
      ids = batch.pop("example_id", None)
      step += 1
      if log is not None and ids is not None:
        log.write(json.dumps({"step": step, "rows": list(rows),
                              "examples": [int(i) for i in ids]}) + "\n")
      yield batch
  finally:
    if log is not None:
      log.close()


def _train_macs(forward: Any, image_shape: tuple) -> Optional[int]:
  """Forward MACs per image at the training resolution (from shapes; None if not countable)."""
  from nfnets.analysis import flops  # pylint: disable=g-import-not-at-top
  try:
    return flops.model_cost(forward, image_shape[:2], channels=image_shape[2],
                            call_kwargs={"is_training": False})["macs"]
  except Exception:  # pylint: disable=broad-except  (a summary must never stop a run)
    return None

