"""Evaluation: top-1, top-5 and loss over an eval split, during training and as --mode=eval.

The eval step (`step.make_eval_step`) returns counts summed over a global batch, padding
excluded; `evaluate` sums them over the split, on the host in float64, so every example counts
exactly once across all devices and hosts.

`evaluate_run` (--mode=eval) only reads the workdir: the newest verified checkpoint's weights
(`checkpoints.read_weights`: no lock, no optimizer), so it runs beside a training run or on a
read-only copy; its result goes to `<workdir>/eval/<split>_<step>.json` (when the workdir is
writable) and to the console, and nothing else of the run is touched.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np
from jax.sharding import Mesh

from nfnets import paths
from nfnets.data import datasets
from nfnets.train import checkpoints
from nfnets.train import distributed
from nfnets.train import finetune
from nfnets.train import integrity
from nfnets.train import mesh as mesh_lib
from nfnets.train import state as state_lib
from nfnets.train import step as step_lib
from nfnets.train import workdir as workdir_lib
from nfnets.train.options import ExperimentOptions


def evaluate(eval_step: Callable[..., Mapping[str, Any]],
             params_by_prefix: Mapping[str, tuple[Any, Any]],
             batches: Iterable[Mapping[str, np.ndarray]],
             mesh: Mesh, max_batches: int = 0) -> dict[str, float]:
  """Top-1, top-5 and loss of each (replicated) parameter set over the eval batches.

  Args:
    eval_step: from step.make_eval_step (counts summed over the global batch).
    params_by_prefix: e.g. {'': (params, state), 'ema_': (ema_params, ema_state)}, replicated.
    batches: this host's rows of each eval batch (with 'mask' for padding).
    mesh: the device mesh of `eval_step`.
    max_batches: stop after this many batches (0: all).

  Returns:
    {prefix + 'top_1_acc' / 'top_5_acc' / 'loss': float, 'num_examples': float}.
  """
  sums: dict[str, Any] = {p: None for p in params_by_prefix}
  for i, batch in enumerate(batches):
    if max_batches and i >= max_batches:
      break
    batch = mesh_lib.global_batch(batch, mesh)
    for prefix, (params, state) in params_by_prefix.items():
      counts = mesh_lib.host_copy(eval_step(params, state, batch))
      out = {k: np.float64(v) for k, v in counts.items()}
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


def final_line(step: int, results: Mapping[str, float]) -> str:
  """The run's last line: 'FINAL step N: top-1 ... | EMA top-1 ... | top-5 ... | loss ...'."""
  return (f"FINAL step {step}: top-1 {results['top_1_acc']:.4f} | "
          f"EMA top-1 {results['ema_top_1_acc']:.4f} | top-5 {results['top_5_acc']:.4f} | "
          f"loss {results['loss']:.4f} ({int(results['num_examples'])} examples)")


def make_evaluator(options: ExperimentOptions, forward: Any, num_classes: int,
                   num_eval: int, mesh: Any) -> Callable[..., dict]:
  """run({prefix: (params, state)}, max_batches=0): `evaluate` over the eval split."""
  eval_step = step_lib.make_eval_step(forward, num_classes, mesh=mesh)
  index, count = mesh_lib.local_share(mesh)

  def run(sets: Mapping[str, tuple[Any, Any]], max_batches: int = 0) -> dict[str, float]:
    batches = datasets.eval_iterator(
        options.data, global_batch_size=options.eval.batch_size, host_index=index,
        host_count=count, num_classes=num_classes, num_examples=num_eval)
    return evaluate(eval_step, sets, batches, mesh, max_batches)

  return run


def evaluate_run(options: ExperimentOptions, workdir: str, mesh: Any) -> dict:
  """'eval': the newest verified checkpoint of `workdir` (or init.weights), read only."""
  data_info = datasets.dataset_info(options.data)
  num_classes = data_info.num_classes
  forward = state_lib.make_forward(options.model, num_classes)
  image_shape = (options.data.image_size, options.data.image_size, data_info.channels)
  shapes, state_shapes = state_lib.model_shapes(forward, image_shape)
  ckpt_dir = paths.resolve(workdir) / "checkpoints"
  error, sets, step, source = None, None, 0, ""
  try:
    if checkpoints.step_dirs(ckpt_dir):
      saved = integrity.read_signature(ckpt_dir)
      wanted = integrity.model_signature(options.model.name, options.model.kwargs, shapes)
      if saved is not None and not integrity.same_model(saved, wanted):
        raise integrity.SignatureMismatchError(
            f"{workdir} holds checkpoints of a different model than the config describes "
            f"({integrity.signature_diff(saved, wanted)}); evaluate it with its own config "
            "(leave --config out).")
      both = {}
      for ema in (False, True):
        weights = checkpoints.read_weights(ckpt_dir, {"params": shapes, "state": state_shapes},
                                           ema=ema)
        both[ema] = (weights.params, weights.state)
      step, source = weights.step, weights.path
      for name, reason in weights.skipped:
        print(f"Checkpoint {name} is unreadable ({reason}); using the previous one.")
      sets = {"": both[False], "ema_": both[True]}
    elif options.init.weights:
      source_info = finetune.describe(options.init.weights)
      loaded = finetune.load(source_info, options, shapes, data_info)
      sets = {"": (loaded.params, loaded.state), "ema_": (loaded.params, loaded.state)}
      source = options.init.weights
    else:
      raise ValueError(f"Nothing to evaluate: no checkpoint in {ckpt_dir} and no "
                       "config.init.weights.")
  except ValueError as e:
    error = e
  distributed.raise_together(error)
  sets = {k: mesh_lib.replicate(v, mesh) for k, v in sets.items()}
  results = make_evaluator(options, forward, num_classes, data_info.num_eval, mesh)(sets)
  split = options.data.eval_split
  record = {"step": step, "split": split, "weights": source, **results}
  if distributed.is_host0():
    written = workdir_lib.write_eval_record(workdir, split, step, record)
    print(f"[eval {split} @ step {step}] " + " | ".join(
        f"{k} {v:.4f}" for k, v in sorted(results.items())))
    if written:
      print(f"Wrote {written}")
    print(final_line(step, results), flush=True)
  return results
