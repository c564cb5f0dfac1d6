"""--mode=plan: what a config needs per device, before any data is read or a run is started.

For the configured model, batch and machine (`config.plan`), it reports, per device:

* the exact bytes of parameters, optimizer state and EMA copies (from shapes);
* peak memory estimates for gradient accumulation k = 1, 2, 4, ... with and without
  rematerialisation: the activation memory of one micro-batch comes from the compiler's own
  buffer assignment (`compiled.memory_analysis()` of the forward + backward pass, compiled at
  two small micro-batches per remat mode and extrapolated linearly in the micro-batch); to it
  are added the exact bytes of the train state, the input batch, the float32 gradients, the
  gradient accumulator (k > 1) and one more parameter-sized buffer for the optimizer update;
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
import time
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from nfnets.models import registry
from nfnets.train import optim
from nfnets.train import state as state_lib
from nfnets.train import step as step_lib
from nfnets.train.options import ExperimentOptions

_HEADROOM = 0.9
_PROBE_BATCHES = (1, 2)
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


def _activation_bytes(options: ExperimentOptions, remat: str, micro: int, num_classes: int,
                      channels: int) -> float:
  """Temporary bytes of one forward + backward pass at micro-batch `micro` (memory_analysis)."""
  forward = registry.make_forward(options.model.name, num_classes, remat=remat,
                                  scan_blocks=options.model.scan_blocks, **options.model.kwargs)
  size = options.data.image_size
  dtype = jnp.bfloat16 if options.train.bfloat16 else jnp.float32
  params, state = jax.eval_shape(lambda: forward.init(
      jax.random.PRNGKey(0), jnp.zeros((1, size, size, channels)), is_training=True))

  def loss(p, images):
    cast = lambda t: state_lib.cast_floats(t, dtype)
    outputs, _ = forward.apply(cast(p), cast(state), jax.random.PRNGKey(0), images.astype(dtype),
                               is_training=True)
    return jnp.mean(outputs["logits"].astype(jnp.float32))

  images = jax.ShapeDtypeStruct((micro, size, size, channels), jnp.float32)
  lowered = jax.jit(jax.grad(loss)).lower(params, images)
  compiled = lowered.compile(compiler_options=state_lib.fast_compile_options())
  return float(compiled.memory_analysis().temp_size_in_bytes)


def choose(settings: list[dict[str, Any]], budget_bytes: float) -> Optional[dict[str, Any]]:
  """The first setting that fits: remat off before on, then the fewest micro-batches.

  Accumulation costs no extra compute (only smaller, less efficient micro-batches), remat
  about a third more; so remat is used only when no accumulation fits without it.
  """
  return next((s for s in settings if s["peak_bytes"] <= budget_bytes), None)


def plan(options: ExperimentOptions, remat_modes: Sequence[str] = ("none", "block"),
         progress: Optional[Callable[[str], None]] = None) -> dict[str, Any]:
  """The plan as a dict (see the module docstring); `print_plan` formats it.

  Args:
    options: the experiment to plan.
    remat_modes: the `model.remat` settings to estimate (each costs two compilations); the
      configured one is always included.
    progress: called with a line before each slow part (the compilations), e.g. print.
  """
  progress = progress or (lambda line: None)
  remat_modes = tuple(dict.fromkeys(tuple(remat_modes) + (options.model.remat,)))
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
  progress(f"{options.model.name} at {size} px: counting parameters and FLOPs ...")
  cost = flops.model_cost(forward, (size, size), channels=channels)
  train_flops_per_image = 6.0 * cost["macs"]

  optimizer, _ = optim.build_optimizer(options.optimizer, batch_size=batch,
                                       steps_per_epoch=1.0, total_steps=10**9)
  ts = state_lib.abstract_train_state(forward, optimizer, (size, size, channels))
  state_bytes = _tree_bytes(ts)
  params_f32 = sum(int(np.prod(x.shape)) * 4 for x in jax.tree.leaves(ts.params))
  fits: list[Setting] = []
  probes: dict[str, dict[int, float]] = {}
  total = len(_PROBE_BATCHES) * len(remat_modes)
  done = 0
  for remat in remat_modes:
    temps = {}
    for m in _PROBE_BATCHES:
      done += 1
      progress(f"compiling the forward + backward pass at micro-batch {m}, remat={remat} "
               f"({done} of {total}) ...")
      start = time.monotonic()
      temps[m] = _activation_bytes(options, remat, m, num_classes, channels)
      progress(f"  {time.monotonic() - start:.0f} s")
    probes[remat] = temps
    (m1, t1), (m2, t2) = sorted(temps.items())
    slope = max((t2 - t1) / (m2 - m1), 0.0)
    fixed = max(t1 - slope * m1, 0.0)
    for k in [d for d in range(1, per_device + 1) if per_device % d == 0]:
      micro = per_device // k
      # The uint8 inputs and their float32 normalised copy (augmentation happens per device).
      pixels = per_device * size * size * channels
      batch_bytes = pixels * options.data.inputs_per_example + 4 * pixels
      # Gradients, the accumulator (k > 1) and one parameter-sized optimizer temporary.
      grads = params_f32 * (3 if k > 1 else 2)
      peak = state_bytes + batch_bytes + grads + fixed + slope * micro
      fits.append(Setting(k, remat, micro, peak))
  configured = next(s for s in fits if s.remat == options.model.remat and s.accum_steps == (
      step_lib.grad_accum_steps(options.train, per_device)))
  settings = [dataclasses.asdict(s) for s in fits]
  chosen = choose(settings, budget)

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
      "activation_probe_bytes": probes,
      "settings": settings,
      "configured": dataclasses.asdict(configured),
      "chosen": chosen,
      "budget_bytes": budget,
      "backend": jax.devices()[0].device_kind,
      "input_images_per_sec_per_host": per_host,
      "decoded_images_per_sec_per_core": per_host * options.data.inputs_per_example / max(
          options.plan.cores_per_host, 1),
  }


def _size(num_bytes: float) -> str:
  return f"{num_bytes / GB:.1f} GB" if num_bytes >= 0.1 * GB else f"{num_bytes / 1e6:.1f} MB"


def format_plan(result: dict[str, Any], options: ExperimentOptions) -> str:
  """The human-readable plan."""
  gb = _size
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
  for remat in dict.fromkeys(s["remat"] for s in result["settings"]):
    row = [s for s in result["settings"] if s["remat"] == remat][:6]
    cells = ", ".join(f"k={s['accum_steps']} ({s['micro_batch']}/dev) {_size(s['peak_bytes'])}"
                      for s in row)
    lines.append(f"    remat={remat:5s}: {cells}")
  lines.append(f"  configured (k={cfg['accum_steps']}, remat={cfg['remat']}): "
               f"~{_size(cfg['peak_bytes'])}")
  if chosen:
    lines.append(f"  fits in {options.plan.device_memory_gb:g} GB (90 % used at most): "
                 f"--config.train.grad_accum_steps={chosen['accum_steps']} "
                 f"--config.model.remat={chosen['remat']}  (~{_size(chosen['peak_bytes'])})")
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
  """Plans, printing what it is doing as it goes (each compilation takes seconds to minutes)."""
  result = plan(options, progress=lambda line: print(f"plan: {line}", flush=True))
  print(format_plan(result, options), flush=True)
  return result
