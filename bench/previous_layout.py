"""The device-mesh step and named checkpoints against the previous layout, alternated in one run.

  git worktree add /tmp/prev 07f514c     # the last version with jax.pmap and index-key checkpoints
  python bench/previous_layout.py --previous=/tmp/prev [--repeats 5] [--processes 2]

The previous version's `nfnets/` is copied under the name `nfnets_prev` (its imports rewritten),
so both live in this process and every case alternates with its counterpart:

* step: the training step of a small NFNet (the demo's widths, 32 px, batch 64, stochastic
  depth, MixUp + CutMix + RandAugment on the device) on 2 CPU devices; `jax.pmap` over
  [devices, ...] batches (previous) vs `jax.jit` over a mesh with the body in `jax.shard_map`
  (current). Median ms per step over --steps, best of --repeats.
* checkpoints: an NFNet-F0-sized state (params, momentum, EMA: 3 x 71.5 M float32) saved and
  restored: host 0 writing index keys and broadcasting on restore (previous) vs every process
  through orbax, named leaf paths (current). With --processes 2 the checkpoint part runs as two
  jax.distributed processes on this machine (gloo), each with one CPU device.

Writes bench/results/previous_layout_<date>.json with the load average before and after.
"""

import argparse
import datetime
import json
import os
import pathlib
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO / "bench" / "results"


def alias_previous(previous: str, into: str) -> None:
  """Copies <previous>/nfnets to <into>/nfnets_prev with its imports renamed."""
  target = pathlib.Path(into) / "nfnets_prev"
  shutil.copytree(pathlib.Path(previous) / "nfnets", target)
  for path in target.rglob("*.py"):
    text = path.read_text()
    text = re.sub(r"\bfrom nfnets\b", "from nfnets_prev", text)
    text = re.sub(r"\bimport nfnets\b", "import nfnets_prev", text)
    text = text.replace('"nfnets.', '"nfnets_prev.')
    path.write_text(text)


def _median_ms(fn, steps: int) -> float:
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    fn()
    times.append((time.perf_counter() - start) * 1e3)
  return sorted(times)[len(times) // 2]


def bench_steps(args) -> dict:
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  import nfnets_prev  # pylint: disable=g-import-not-at-top,unused-import
  from configs import common  # pylint: disable=g-import-not-at-top
  from nfnets.augment import batch as augment_new  # pylint: disable=g-import-not-at-top
  from nfnets.data.options import DataOptions  # pylint: disable=g-import-not-at-top
  from nfnets.models import registry  # pylint: disable=g-import-not-at-top
  from nfnets.train import mesh as mesh_lib  # pylint: disable=g-import-not-at-top
  from nfnets.train import optim, state as state_new, step as step_new  # pylint: disable=g-import-not-at-top
  from nfnets.train.options import TrainOptions  # pylint: disable=g-import-not-at-top
  from nfnets_prev.augment import batch as augment_prev  # pylint: disable=g-import-not-at-top
  from nfnets_prev.data.options import DataOptions as DataOptionsPrev  # pylint: disable=g-import-not-at-top
  from nfnets_prev.train import state as state_prev, step as step_prev  # pylint: disable=g-import-not-at-top
  from nfnets_prev.train.options import TrainOptions as TrainOptionsPrev  # pylint: disable=g-import-not-at-top

  kwargs = dict(common.small_nfnet_kwargs(width=(32, 64, 128, 128),
                                          group_width=(16, 32, 64, 64), stochdepth_rate=0.2))
  forward = registry.make_forward("NFNet", 10, **kwargs)
  optimizer, schedule = optim.build_optimizer(None, batch_size=args.batch, steps_per_epoch=100,
                                              total_steps=10000)
  size, devices = 32, jax.local_device_count()
  rng = np.random.default_rng(0)
  inputs = 2 * args.batch
  images = rng.integers(0, 256, (inputs, size, size, 3), dtype=np.uint8)
  labels = rng.integers(0, 10, inputs).astype(np.int32)
  host = jax.device_get(state_new.init_train_state(forward, optimizer, 0, (size, size, 3)))
  data = dict(randaugment="205", mixup_alpha=0.2, cutmix=True, image_size=size)
  train = dict(label_smoothing=0.1, bfloat16=False)

  mesh = mesh_lib.make_mesh()
  new_step = step_new.make_train_step(
      forward, optimizer, schedule, TrainOptions(**train), 10, ema_decay=0.999,
      augment=augment_new.make_augment(DataOptions(**data, mix_group_size=args.batch // devices)),
      mesh=mesh)
  new_batch = mesh_lib.global_batch({"images": images, "labels": labels}, mesh)
  prev_step = step_prev.make_train_step(
      forward, optimizer, schedule, TrainOptionsPrev(**train), 10, ema_decay=0.999,
      augment=augment_prev.make_augment(DataOptionsPrev(**data)))
  per_device = {"images": images.reshape((devices, -1) + images.shape[1:]),
                "labels": labels.reshape(devices, -1)}
  prev_batch = state_prev.shard(per_device)
  states = {"current": mesh_lib.replicate(host, mesh), "previous": state_prev.replicate(host)}

  def run(name):
    if name == "current":
      states[name], metrics = new_step(states[name], new_batch)
    else:
      states[name], metrics = prev_step(states[name], prev_batch)
    jax.block_until_ready(metrics)

  for name in states:  # Compile both first.
    run(name)
  best = {name: float("inf") for name in states}
  for _ in range(args.repeats):
    for name in states:
      best[name] = min(best[name], _median_ms(lambda n=name: run(n), args.steps))
  return {"ms_per_step": best, "previous_over_current": best["previous"] / best["current"],
          "devices": devices, "batch": args.batch, "image_size": size}


def bench_checkpoints(args, root: str) -> dict:
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from nfnets.models import registry  # pylint: disable=g-import-not-at-top
  from nfnets.train import checkpoints as ckpt_new  # pylint: disable=g-import-not-at-top
  from nfnets.train import mesh as mesh_lib  # pylint: disable=g-import-not-at-top
  from nfnets.train.options import CheckpointOptions  # pylint: disable=g-import-not-at-top
  from nfnets_prev.train import checkpoints as ckpt_prev  # pylint: disable=g-import-not-at-top

  forward = registry.make_forward("NFNet", 1000, variant="F0")
  shapes = jax.eval_shape(lambda: forward.init(jax.random.key(0), jnp.zeros((1, 192, 192, 3)),
                                               is_training=True)[0])
  rng = np.random.default_rng(0)
  make = lambda: jax.tree.map(lambda s: rng.standard_normal(s.shape, np.float32), shapes)
  host = {"params": make(), "momentum": make(), "ema_params": make(),
          "step": np.asarray(1, np.int32)}
  mesh = mesh_lib.make_mesh()
  placed = mesh_lib.replicate(host, mesh)
  template = jax.tree.map(lambda x: jax.ShapeDtypeStruct(
      x.shape, x.dtype, sharding=mesh_lib.replicated(mesh)), placed)
  options = CheckpointOptions(every_steps=0, every_seconds=0.0, keep=2)
  best = {}

  def note(key, seconds):
    best[key] = min(best.get(key, float("inf")), seconds)

  for r in range(args.repeats):
    for name in ("previous", "current"):
      directory = os.path.join(root, f"{name}{r}")
      start = time.perf_counter()
      if name == "previous":
        ckpt = ckpt_prev.Checkpointer(directory, options, is_writer=jax.process_index() == 0)
        ckpt.save(1, host)
      else:
        ckpt = ckpt_new.Checkpointer(directory, options)
        ckpt.save(1, placed)
      ckpt.wait()
      note(f"{name}_save_s", time.perf_counter() - start)
      ckpt.close()
      start = time.perf_counter()
      if name == "previous":
        reader = ckpt_prev.Checkpointer(directory, options, is_writer=jax.process_index() == 0)
        restored, step = reader.restore_latest(host)
      else:
        reader = ckpt_new.Checkpointer(directory, options)
        restored, step = reader.restore_latest(template)
      jax.block_until_ready(jax.tree.leaves(restored))
      note(f"{name}_restore_s", time.perf_counter() - start)
      reader.close()
      assert step == 1
  best["bytes"] = sum(x.nbytes for x in jax.tree.leaves(host))
  return best


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--previous", required=True, help="A checkout of the previous version.")
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--steps", type=int, default=10)
  parser.add_argument("--batch", type=int, default=64)
  parser.add_argument("--processes", type=int, default=1,
                      help="Run the checkpoint part as this many jax.distributed processes.")
  parser.add_argument("--part", default="all", choices=["all", "checkpoints"],
                      help=argparse.SUPPRESS)
  parser.add_argument("--scratch", default="", help=argparse.SUPPRESS)
  args = parser.parse_args()
  scratch = args.scratch or tempfile.mkdtemp(prefix="previous_layout_")
  if not os.path.isdir(os.path.join(scratch, "nfnets_prev")):
    alias_previous(args.previous, scratch)
  sys.path[:0] = [str(REPO), scratch]
  if args.part == "checkpoints":  # A child of --processes N.
    import jax  # pylint: disable=g-import-not-at-top
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(os.environ["BENCH_COORDINATOR"], args.processes,
                               int(os.environ["BENCH_PROCESS"]))
    result = bench_checkpoints(args, os.path.join(scratch, "ckpt"))
    if jax.process_index() == 0:
      print("RESULT " + json.dumps(result), flush=True)
    return
  os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
  load_before = os.getloadavg()
  steps = bench_steps(args)
  if args.processes > 1:
    import socket  # pylint: disable=g-import-not-at-top
    with socket.socket() as s:
      s.bind(("127.0.0.1", 0))
      port = s.getsockname()[1]
    children = []
    for index in range(args.processes):
      env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1",
                 BENCH_COORDINATOR=f"127.0.0.1:{port}", BENCH_PROCESS=str(index))
      children.append(subprocess.Popen(
          [sys.executable, __file__, f"--previous={args.previous}", f"--scratch={scratch}",
           "--part=checkpoints", f"--processes={args.processes}", f"--repeats={args.repeats}"],
          env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True))
    outputs = [c.communicate()[0] for c in children]
    line = next(l for l in outputs[0].splitlines() if l.startswith("RESULT "))
    ckpt = json.loads(line[len("RESULT "):])
  else:
    ckpt = bench_checkpoints(args, os.path.join(scratch, "ckpt"))
  load_after = os.getloadavg()
  shutil.rmtree(scratch, ignore_errors=True)
  today = datetime.date.today().isoformat()
  result = {"date": today, "machine": platform.platform(), "cores": os.cpu_count(),
            "load_avg_before": load_before, "load_avg_after": load_after,
            "repeats": args.repeats, "step": steps, "checkpoint_processes": args.processes,
            "checkpoint_seconds": ckpt}
  print(json.dumps(result, indent=1))
  os.makedirs(RESULTS_DIR, exist_ok=True)
  path = RESULTS_DIR / f"previous_layout_{today}_{args.processes}proc.json"
  path.write_text(json.dumps(result, indent=2))
  print(f"Wrote {path}")


if __name__ == "__main__":
  main()
