r"""Training- and evaluation-step throughput of our NFNets, and of timm's dm_nfnet in the same run.

Usage (F0 at its training setting on a GPU; numbers go to bench/results/<date>_<device>.json):

  python bench/benchmark.py --variant=F0 --batch=256 --image_size=192 --eval_image_size=256 \
      --dtype=bfloat16 --timm

CPU, small batch, with the timm ratio (about 6 minutes on 2 cores):

  python bench/benchmark.py --variant=F0 --batch=4 --image_size=128 --eval_image_size=128 \
      --dtype=float32 --steps=5 --warmup=2 --timm

Compile time against depth, with each stage's repeated blocks traced one by one and run as one
lax.scan (`--scan_blocks`), every variant and mode compiled in one process:

  python bench/benchmark.py --compile_only --compile_programs=grad --modes=train \
      --variant=F0,F3,F7 --scan_blocks=off,on --batch=1 --image_size=64 --dtype=float32

What one "train" step is: on-device MixUp/CutMix + RandAugment (--augment), forward, backward
(in --accum micro-batches, --remat), AGC, SGD-Nesterov with coupled weight decay and the EMA
update: exactly `nfnets.train.step.make_train_step`, on uint8 synthetic data already on the
device.
"eval" is the forward pass at the evaluation resolution. Reported per mode: images/s, median
ms/step over `--steps` timed steps after `--warmup`, compile seconds cold and from the persistent
compilation cache, peak device memory (where the backend reports it) and MFU: the model's own
multiply-accumulate count (nfnets.flops) x 2 FLOPs, x 3 for training (forward + two backward
matmuls), against the device's dense bf16 peak (or --peak_tflops).
"""

import argparse
import datetime
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from typing import Any, Callable, Dict, List, Optional

import numpy as np

TINY_VARIANT = dict(width=(16, 32, 64, 64), depth=(1, 1, 1, 1), group_width=8,
                    train_imsize=32, test_imsize=32, drop_rate=0.0)


def _parse_args(argv: List[str]) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--variant', default='F0',
                      help="NFNet variant ('F0'..'F7', 'F0+'..) or 'tiny' for the CI smoke test; "
                           'with --compile_only a comma list.')
  parser.add_argument('--batch', type=int, default=256, help='Batch per step (one device).')
  parser.add_argument('--image_size', type=int, default=None, help='Train size; default the variant\'s.')
  parser.add_argument('--eval_image_size', type=int, default=None,
                      help='Eval size; default the variant\'s test size.')
  parser.add_argument('--dtype', choices=('bfloat16', 'float32'), default='bfloat16',
                      help='Compute precision of the training step (params stay float32).')
  parser.add_argument('--modes', default='train,eval', help='Comma list of train, eval.')
  parser.add_argument('--accum', default='1', help='Comma list of gradient accumulation steps.')
  parser.add_argument('--remat', default='none', help="Comma list of 'none', 'block'.")
  parser.add_argument('--scan_blocks', default='off',
                      help="Comma list of 'off', 'on': each stage's repeated blocks traced one by "
                           'one or run as one lax.scan.')
  parser.add_argument('--augment', choices=('paper', 'fast', 'none'), default='paper',
                      help="The train step's on-device MixUp/CutMix + RandAugment ('none': off).")
  parser.add_argument('--steps', type=int, default=20, help='Timed steps (median reported).')
  parser.add_argument('--warmup', type=int, default=3, help='Untimed steps after compiling.')
  parser.add_argument('--compile_only', action='store_true',
                      help='Train settings: compile once and record compile time and memory '
                           'only (no timing).')
  parser.add_argument('--compile_programs', default='grad,step',
                      help="With --compile_only, comma list of 'grad' (jit(grad(loss)) of the "
                           "training forward/backward alone) and 'step' (the whole train step).")
  parser.add_argument('--timm', action='store_true', help="Also run timm's dm_nfnet in this process.")
  parser.add_argument('--timm_compile', action='store_true', help='torch.compile the timm model.')
  parser.add_argument('--peak_tflops', type=float, default=None,
                      help='Device peak for MFU when the device kind is not in reporting.PEAK_TFLOPS.')
  parser.add_argument('--out', default=os.path.join(os.path.dirname(__file__), 'results'),
                      help='Folder for the JSON record list (one file per run).')
  args = parser.parse_args(argv)
  bad = set(args.modes.split(',')) - {'train', 'eval'}
  if bad:
    parser.error(f'unknown mode(s) {sorted(bad)}; use train and/or eval.')
  if args.batch < 1 or args.steps < 1 or args.warmup < 0:
    parser.error('--batch and --steps must be >= 1 and --warmup >= 0.')
  if ',' in args.variant and not args.compile_only:
    parser.error('several --variant values need --compile_only.')
  bad = set(args.scan_blocks.split(',')) - {'off', 'on'}
  if bad:
    parser.error(f"unknown --scan_blocks value(s) {sorted(bad)}; use off and/or on.")
  bad = set(args.compile_programs.split(',')) - {'grad', 'step'}
  if bad:
    parser.error(f"unknown --compile_programs value(s) {sorted(bad)}; use grad and/or step.")
  return args


def _median_ms(fn: Callable[[], Any], sync: Callable[[Any], Any], steps: int, warmup: int) -> float:
  for _ in range(warmup):
    sync(fn())
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    sync(fn())
    times.append(time.perf_counter() - start)
  return 1e3 * statistics.median(times)


def _device_info() -> Dict[str, Any]:
  import jax  # pylint: disable=g-import-not-at-top
  device = jax.local_devices()[0]
  kind = getattr(device, 'device_kind', device.platform)
  if device.platform == 'cpu':
    kind = f'cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)'
  return {'device': kind, 'platform': device.platform}


def _peak_flops(device_kind: str, override: Optional[float]) -> Optional[float]:
  # One table of device peaks, the training loop's (nfnets.train.reporting.PEAK_TFLOPS).
  from nfnets.train import reporting  # pylint: disable=g-import-not-at-top
  return override * 1e12 if override else reporting.peak_flops(device_kind)


def _peak_memory_gb() -> Optional[float]:
  import jax  # pylint: disable=g-import-not-at-top
  stats = jax.local_devices()[0].memory_stats() or {}
  peak = stats.get('peak_bytes_in_use')
  return None if peak is None else peak / 2**30


def _compiled_peak_bytes(memory: Any) -> int:
  """Arguments + outputs + temporaries, less the outputs that alias donated arguments."""
  return (memory.argument_size_in_bytes + memory.output_size_in_bytes +
          memory.temp_size_in_bytes - memory.alias_size_in_bytes)


def _versions() -> Dict[str, str]:
  import importlib.metadata as md  # pylint: disable=g-import-not-at-top
  out = {'python': platform.python_version()}
  for name in ('jax', 'jaxlib', 'dm-haiku', 'optax', 'torch', 'timm'):
    try:
      out[name] = md.version(name)
    except md.PackageNotFoundError:
      pass
  return out


def _train_options(args: argparse.Namespace, accum: int):
  from nfnets.train.options import TrainOptions  # pylint: disable=g-import-not-at-top
  return TrainOptions(label_smoothing=0.1, bfloat16=args.dtype == 'bfloat16',
                      grad_accum_steps=accum)


def _data_options(args: argparse.Namespace, spec: Any, size: int):
  """The paper's augmentation (on the device, inside the step) or none (--augment=none)."""
  from nfnets.data.options import DataOptions  # pylint: disable=g-import-not-at-top
  if args.augment == 'none':
    return DataOptions(image_size=size, randaugment='', mixup_alpha=0.0, cutmix=False)
  # Pairs are drawn in groups of 32 (the paper's per-core batch), or of the whole smaller batch.
  return DataOptions(image_size=size, randaugment=getattr(spec, 'ra_level', '405'),
                     mixup_alpha=0.2, cutmix=True, mix_mode=args.augment,
                     mix_group_size=math.gcd(args.batch, 32))


def bench_nfnets(args: argparse.Namespace, info: Dict[str, Any],
                 save: Callable[[Dict[str, Any]], None]) -> List[Dict[str, Any]]:
  """Times our train step (per accumulation x remat x scan_blocks setting) and eval step.

  One record each, per variant. `save` gets each record as soon as it is measured (a later
  setting may run out of memory).
  """
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from nfnets.analysis import flops  # pylint: disable=g-import-not-at-top
  from nfnets.augment import batch as augment_batch  # pylint: disable=g-import-not-at-top
  from nfnets.models import registry  # pylint: disable=g-import-not-at-top
  from nfnets.train import mesh as mesh_lib  # pylint: disable=g-import-not-at-top
  from nfnets.train import optim  # pylint: disable=g-import-not-at-top
  from nfnets.train import state as state_lib  # pylint: disable=g-import-not-at-top
  from nfnets.train import step as step_lib  # pylint: disable=g-import-not-at-top

  mesh = mesh_lib.make_mesh(jax.local_devices()[:1])
  peak = _peak_flops(info['device'], args.peak_tflops)
  scans = [mode == 'on' for mode in args.scan_blocks.split(',')]
  programs = args.compile_programs.split(',')
  records = []

  def record(variant_name, mode, size, ms, compile_cold, compile_cached, macs_per_image, memory,
             **extra):
    """One result; `ms` None for a setting that was compiled only (no timing)."""
    flops_per_step = macs_per_image * 2 * (3 if mode == 'train' else 1) * args.batch
    return {
        **info, 'date': datetime.date.today().isoformat(), 'implementation': 'nfnets (this repo)',
        'variant': variant_name, 'mode': mode, 'batch': args.batch, 'image_size': size,
        'dtype': args.dtype if mode == 'train' else 'float32',
        'images_per_second': None if ms is None else args.batch / (ms / 1e3), 'ms_per_step': ms,
        'mfu': None if peak is None or ms is None else flops_per_step / (ms / 1e3) / peak,
        'peak_memory_gb': _peak_memory_gb(), 'compile_seconds': compile_cold,
        'compile_seconds_cached': compile_cached, 'macs_per_image': macs_per_image,
        'compiled_temp_gb': None if memory is None else memory.temp_size_in_bytes / 2**30,
        # This program's own peak from the compiler's buffer assignment; peak_memory_gb is the
        # process's high-water mark over every setting run so far.
        'compiled_peak_gb': None if memory is None else _compiled_peak_bytes(memory) / 2**30,
        # Compile and step times of a shared machine are only comparable at a known load.
        'load_average': list(os.getloadavg()) if hasattr(os, 'getloadavg') else None,
        'versions': _versions(), **extra,
    }

  def compile_twice(make_fn, make_args):
    """Compile time cold, then again from the persistent cache after dropping in-memory caches.

    `make_args` builds fresh arguments per call: the train step donates its state.
    """
    start = time.perf_counter()
    out = make_fn()(*make_args())
    jax.block_until_ready(out)
    cold = time.perf_counter() - start
    jax.clear_caches()
    start = time.perf_counter()
    out = make_fn()(*make_args())
    jax.block_until_ready(out)
    return out, cold, time.perf_counter() - start

  def compile_grad(forward, size):
    """Trace and compile seconds, compile CPU seconds and memory of jit(grad(loss)).

    Nothing but the network's forward and backward (stochastic depth and dropout on): the
    program whose compile time grows with the number of blocks. CPU seconds (this process,
    all threads) move less than wall seconds when other processes share the machine.
    """
    dtype = jnp.bfloat16 if args.dtype == 'bfloat16' else jnp.float32
    params, state = jax.eval_shape(
        lambda rng, x: forward.init(rng, x, is_training=True), jax.random.PRNGKey(0),
        jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32))

    def loss(p, images):
      cast = lambda tree: jax.tree.map(lambda v: v.astype(dtype), tree)
      outputs, _ = forward.apply(cast(p), state, jax.random.PRNGKey(0), images.astype(dtype),
                                 is_training=True)
      return jnp.mean(outputs['logits'].astype(jnp.float32))

    images = jax.ShapeDtypeStruct((args.batch, size, size, 3), jnp.float32)
    start = time.perf_counter()
    lowered = jax.jit(jax.grad(loss)).lower(params, images)
    traced, cpu = time.perf_counter(), time.process_time()
    memory = lowered.compile().memory_analysis()
    return (traced - start, time.perf_counter() - traced, time.process_time() - cpu, memory)

  if args.compile_only and 'grad' in programs:
    # The first compile of a process also pays one-off start-up costs (LLVM, thread pools):
    # spend them on a tiny net, so that they are not charged to the first measured variant.
    compile_grad(registry.make_forward('NFNet', 10, variant=TINY_VARIANT), 32)

  for variant_name in args.variant.split(','):
    variant = TINY_VARIANT if variant_name == 'tiny' else variant_name
    num_classes = 10 if variant_name == 'tiny' else 1000
    spec = registry.resolve_kwargs('NFNet', {'variant': variant})['variant']
    train_size = args.image_size or spec.train_imsize
    eval_size = args.eval_image_size or spec.test_imsize

    if 'train' in args.modes:
      data = batch = None  # Only the train step needs data (MixUp needs an even batch).
      if not args.compile_only or 'step' in programs:
        data = _data_options(args, spec, train_size)
        rng = np.random.default_rng(0)
        inputs = args.batch * data.inputs_per_example
        batch = mesh_lib.global_batch({
            'images': rng.integers(0, 256, size=(inputs, train_size, train_size, 3),
                                   dtype=np.uint8),
            'labels': rng.integers(0, num_classes, size=(inputs,)).astype(np.int32)}, mesh)
      macs = None
      for remat in args.remat.split(','):
        for scan in scans:
          # The paper's regularisers are on: their cost is part of the real step.
          forward = registry.make_forward('NFNet', num_classes, variant=variant,
                                          stochdepth_rate=0.25, remat=remat, scan_blocks=scan)
          setting = f'{variant_name} batch {args.batch} {train_size}px remat={remat} scan={scan}'
          # Scanning changes nothing the count sees (init traces every block).
          macs = macs or flops.count_macs(forward, train_size)
          if args.compile_only and 'grad' in programs:
            traced, compiled, cpu, memory = compile_grad(forward, train_size)
            records.append(record(variant_name, 'train', train_size, None, compiled, None, macs,
                                  memory, program='grad', trace_seconds=traced,
                                  compile_cpu_seconds=cpu, remat=remat, scan_blocks=scan,
                                  compile_only=True))
            save(records[-1])
            print(f'{setting} grad: trace {traced:.1f} s, compile {compiled:.1f} s '
                  f'({cpu:.1f} CPU s)', flush=True)
          if args.compile_only and 'step' not in programs:
            continue
          optimizer, schedule = optim.build_optimizer(None, batch_size=args.batch,
                                                      steps_per_epoch=1000, total_steps=100000)
          host_state = jax.device_get(state_lib.init_train_state(
              forward, optimizer, 0, (train_size, train_size, 3)))
          for accum in [int(k) for k in args.accum.split(',')]:
            def make_step():
              return step_lib.make_train_step(
                  forward, optimizer, schedule, _train_options(args, accum), num_classes,
                  ema_decay=0.99999, augment=augment_batch.make_augment(data),
                  accum_steps=accum, mesh=mesh)
            if args.compile_only:  # Memory of each setting, e.g. for F0 on a CPU in minutes.
              start = time.perf_counter()
              memory = make_step().lower(mesh_lib.replicate(host_state, mesh),
                                         batch).compile().memory_analysis()
              records.append(record(variant_name, 'train', train_size, None,
                                    time.perf_counter() - start, None, macs, memory,
                                    program='step', accum_steps=accum, remat=remat,
                                    scan_blocks=scan, augment=args.augment, compile_only=True))
              save(records[-1])
              print(f'{setting} k={accum} step: compile {records[-1]["compile_seconds"]:.1f} s, '
                    f'{_compiled_peak_bytes(memory) / 2**30:.2f} GB', flush=True)
              continue
            # The step donates its state: thread it through every call.
            holder = {}
            (holder['state'], _), cold, cached = compile_twice(
                make_step, lambda: (mesh_lib.replicate(host_state, mesh), batch))
            step = make_step()
            flags = step.host_flags()  # none set: the step's plain path
            compiled = step.lower(holder['state'], batch).compile()
            memory = compiled.memory_analysis()

            def one_step():
              holder['state'], metrics = compiled(holder['state'], batch, flags)
              return metrics
            ms = _median_ms(one_step, jax.block_until_ready, args.steps, args.warmup)
            records.append(record(variant_name, 'train', train_size, ms, cold, cached, macs,
                                  memory, accum_steps=accum, remat=remat, scan_blocks=scan,
                                  augment=args.augment))
            save(records[-1])

    if 'eval' in args.modes:
      for scan in scans:
        forward = registry.make_forward('NFNet', num_classes, variant=variant, scan_blocks=scan)
        params, fstate = jax.jit(lambda r, x: forward.init(r, x, is_training=False))(
            jax.random.PRNGKey(0), jnp.zeros((1, eval_size, eval_size, 3)))
        images = jnp.asarray(np.random.default_rng(1).normal(
            size=(args.batch, eval_size, eval_size, 3)).astype(np.float32))

        def make_eval():
          return jax.jit(
              lambda p, s, x: forward.apply(p, s, None, x, is_training=False)[0]['logits'])
        _, cold, cached = compile_twice(make_eval, lambda: (params, fstate, images))
        eval_fn = make_eval()
        memory = eval_fn.lower(params, fstate, images).compile().memory_analysis()
        ms = _median_ms(lambda: eval_fn(params, fstate, images), jax.block_until_ready,
                        args.steps, args.warmup)
        macs = flops.count_macs(forward, eval_size)
        records.append(record(variant_name, 'eval', eval_size, ms, cold, cached, macs, memory,
                              scan_blocks=scan))
        save(records[-1])
  return records


def bench_timm(args: argparse.Namespace, info: Dict[str, Any], ours: List[Dict[str, Any]],
               save: Callable[[Dict[str, Any]], None]) -> List[Dict[str, Any]]:
  """timm's dm_nfnet at the same settings: SGD-Nesterov + timm's AGC for the train step."""
  import torch  # pylint: disable=g-import-not-at-top
  import timm  # pylint: disable=g-import-not-at-top
  from timm.utils import agc as timm_agc  # pylint: disable=g-import-not-at-top

  if args.variant == 'tiny' or not args.variant.startswith('F') or args.variant.endswith('+'):
    print(f'timm has no dm_nfnet for variant {args.variant!r}; skipping timm.', file=sys.stderr)
    return []
  dev = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
  model = timm.create_model(f'dm_nfnet_{args.variant.lower()}', pretrained=False).to(dev)
  model = model.to(memory_format=torch.channels_last)
  run = torch.compile(model) if args.timm_compile else model
  autocast = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=args.dtype == 'bfloat16')
  sync = (lambda _: torch.cuda.synchronize()) if dev.type == 'cuda' else (lambda _: None)
  opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=2e-5)
  head = list(model.head.fc.parameters())
  clipped = [p for p in model.parameters() if all(p is not h for h in head)]
  records = []
  # One timm run per (mode, size): our accumulation / remat / scan settings have no timm twin.
  for ours_record in {(r['mode'], r['image_size']): r for r in reversed(ours)}.values():
    mode, size = ours_record['mode'], ours_record['image_size']
    x = torch.randn(args.batch, 3, size, size, device=dev).to(memory_format=torch.channels_last)
    y = torch.randint(0, 1000, (args.batch,), device=dev)
    if dev.type == 'cuda':
      torch.cuda.reset_peak_memory_stats()
    if mode == 'train':
      model.train()

      def step():
        with autocast:
          loss = torch.nn.functional.cross_entropy(run(x), y, label_smoothing=0.1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        timm_agc.adaptive_clip_grad(clipped, 0.01)
        opt.step()
        return loss
    else:
      model.eval()

      def step():
        with torch.no_grad():
          return run(x)
    start = time.perf_counter()
    sync(step())
    first = time.perf_counter() - start
    ms = _median_ms(step, sync, args.steps, args.warmup)
    peak = torch.cuda.max_memory_allocated() / 2**30 if dev.type == 'cuda' else None
    record = dict(ours_record)
    record.update({
        'implementation': 'timm dm_nfnet' + (' (torch.compile)' if args.timm_compile else ' (eager)'),
        'images_per_second': args.batch / (ms / 1e3), 'ms_per_step': ms,
        'dtype': args.dtype if mode == 'train' else 'float32',
        'mfu': None if ours_record['mfu'] is None else ours_record['mfu'] * ours_record['ms_per_step'] / ms,
        'peak_memory_gb': peak, 'compile_seconds': first, 'compile_seconds_cached': None,
        'compiled_temp_gb': None, 'compiled_peak_gb': None,
        'load_average': list(os.getloadavg()) if hasattr(os, 'getloadavg') else None,
    })
    for ours_only in ('accum_steps', 'remat', 'scan_blocks', 'augment'):
      record.pop(ours_only, None)
    records.append(record)
    save(record)
  return records


def _on_off(flag: Optional[bool]) -> str:
  return '-' if flag is None else 'on' if flag else 'off'


def _compile_table(records: List[Dict[str, Any]]) -> str:
  """Compile seconds per variant and setting, and as a multiple of the first variant's."""
  header = f"{'variant':8s} {'program':7s} {'remat':5s} {'scan':4s} {'trace s':>8s} " \
           f"{'compile s':>10s} {'x first':>8s} {'CPU s':>7s}"
  lines = [header, '-' * len(header)]
  first = {}
  for r in records:
    key = (r.get('program'), r.get('remat'), r.get('scan_blocks'), r.get('accum_steps'))
    first.setdefault(key, r['compile_seconds'])
    trace, cpu = r.get('trace_seconds'), r.get('compile_cpu_seconds')
    lines.append(f"{r['variant']:8s} {r.get('program') or '-':7s} {r.get('remat') or '-':5s} "
                 f"{_on_off(r.get('scan_blocks')):4s} "
                 f"{'-' if trace is None else format(trace, '8.1f'):>8s} "
                 f"{r['compile_seconds']:10.1f} {r['compile_seconds'] / first[key]:8.2f} "
                 f"{'-' if cpu is None else format(cpu, '7.1f'):>7s}")
  return '\n'.join(lines)


def _table(records: List[Dict[str, Any]]) -> str:
  header = f"{'implementation':34s} {'mode':5s} {'k':>2s} {'remat':5s} {'scan':4s} " \
           f"{'batch':>5s} {'px':>4s} {'img/s':>9s} {'ms/step':>9s} {'MFU':>6s} {'prog GB':>8s} " \
           f"{'compile s':>10s} {'cached s':>9s}"
  lines = [header, '-' * len(header)]
  fmt = lambda v, spec: '-' if v is None else format(v, spec)
  for r in records:
    lines.append(f"{r['implementation']:34s} {r['mode']:5s} {fmt(r.get('accum_steps'), '2d')} "
                 f"{r.get('remat') or '-':5s} {_on_off(r.get('scan_blocks')):4s} "
                 f"{r['batch']:5d} {r['image_size']:4d} "
                 f"{r['images_per_second']:9.1f} {r['ms_per_step']:9.1f} {fmt(r['mfu'], '6.1%')} "
                 f"{fmt(r.get('compiled_peak_gb') or r['peak_memory_gb'], '8.2f')} "
                 f"{fmt(r['compile_seconds'], '10.1f')} {fmt(r['compile_seconds_cached'], '9.1f')}")
  ours = {}
  for r in records:  # Our first setting per (mode, size) is the one timm ran at.
    if r['implementation'].startswith('nfnets'):
      ours.setdefault((r['mode'], r['image_size']), r)
  for r in records:
    mine = ours.get((r['mode'], r['image_size']))
    if r['implementation'].startswith('timm') and mine:
      ratio = mine['images_per_second'] / r['images_per_second']
      lines.append(f"{r['mode']} {r['image_size']}px: nfnets / {r['implementation']} = {ratio:.2f}x")
  return '\n'.join(lines)


def main(argv: Optional[List[str]] = None) -> List[Dict[str, Any]]:
  args = _parse_args(sys.argv[1:] if argv is None else argv)
  # A fresh persistent cache per run: the first compile is cold, the second reads the cache.
  import jax  # pylint: disable=g-import-not-at-top
  jax.config.update('jax_compilation_cache_dir', tempfile.mkdtemp(prefix='nfnets_bench_cache_'))
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)
  jax.config.update('jax_persistent_cache_min_entry_size_bytes', -1)
  if args.compile_only:
    # Every compile is a cold one: two settings may build the same program (scan_blocks on a
    # net without repeated blocks), and the second must not read the first from the cache.
    jax.config.update('jax_enable_compilation_cache', False)
  info = _device_info()
  os.makedirs(args.out, exist_ok=True)
  stamp = datetime.datetime.now().strftime('%Y-%m-%dT%H%M%S')
  name = ''.join(c if c.isalnum() else '_' for c in info['device'])[:40]
  variants = args.variant.replace('+', 'plus').replace(',', '-')
  path = os.path.join(args.out, f'{stamp}_{name}_{variants}.json')
  saved = []

  def save(record: Dict[str, Any]) -> None:
    saved.append(record)
    with open(path + '.tmp', 'w') as f:
      json.dump(saved, f, indent=1)
    os.replace(path + '.tmp', path)

  records = bench_nfnets(args, info, save)
  if args.compile_only:
    print(_compile_table([r for r in records if r.get('compile_only')]))
    print(f'wrote {path}')
    return saved
  if args.timm:
    records += bench_timm(args, info, records, save)
  print(_table(records))
  print(f'wrote {path}')
  return records


if __name__ == '__main__':
  main()
