"""--mode=plan: what a config needs per device, before any data is read or a run is started.

For the configured model, batch and machine (`config.plan`), it compiles the train step on this
machine's backend without data and reports, per device:

* the exact bytes of parameters, optimizer state and EMA copies (from shapes);
* peak memory estimates for gradient accumulation k = 1, 2, 4, ... with and without
  rematerialisation, from the compiler's own buffer assignment (`compiled.memory_analysis()`):
  the train step is compiled at two small micro-batches per remat mode, and the activation
  memory is extrapolated linearly in the micro-batch (plus the gradient accumulator when
  k > 1);
* the smallest setting that fits `plan.device_memory_gb` (accumulation first, remat only if
  needed: accumulation costs no extra compute, remat ~1/3 more);
* FLOPs per step from the model's own MAC count (3 x 2 x forward MACs per training image);
* the input rate the host pipeline must sustain at `plan.images_per_sec_per_device`.

These are ESTIMATES, and it says so: the compiler of this machine (often a CPU) fuses and
allocates differently from the accelerator's, cuDNN/TPU workspaces are not counted, and
fragmentation is ignored. Leave headroom (the plan keeps 10 %).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from nfnets.models import registry
from nfnets.train import optim
from nfnets.train import state as state_lib
from nfnets.train import step as step_lib
from nfnets.train.options import ExperimentOptions

_HEADROOM = 0.9
_PROBE_BATCHES = (2, 4)
GB = 1e9


@dataclasses.dataclass(frozen=True)
class Setting:
  """One way to run the step: accumulation k and remat, with its estimated peak."""
  accum_steps: int
  remat: str
  micro_batch: int
  peak_bytes: float

  @property
  def peak_gb(self) -> float:
    return self.peak_bytes / GB


def _channels(options: ExperimentOptions) -> int:
  # Known without reading the data set.
  if options.data.name == "fake":
    return options.data.fake_channels
  return 1 if options.data.name == "mnist5k" else 3


def _tree_bytes(tree: Any) -> int:
  return sum(int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def _compiled_memory(options: ExperimentOptions, remat: str, micro: int, num_classes: int,
                     channels: int) -> Any:
  """memory_analysis() of the train step for one device at micro-batch `micro` (k = 1)."""
  forward = registry.make_forward(options.model.name, num_classes, remat=remat,
                                  **options.model.kwargs)
  optimizer, schedule = optim.build_optimizer(options.optimizer, batch_size=micro,
                                              steps_per_epoch=100.0, total_steps=10_000)
  device = jax.devices()[:1]
  size = options.data.image_size
  inputs = options.data.inputs_per_example
  ts = state_lib.abstract_train_state(forward, optimizer, (size, size, channels))
  lead = lambda x: jax.ShapeDtypeStruct((1,) + x.shape, x.dtype)
  batch = {"images": jax.ShapeDtypeStruct((1, micro * inputs, size, size, channels), jnp.uint8),
           "labels": jax.ShapeDtypeStruct((1, micro * inputs), jnp.int32)}
  from nfnets.augment import batch as augment_batch  # pylint: disable=g-import-not-at-top
  train_step = step_lib.make_train_step(
      forward, optimizer, schedule, options.train, num_classes,
      ema_decay=options.optimizer.ema_decay,
      augment=augment_batch.make_augment(options.data), devices=device)
  lowered = train_step.lower(jax.tree.map(lead, ts), batch)
  # LLVM optimisation does not change buffer assignment; skipping it makes CPU compiles faster.
  compiler_options = ({"xla_backend_optimization_level": 0}
                      if jax.default_backend() == "cpu" else None)
  return lowered.compile(compiler_options=compiler_options).memory_analysis(), ts


def plan(options: ExperimentOptions) -> dict[str, Any]:
  """The plan as a dict (see the module docstring); `print_plan` formats it."""
  devices = options.plan.num_devices or jax.device_count()
  batch = options.train.batch_size
  if batch % devices:
    raise ValueError(f"train.batch_size={batch} does not split over plan.num_devices="
                     f"{devices}; choose a multiple.")
  per_device = batch // devices
  num_classes = options.data.num_classes or 1000
  channels = _channels(options)
  size = options.data.image_size
  budget = options.plan.device_memory_gb * GB * _HEADROOM

  from nfnets.analysis import flops  # pylint: disable=g-import-not-at-top
  forward = registry.make_forward(options.model.name, num_classes, **options.model.kwargs)
  cost = flops.model_cost(forward, (size, size), channels=channels)
  train_flops_per_image = 6.0 * cost["macs"]

  fits: list[Setting] = []
  probes: dict[str, dict[int, float]] = {}
  state_bytes = None
  for remat in ("none", "block"):
    temps = {}
    for micro in _PROBE_BATCHES:
      memory, ts = _compiled_memory(options, remat, micro, num_classes, channels)
      temps[micro] = float(memory.temp_size_in_bytes)
      state_bytes = _tree_bytes(ts)
    probes[remat] = temps
    (m1, t1), (m2, t2) = sorted(temps.items())
    slope = max((t2 - t1) / (m2 - m1), 0.0)
    fixed = t1 - slope * m1
    for k in [d for d in range(1, per_device + 1) if per_device % d == 0]:
      micro = per_device // k
      grads = _tree_bytes(ts.params) if k > 1 else 0
      batch_bytes = per_device * options.data.inputs_per_example * size * size * channels
      peak = state_bytes + batch_bytes + fixed + slope * micro + grads
      fits.append(Setting(k, remat, micro, peak))
  configured = next(s for s in fits if s.remat == options.model.remat and s.accum_steps == (
      step_lib.grad_accum_steps(options.train, per_device)))
  chosen = next((s for s in fits if s.peak_bytes <= budget), None)

  ips = options.plan.images_per_sec_per_device
  per_host = ips * options.plan.devices_per_host
  params_bytes = _tree_bytes(ts.params)
  return {
      "devices": devices, "per_device_batch": per_device, "image_size": size,
      "params": int(sum(int(np.prod(x.shape)) for x in jax.tree.leaves(ts.params))),
      "params_bytes": params_bytes, "optimizer_bytes": _tree_bytes(ts.opt_state),
      "ema_bytes": _tree_bytes(ts.ema_params) + _tree_bytes(ts.ema_state),
      "state_bytes": state_bytes,
      "macs_per_image": cost["macs"],
      "flops_per_step_per_device": train_flops_per_image * per_device,
      "flops_per_step": train_flops_per_image * batch,
      "probe_temp_bytes": probes,
      "settings": [dataclasses.asdict(s) for s in fits],
      "configured": dataclasses.asdict(configured),
      "chosen": dataclasses.asdict(chosen) if chosen else None,
      "budget_bytes": budget,
      "backend": jax.devices()[0].device_kind,
      "input_images_per_sec_per_host": per_host,
      "decoded_images_per_sec_per_core": per_host * options.data.inputs_per_example / max(
          options.plan.cores_per_host, 1),
  }


def format_plan(result: dict[str, Any], options: ExperimentOptions) -> str:
  """The human-readable plan."""
  gb = lambda b: f"{b / GB:.2f} GB"
  cfg, chosen = result["configured"], result["chosen"]
  lines = [
      f"Plan for {options.model.name} {options.model.kwargs.get('variant', '')} at "
      f"{result['image_size']} px, global batch {options.train.batch_size} on "
      f"{result['devices']} devices ({result['per_device_batch']} per device); memory "
      f"{options.plan.device_memory_gb:g} GB per device.",
      f"ESTIMATES from the {result['backend']} compiler's buffer assignment "
      "(memory_analysis); an accelerator's compiler fuses and allocates differently and needs "
      "workspace on top: keep headroom.",
      f"  parameters {result['params']:,} ({gb(result['params_bytes'])}), optimizer state "
      f"{gb(result['optimizer_bytes'])}, EMA {gb(result['ema_bytes'])}; whole train state "
      f"{gb(result['state_bytes'])} per device",
      f"  FLOPs per step: {result['flops_per_step_per_device'] / 1e12:.3g} TFLOP per device, "
      f"{result['flops_per_step'] / 1e15:.3g} PFLOP in all ({result['macs_per_image'] / 1e9:.3g}"
      " GMACs per image forward, x 6 for a training step)",
      "  peak memory per device (k = micro-batches per step):",
  ]
  for remat in ("none", "block"):
    row = [s for s in result["settings"] if s["remat"] == remat][:6]
    cells = ", ".join(f"k={s['accum_steps']} ({s['micro_batch']}/dev) {s['peak_bytes'] / GB:.1f}"
                      for s in row)
    lines.append(f"    remat={remat:5s}: {cells} GB")
  lines.append(f"  configured (k={cfg['accum_steps']}, remat={cfg['remat']}): "
               f"~{cfg['peak_bytes'] / GB:.1f} GB")
  if chosen:
    lines.append(f"  fits in {options.plan.device_memory_gb:g} GB (90 % used at most): "
                 f"--config.train.grad_accum_steps={chosen['accum_steps']} "
                 f"--config.model.remat={chosen['remat']}  (~{chosen['peak_bytes'] / GB:.1f} GB)")
  else:
    lines.append(f"  nothing fits in {options.plan.device_memory_gb:g} GB even at micro-batch 1"
                 " with remat: use more devices or a smaller model/resolution.")
  lines.append(
      f"  input: {result['input_images_per_sec_per_host']:,.0f} images/s per host at "
      f"{options.plan.images_per_sec_per_device:g} images/s per device x "
      f"{options.plan.devices_per_host} devices, i.e. "
      f"{result['decoded_images_per_sec_per_core']:,.0f} decoded images/s per core on "
      f"{options.plan.cores_per_host} cores")
  return "\n".join(lines)


def print_plan(options: ExperimentOptions) -> dict[str, Any]:
  result = plan(options)
  print(format_plan(result, options), flush=True)
  return result
