"""Config-driven NFNet training and evaluation, on one device, many devices or many hosts.

  python experiment.py --config=configs/demo.py --workdir=workdirs/demo
  python experiment.py --config=configs/nfnet_f0.py --workdir=DIR --config.train.batch_size=1024
  python experiment.py --config=configs/nfnet_f0.py --workdir=DIR --mode=eval \
      --config.init.official_weights=F0_haiku.npz

Modes: 'train', 'eval' (the workdir's latest checkpoint, else config.init weights) and
'train_and_eval' (periodic + final eval). The config file is locked, so a misspelt or mistyped
`--config.x=y` fails before anything is built. Everything goes under --workdir: checkpoints/
(orbax, auto-resumed), metrics.jsonl, tb/ (TensorBoard), config.json; only host 0 writes.

When things go wrong (each proven by tests/test_reliability.py and test_distributed.py):
killed at any moment, the same command resumes bit-identically; SIGTERM/SIGINT save and exit
0; a NaN/Inf stops the run naming the step and quantity (or is skipped and counted with
train.skip_nonfinite=True); bad config, data, weights or a workdir of another model fail
before compiling with one line saying what to do.

Several processes: NFNETS_DISTRIBUTED=1 (or config.distributed=True) calls
jax.distributed.initialize(), from the cluster environment or, for explicit setups,
JAX_COORDINATOR_ADDRESS=host:port NFNETS_NUM_PROCESSES=N NFNETS_PROCESS_ID=i; CPU-only
processes use gloo collectives.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import sys
import time
from typing import Any, Iterator, Optional

from absl import app
from absl import flags
from absl import logging as absl_logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Path to a configs/*.py file; override fields with --config.a.b=value.",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output root: checkpoints, logs, config.json.")
_MODE = flags.DEFINE_enum("mode", "train_and_eval", ["train", "eval", "train_and_eval"],
                          "What to run.")

MODES = ("train", "eval", "train_and_eval")
DATA_SPECIAL = ("fake", "folder", "mnist5k", "imagenet2012")  # Anything else: a TFDS name.


class NonFiniteError(RuntimeError):
  """Training produced NaN/Inf; the last good checkpoint was left intact."""


# ----------------------------------------------------------------------------- config checks
def validate_config(config: Any, mode: str, device_count: int) -> None:
  """Fails fast with a one-line ValueError on settings that would fail much later.

  Args:
    config: the experiment config.
    mode: one of MODES.
    device_count: total number of devices (all hosts).
  """
  from nfnets import models, optim  # pylint: disable=g-import-not-at-top
  if mode not in MODES:
    raise ValueError(f"Unknown --mode={mode!r}; use one of {list(MODES)}.")
  models.resolve_kwargs(config.model.name, config.model.kwargs)  # Names, variant fields.
  if config.optimizer.name not in optim.OPTIMIZERS:
    raise ValueError(f"Unknown optimizer.name {config.optimizer.name!r}; "
                     f"use one of {sorted(optim.OPTIMIZERS)}.")
  for key in ("train", "eval"):
    bs = config[key].batch_size
    if bs <= 0 or bs % device_count:
      raise ValueError(f"{key}.batch_size={bs} must be a positive multiple of the device count "
                       f"({device_count}); e.g. --config.{key}.batch_size={device_count * 8}.")
  if not config.data.name:
    raise ValueError(f"data.name is empty; use one of {list(DATA_SPECIAL)} or a TFDS name.")
  if config.data.name == "folder" and not os.path.isdir(config.data.folder):
    raise ValueError(f"data.folder={config.data.folder!r} is not a directory; point "
                     "--config.data.folder at a folder of class sub-folders.")
  if config.train.num_steps < 0 or config.train.num_epochs < 0 or (
      config.train.num_steps == 0 and config.train.num_epochs == 0):
    raise ValueError("Set train.num_steps > 0 or train.num_epochs > 0.")
  for path in (config.init.official_weights, config.init.params_path):
    if path and not os.path.isfile(path):
      raise ValueError(f"Initial weights file {path!r} does not exist.")
  if config.init.official_weights and config.init.params_path:
    raise ValueError("Set only one of init.official_weights and init.params_path.")


def _setup_jax(config: Any, workdir: str) -> None:
  """Multi-host init and the persistent compilation cache; must precede any computation."""
  import jax  # pylint: disable=g-import-not-at-top
  if config.distributed or os.environ.get("NFNETS_DISTRIBUTED") == "1":
    # Cross-process collectives of the CPU backend (e.g. a CPU-only cluster, or two
    # processes on one machine in tests); GPUs/TPUs use their own and ignore this.
    if not os.environ.get("JAX_CPU_COLLECTIVES_IMPLEMENTATION"):
      jax.config.update("jax_cpu_collectives_implementation", "gloo")
    # Without NFNETS_NUM_PROCESSES, JAX reads the coordinator and process ids from the
    # cluster environment (SLURM, Open MPI, TPU pods); with it, from JAX_COORDINATOR_ADDRESS
    # (host:port of process 0), NFNETS_NUM_PROCESSES and NFNETS_PROCESS_ID.
    kwargs = {}
    if os.environ.get("NFNETS_NUM_PROCESSES"):
      kwargs = dict(num_processes=int(os.environ["NFNETS_NUM_PROCESSES"]),
                    process_id=int(os.environ.get("NFNETS_PROCESS_ID", "0")))
    jax.distributed.initialize(**kwargs)
  cache = (config.compilation_cache_dir or os.environ.get("NFNETS_COMPILATION_CACHE")
           or os.path.join(workdir, "jax_cache"))
  jax.config.update("jax_compilation_cache_dir", os.path.abspath(cache))
  # Cache every program, however fast it compiled: a restart must not recompile anything.
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def dataset_info(data_config: Any) -> tuple[int, int, int]:
  """(train examples, eval examples, classes) of the configured data set."""
  if data_config.name == "fake":
    from nfnets import synthetic_data  # pylint: disable=g-import-not-at-top
    return synthetic_data.dataset_info(data_config)
  from nfnets import data as data_lib  # pylint: disable=g-import-not-at-top
  return data_lib.dataset_info(data_config)


def _train_iterator(config: Any, start_step: int, num_classes: int) -> Iterator[dict]:
  import jax  # pylint: disable=g-import-not-at-top
  kwargs = dict(global_batch_size=config.train.batch_size, host_index=jax.process_index(),
                host_count=jax.process_count(), local_device_count=jax.local_device_count(),
                start_step=start_step)
  if config.data.name == "fake":
    from nfnets import synthetic_data  # pylint: disable=g-import-not-at-top
    return synthetic_data.fake_iterator(config.data, num_classes=num_classes, **kwargs)
  from nfnets import data as data_lib  # pylint: disable=g-import-not-at-top
  return data_lib.build_train_iterator(config.data, **kwargs)


def _eval_iterator(config: Any, num_classes: int, num_eval: int) -> Iterator[dict]:
  import jax  # pylint: disable=g-import-not-at-top
  kwargs = dict(global_batch_size=config.eval.batch_size, host_index=jax.process_index(),
                host_count=jax.process_count(), local_device_count=jax.local_device_count())
  if config.data.name == "fake":
    from nfnets import synthetic_data  # pylint: disable=g-import-not-at-top
    return synthetic_data.fake_iterator(config.data, num_classes=num_classes,
                                        eval_examples=num_eval, **kwargs)
  from nfnets import data as data_lib  # pylint: disable=g-import-not-at-top
  return data_lib.build_eval_iterator(config.data, split=config.data.eval_split, **kwargs)


# --------------------------------------------------------------------------- initial weights
def load_init_params(init_config: Any) -> Optional[dict]:
  """Loads config.init weights (official pickle or our safe npz), or None if none is set."""
  from nfnets import weights  # pylint: disable=g-import-not-at-top
  if init_config.official_weights:
    return weights.load_official(init_config.official_weights)
  if init_config.params_path:
    return weights.load_params(init_config.params_path)
  return None


def merge_params(fresh: dict, loaded: dict, drop_head: bool, head_pattern: str) -> dict:
  """Takes every parameter from `loaded`, except the classifier when `drop_head`.

  Args:
    fresh: the newly initialised params (define the required structure and shapes).
    loaded: released or saved params.
    drop_head: keep the fresh classifier (modules matching `head_pattern`), e.g. for new classes.
    head_pattern: regex over module names, e.g. '^[^/]+/~/linear$'.

  Returns:
    Params with the structure of `fresh`.
  """
  import re  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  head = re.compile(head_pattern)
  out, problems = {}, []
  for module, leaves in fresh.items():
    out[module] = {}
    for name, value in leaves.items():
      if drop_head and head.search(module):
        out[module][name] = value
        continue
      got = loaded.get(module, {}).get(name)
      if got is None:
        problems.append(f"{module}/{name} missing")
      elif tuple(np.shape(got)) != tuple(np.shape(value)):
        problems.append(f"{module}/{name} has shape {tuple(np.shape(got))}, "
                        f"model needs {tuple(np.shape(value))}")
      else:
        out[module][name] = np.asarray(got, np.asarray(value).dtype)
  if problems:
    hint = ("set --config.init.drop_head=True for a new classifier" if not drop_head else
            "check config.model.kwargs (variant/width) against the weights")
    raise ValueError(f"Initial weights do not fit the model ({len(problems)} problems, first: "
                     f"{'; '.join(problems[:3])}); {hint}.")
  return out


# ------------------------------------------------------------------------------- evaluation
def evaluate(eval_step: Any, params_by_prefix: dict[str, tuple[Any, Any]],
             batches: Iterator[dict], max_batches: int = 0) -> dict[str, float]:
  """Top-1, top-5 and loss of each (replicated) parameter set over the eval batches.

  Args:
    eval_step: from training.make_eval_step (psum'd counts).
    params_by_prefix: {'': (params, state), 'ema_': (ema_params, ema_state)}, replicated.
    batches: eval iterator (with 'mask' for padding).
    max_batches: stop after this many batches (0: all).

  Returns:
    {prefix + 'top_1_acc' / 'top_5_acc' / 'loss': float, 'num_examples': float}.
  """
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  sums = {p: None for p in params_by_prefix}
  for i, batch in enumerate(batches):
    if max_batches and i >= max_batches:
      break
    for prefix, (params, state) in params_by_prefix.items():
      out = eval_step(params, state, batch)
      out = {k: np.asarray(jax.device_get(v[0]), np.float64) for k, v in out.items()}
      sums[prefix] = out if sums[prefix] is None else {k: sums[prefix][k] + out[k] for k in out}
  results = {}
  for prefix, s in sums.items():
    if s is None or s["count"] == 0:
      raise ValueError("The eval split yielded no examples: check data.eval_split.")
    results[prefix + "top_1_acc"] = float(s["top_1_correct"] / s["count"])
    results[prefix + "top_5_acc"] = float(s["top_5_correct"] / s["count"])
    results[prefix + "loss"] = float(s["loss_sum"] / s["count"])
    results["num_examples"] = float(s["count"])
  return results


# ------------------------------------------------------------------------------------- run
def run(config: Any, workdir: str, mode: str = "train_and_eval") -> dict[str, float]:
  """Trains and/or evaluates as the config says; returns the last eval metrics.

  Everything a user can get wrong (config, data, weights, a workdir of another model) is
  checked before the first compilation, so such mistakes fail in seconds.

  Args:
    config: the experiment config (see configs/common.py).
    workdir: output root.
    mode: 'train', 'eval' or 'train_and_eval'.

  Returns:
    The final evaluation metrics ({} in 'train' mode or when stopped by a signal).
  """
  _setup_jax(config, workdir)
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from nfnets import checkpoints, models, optim, reporting, training  # pylint: disable=g-import-not-at-top

  validate_config(config, mode, jax.device_count())
  is_host0 = jax.process_index() == 0
  num_train, num_eval, num_classes = dataset_info(config.data)
  batch_size = config.train.batch_size
  steps_per_epoch = num_train / batch_size
  # As the official code: floor(examples * epochs / batch), e.g. 112602 for F0.
  total_steps = config.train.num_steps or int(num_train * config.train.num_epochs // batch_size)
  if total_steps < 1:
    raise ValueError(f"train.num_epochs={config.train.num_epochs} gives 0 steps at batch "
                     f"{batch_size}; raise it or set train.num_steps.")

  forward = models.make_forward(config.model.name, num_classes, **config.model.kwargs)
  optimizer, schedule = optim.build_optimizer(
      config.optimizer, batch_size=batch_size, steps_per_epoch=steps_per_epoch,
      total_steps=total_steps)
  ckpt = checkpoints.Checkpointer(
      os.path.join(workdir, "checkpoints"), every_steps=config.checkpoint.every_steps,
      every_seconds=config.checkpoint.every_seconds, keep=config.checkpoint.keep,
      is_writer=is_host0)
  reporter = reporting.Reporter(workdir, total_steps=total_steps, images_per_step=batch_size,
                                num_devices=jax.device_count(), is_writer=is_host0,
                                tensorboard=config.tensorboard)
  with contextlib.ExitStack() as cleanup:
    # Installed for the whole run: a signal during start-up is honoured after the first
    # step, one during the final save is ignored (the run is finishing anyway). Entered
    # first, so it is left last, after the pending write below has landed.
    stop = cleanup.enter_context(checkpoints.StopFlag())
    cleanup.callback(reporter.close)
    cleanup.callback(ckpt.close)  # Waits for a pending asynchronous write before exiting.
    on_disk = ckpt.all_steps()
    # Weights are read before anything compiles (a bad or unsafe file fails in seconds);
    # they are not needed when resuming.
    loaded = load_init_params(config.init) if not on_disk else None
    # The first batch fixes the image shape (channels come from the data set). It is built
    # at the step we expect to resume from and reused when that guess holds.
    guess = (on_disk or [0])[-1]
    train_iter = _train_iterator(config, guess, num_classes) if mode != "eval" else None
    if train_iter is not None:
      first = next(train_iter)
    else:
      first = next(_eval_iterator(config, num_classes, num_eval))
    image_shape = tuple(first["images"].shape[2:])
    # Shapes only (traced, not compiled): a workdir of another model is refused at once.
    shapes, _ = jax.eval_shape(
        lambda r, x: forward.init(r, x, is_training=True),
        jax.ShapeDtypeStruct((2,), jnp.uint32), jax.ShapeDtypeStruct((1,) + image_shape,
                                                                     jnp.float32))
    # Only host 0 sees the checkpoints (the others get them by broadcast when restoring), so
    # only host 0 can refuse the workdir; raise_together stops every host with its message.
    refusal = None
    try:
      if mode == "eval" and is_host0 and not on_disk and loaded is None:
        raise ValueError(f"Nothing to evaluate: no checkpoint in {ckpt.directory} and no "
                         "config.init.official_weights / config.init.params_path.")
      ckpt.check_signature(checkpoints.model_signature(config.model.name, config.model.kwargs,
                                                       shapes))
    except ValueError as e:
      refusal = e
    checkpoints.raise_together(refusal)
    # Only now: a refused run must not overwrite the config.json of the run it refused.
    reporter.write_config(config)
    ts = training.init_train_state(forward, optimizer, config.seed, image_shape)
    restored, step = ckpt.restore_latest(ts)
    for name, reason in ckpt.unreadable:
      reporter.print(f"Checkpoint {name} is unreadable ({reason}); set aside, using the "
                     "previous one.")
    if restored is not None:
      ts = restored
      reporter.print(f"Resumed from step {step} ({ckpt.directory}).")
    elif loaded is not None:
      params = merge_params(jax.device_get(ts.params), loaded, config.init.drop_head,
                            config.init.head_pattern)
      # Fresh optimizer state for the new weights; EMA starts from them too.
      ts = ts._replace(params=params, ema_params=params, opt_state=optimizer.init(params))
      reporter.print("Initialised from "
                     f"{config.init.official_weights or config.init.params_path}.")
    if mode != "eval" and step >= total_steps:
      reporter.print(f"Already trained: step {step} >= {total_steps}.")
    eval_step = training.make_eval_step(forward, num_classes) if mode != "train" else None

    def run_eval(rts: Any, at_step: int, max_batches: int = 0) -> dict[str, float]:
      sets = {"": (rts.params, rts.state), "ema_": (rts.ema_params, rts.ema_state)}
      res = evaluate(eval_step, sets, _eval_iterator(config, num_classes, num_eval), max_batches)
      reporter.log_eval(at_step, res)
      return res

    rts = training.replicate(ts)
    del ts
    results: dict[str, float] = {}
    if mode != "eval" and step < total_steps:
      if step != guess:  # A corrupt checkpoint was skipped: the iterator must match `step`.
        train_iter = _train_iterator(config, step, num_classes)
      else:
        train_iter = itertools.chain([first], train_iter)
      stopped, rts, step = _train_loop(config, rts, step, total_steps, train_iter, forward,
                                       optimizer, schedule, num_classes, ckpt, reporter,
                                       run_eval if mode == "train_and_eval" else None, stop)
      if stopped:
        return {}
    if mode != "train":
      results = run_eval(rts, step)
      reporter.print(f"FINAL step {step}: top-1 {results['top_1_acc']:.4f} | "
                     f"EMA top-1 {results['ema_top_1_acc']:.4f} | "
                     f"top-5 {results['top_5_acc']:.4f} | loss {results['loss']:.4f} "
                     f"({int(results['num_examples'])} examples)")
    return results


def _save(ckpt: Any, step: int, rts: Any, force: bool) -> None:
  """Checkpoints on the writer host when due (or when `force`)."""
  from nfnets import training  # pylint: disable=g-import-not-at-top
  if ckpt.is_writer and (force or ckpt.should_save(step)):
    ckpt.save(step, training.unreplicate(rts))


def _train_loop(config, rts, step, total_steps, train_iter, forward, optimizer, schedule,
                num_classes, ckpt, reporter, run_eval, stop):
  """The step loop; returns (stopped_by_signal, replicated state, step)."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from nfnets import training  # pylint: disable=g-import-not-at-top
  train_step = training.make_train_step(forward, optimizer, schedule, config.train, num_classes,
                                        ema_decay=config.optimizer.ema_decay)
  log_every = max(1, config.train.log_every_steps)
  nan_step = config.train.debug_nan_step
  skipped = 0
  first_step = step
  while step < total_steps:
    t0 = time.monotonic()
    batch = next(train_iter)
    if nan_step and step + 1 == nan_step:
      # Debug knob: poisons one batch (host side, same compiled step) to exercise the
      # non-finite handling end to end.
      batch = dict(batch, images=np.full_like(batch["images"], np.nan))
    rts, metrics = train_step(rts, batch)
    # Fetching the scalars each step syncs host and device; it is what lets a NaN stop
    # the run before any non-finite state could be checkpointed.
    m = {k: float(v) for k, v in training.unreplicate(metrics).items()}
    step += 1
    if step == first_step + 1:
      reporter.compile_done(step, time.monotonic() - t0)
    if not m.get("finite", 1.0):
      if not config.train.skip_nonfinite:
        _raise_nonfinite(m, rts, step, ckpt)
      skipped += 1
    m["skipped_steps"] = float(skipped)
    if step % log_every == 0 or step == total_steps:
      reporter.log_train(step, m)
    else:
      reporter.tick(step)
    if stop:
      _save(ckpt, step, rts, force=True)
      ckpt.wait()
      reporter.print(f"Stopped by {stop.name} at step {step}; checkpoint saved, exiting.")
      return True, rts, step
    if step < total_steps:
      _save(ckpt, step, rts, force=False)
    if (run_eval is not None and config.eval.every_steps and step < total_steps
        and step % config.eval.every_steps == 0):
      run_eval(rts, step, config.eval.max_batches)
  _save(ckpt, step, rts, force=True)
  return False, rts, step


def _raise_nonfinite(m: dict, rts: Any, step: int, ckpt: Any) -> None:
  """Stops the run naming the step and the first non-finite quantity."""
  from nfnets import training  # pylint: disable=g-import-not-at-top
  ckpt.wait()  # A write of the last good step may still be in flight: name it once landed.
  ordered = {k: m[k] for k in ("loss", "grad_norm", "update_norm", "param_norm") if k in m}
  what = training.first_nonfinite(ordered) or "a metric"
  param = training.first_nonfinite({"params": training.unreplicate(rts.params)})
  steps = ckpt.all_steps()
  kept = f"last good checkpoint: step {steps[-1]}" if steps else "no checkpoint was written"
  raise NonFiniteError(
      f"Non-finite {what} at step {step}" + (f" (first non-finite parameter: {param})"
                                             if param else "") +
      f"; {kept}. Lower optimizer.lr or agc.clipping, or set train.skip_nonfinite=True.")


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  absl_logging.set_verbosity(absl_logging.WARNING)  # Hide JAX's backend-probing INFO lines.
  try:
    run(_CONFIG.value, _WORKDIR.value, _MODE.value)
  except (ValueError, NonFiniteError) as e:
    # Configuration and data problems are the user's to fix: one line, no traceback
    # (NFNETS_DEBUG=1 re-raises for the full traceback).
    if os.environ.get("NFNETS_DEBUG") == "1":
      raise
    print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
    sys.exit(1)


def parse_flags(argv: list[str]) -> list[str]:
  """absl flag parsing, with config-override mistakes reported on one line (exit 2).

  ml_collections raises a bare AttributeError/KeyError/TypeError for an unknown or
  mistyped `--config.x=y` on a locked config, which absl would show as a long traceback.
  """
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    message = str(e)
  except (AttributeError, KeyError, TypeError, ValueError) as e:
    inner = e.args[0] if e.args else e
    # KeyError/AttributeError wrap the message in repr quotes and escape newlines.
    text = str(inner.args[0] if isinstance(inner, BaseException) and inner.args else inner)
    lines = text.replace("\\'", "'").strip("'\"").splitlines() or [""]
    if len(lines) > 1:  # "'key'" then a "Did you mean ...?" hint.
      lines[0] = f"unknown config key '{lines[0].strip(chr(39))}';"
    text = " ".join(" ".join(lines).split())
    overrides = [a for a in argv[1:] if a.startswith("--config.")]
    message = f"{text} (command line: {' '.join(overrides)})"
  print(f"error: {message}", file=sys.stderr)
  sys.exit(2)


if __name__ == "__main__":
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main, flags_parser=parse_flags)
