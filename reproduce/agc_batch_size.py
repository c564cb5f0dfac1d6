"""AGC lets NF-ResNets train at large batch sizes (NFNets paper, Fig. 3), at MNIST-5k scale.

The paper trains NF-ResNet-50/200 on ImageNet at batch sizes 256..4096 with the linear
scaling rule lr = 0.1 * B / 256 (1.6 at 4096): without AGC the largest batches fail, with AGC
(lambda in {0.01, ..., 0.16}) they train, and larger batches want a smaller lambda.

Here: a one-block-per-stage NF-ResNet on the 4,000 real MNIST digits of `mnist5k`, the same
epochs at every batch size, lr = base_lr * B / 256 with warm-up + cosine, Nesterov SGD, and
lambda in {no AGC, 0.01, 0.02, 0.04, 0.08, 0.16}. base_lr is 0.2, twice the paper's 0.1
(lr 0.1..0.8 for B = 128..1024). Measured while choosing it: base 0.4 already diverged without
AGC at B = 128 (lr 0.2), and base 0.1 barely trained in 3 epochs at B = 128 (lr 0.05, ~15%).

Skip gains are left out of the clip (the one departure from the paper's recipe, which clips
everything but the classifier weight). Every NF block's `skip_gain` starts at 0 (SkipInit), and
AGC caps a zero weight's gradient at lambda * eps = lambda * 1e-3, so it can grow by at most
lr * lambda * 1e-3 per step (times the momentum gain). Over the paper's >100k steps that
start-up cost vanishes; over this study's 30-190 steps the residual branches never switch on.
Measured 2026-11-27 (2 CPU cores, B = 128, lr 0.1, 6 epochs, mean of 3 seeds): clipping the
skip gains gives 15.8 % (lambda 0.01) and 17.5 % (0.16) test top-1; leaving them out gives
78.0 % and 91.8 %.
`--clip-skip-gains` runs the paper-exact exclusions for comparison.

Cost control: the train step is compiled once per batch size and reused for every lambda,
because lambda lives in the optimizer state (`optax.inject_hyperparams`), not in the program.
"No AGC" is the same program with lambda = inf, which is exactly the identity on finite
gradients (AGC keeps g unchanged when ||g|| < lambda * ||w||). Training batches are produced
once per batch size by `build_train_iterator` and shared by all lambdas, and every run starts
from the same initial weights, so runs differ only in lambda.

Command:  python -m reproduce.agc_batch_size [--quick] [--clip-skip-gains] [--data-dir DIR]
Writes:   reproduce/results/<name>.json / .md and reproduce/figures/<name>.png, where <name> is
          agc_batch_size, with '_skip_gains_clipped' and/or '_quick' appended.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time
from collections.abc import Sequence
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from nfnets.augment import batch as augment_batch
from nfnets.data.options import DataOptions
from nfnets.models import registry
from nfnets.models.variants import ResNetVariant
from nfnets.train import agc as agc_lib
from nfnets.train import evaluation
from nfnets.train import loop
from nfnets.train import mesh as mesh_lib
from nfnets.train import optim
from nfnets.train import state as state_lib
from nfnets.train import step as step_lib
from nfnets.train.options import AGCOptions, OptimizerOptions, TrainOptions
from reproduce import outputs

NO_AGC = None  # The clipping value that stands for "trained without AGC".
SKIP_GAINS = '*/skip_gain'  # Every NF block's zero-initialised residual-branch gain.


@dataclasses.dataclass(frozen=True)
class StudyConfig:
  """One AGC-vs-batch-size study.

  Attributes:
    batch_sizes: Global batch sizes, ascending.
    clippings: AGC lambdas; `NO_AGC` (None) for the run without clipping.
    epochs: Training epochs at every batch size (the paper also fixes epochs, not steps).
    base_lr: lr per 256 examples; the peak lr at batch B is base_lr * B / 256.
    warmup_epochs: Linear warm-up before the cosine decay.
    width: NF-ResNet width multiplier (stage widths width * (64, 128, 256, 512)).
    depth: Blocks per stage.
    image_size: Input resolution (MNIST digits are 28 px).
    weight_decay: Coupled L2 on weights (not gains, biases or skip gains).
    seeds: One run per seed (initial weights and data order) for every (batch, lambda):
      near the stability edge single runs disagree wildly (no AGC at B = 256: 77.2 %,
      31.9 %, diverged), so the table reports the spread.
    agc_exclude: Parameters AGC leaves alone (`nfnets.agc` patterns). Default: the classifier
      weight, as in the paper, and the zero-initialised skip gains (see the module docstring).
  """
  batch_sizes: tuple[int, ...] = (128, 256, 512, 1024)
  clippings: tuple[Optional[float], ...] = (NO_AGC, 0.01, 0.02, 0.04, 0.08, 0.16)
  epochs: float = 6.0
  base_lr: float = 0.2
  warmup_epochs: float = 1.0
  width: float = 0.5
  depth: tuple[int, ...] = (1, 1, 1, 1)
  image_size: int = 28
  weight_decay: float = 5e-5
  seeds: tuple[int, ...] = (0, 1, 2)
  agc_exclude: tuple[str, ...] = (agc_lib.CLASSIFIER_WEIGHT, SKIP_GAINS)

  def __post_init__(self):
    if not self.batch_sizes or any(b < 1 for b in self.batch_sizes):
      raise ValueError(f'batch_sizes must be positive, got {self.batch_sizes}.')
    if any(c is not None and not c > 0 for c in self.clippings):
      raise ValueError(f'clippings must be > 0 or None (no AGC), got {self.clippings}.')
    if not self.seeds or len(set(self.seeds)) != len(self.seeds):
      raise ValueError(f'seeds must be distinct and non-empty, got {self.seeds}.')
    if not 0 < self.warmup_epochs < self.epochs:
      raise ValueError(f'Need 0 < warmup_epochs < epochs, got {self.warmup_epochs}, '
                       f'{self.epochs}.')

  def peak_lr(self, batch_size: int) -> float:
    return self.base_lr * batch_size / optim.LR_REFERENCE_BATCH


FULL = StudyConfig()
# The ~2-minute smoke version: seed 0 of six cells of the full table, the smallest batch and
# the one where no-AGC always diverged but AGC trained. Same epochs and warm-up as FULL, so
# its numbers are those cells' seed-0 runs (a shorter warm-up made no-AGC diverge at B=128).
QUICK = dataclasses.replace(FULL, batch_sizes=(128, 512), clippings=(NO_AGC, 0.01, 0.16),
                            seeds=(0,))
# The paper's exclusions: only the classifier weight escapes the clip.
PAPER_EXCLUDE = (agc_lib.CLASSIFIER_WEIGHT,)


def data_config(data_dir: str, image_size: int, seed: int) -> DataOptions:
  """The mnist5k data options, with the demo's light augmentation (4-px shifts)."""
  return DataOptions(name='mnist5k', data_dir=data_dir, num_classes=10, seed=seed,
                     train_split='train', eval_split='test', image_size=image_size,
                     eval_image_size=image_size, train_preproc='random_crop_pad4',
                     eval_preproc='resize_only', random_flip=False, randaugment='',
                     mixup_alpha=0.0, cutmix=False)


def make_forward(study: StudyConfig):
  """The NF-ResNet under study (no stochastic depth or dropout: short runs need neither)."""
  return registry.make_forward('NF_ResNet', 10, variant=ResNetVariant(depth=study.depth),
                               width=study.width, stochdepth_rate=0.0, drop_rate=0.0)


def make_optimizer(study: StudyConfig, clipping: Optional[float], batch_size: int,
                   steps_per_epoch: float, total_steps: int):
  """AGC with an injectable lambda, then the project's decay + Nesterov SGD chain.

  Mathematically `optim.build_optimizer` with name 'sgd_agc' (or 'sgd' for `NO_AGC`) and
  `agc.exclude = study.agc_exclude`: the chain is AGC -> masked coupled decay -> SGD; only
  lambda moves into the optimizer state so one compiled train step serves every lambda.

  Returns:
    (optimizer, schedule).
  """
  opt_config = OptimizerOptions(name='sgd', lr=study.base_lr,  # AGC is prepended below.
                                warmup_epochs=study.warmup_epochs,
                                weight_decay=study.weight_decay)
  sgd, schedule = optim.build_optimizer(opt_config, batch_size=batch_size,
                                        steps_per_epoch=steps_per_epoch,
                                        total_steps=total_steps)
  agc = optax.inject_hyperparams(agc_lib.adaptive_grad_clip, static_args=('exclude',))(
      clipping=math.inf if clipping is NO_AGC else float(clipping),
      eps=AGCOptions().eps, exclude=tuple(study.agc_exclude))
  return optax.chain(agc, sgd), schedule


def one_device_mesh():
  """The study runs on one device (its batch sizes are global and small)."""
  return mesh_lib.make_mesh(jax.devices()[:1])


def materialise(iterator, num_batches: int) -> list[dict[str, np.ndarray]]:
  """Reads `num_batches` batches once, so every lambda trains on identical data."""
  return [next(iterator) for _ in range(num_batches)]


def train_one(study: StudyConfig, step_fn, optimizer, forward, seed: int, train_batches,
              eval_step, eval_batches) -> dict[str, Any]:
  """One training run (the library's step loop); returns its accuracy, loss and clip record."""
  mesh = step_fn.mesh
  ts = state_lib.init_train_state(forward, optimizer, seed,
                                  (study.image_size, study.image_size, 1), mesh)
  start = time.time()
  losses, clipped = [], []

  def after_step(step: int, ts, metrics) -> bool:
    del ts
    metrics = mesh_lib.host_copy(metrics)
    losses.append(float(metrics['loss']))
    clipped.append(float(metrics.get('agc/fraction_clipped', 0.0)))
    # Non-finite weights cannot recover; stop instead of spending the remaining steps.
    return math.isfinite(losses[-1])

  ts, _, stopped = loop.run_steps(step_fn, ts, train_batches, 0, len(train_batches), after_step)
  diverged_at = len(losses) - 1 if stopped else None
  params = mesh_lib.host_copy(ts.params)
  state = mesh_lib.host_copy(ts.state)
  finite_params = all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(params))
  diverged = diverged_at is not None or not finite_params
  # argmax of NaN logits is meaningless: a diverged run scores chance level (10 classes).
  accuracy = 0.1 if diverged else evaluation.evaluate(
      eval_step, {'': mesh_lib.replicate((params, state), mesh)}, eval_batches,
      mesh)['top_1_acc']
  return {'seed': seed, 'steps': len(losses), 'test_top1': accuracy, 'diverged': diverged,
          'diverged_at_step': diverged_at, 'final_train_loss': losses[-1],
          'min_train_loss': float(np.nanmin(losses)),
          'mean_fraction_clipped': float(np.mean(clipped)), 'seconds': time.time() - start}


def run_batch_size(study: StudyConfig, batch_size: int, batches_by_seed, eval_step,
                   eval_batches, num_train: int, forward) -> list[dict[str, Any]]:
  """Trains every (seed, lambda) at `batch_size`, reusing one compiled train step.

  Args:
    batches_by_seed: {seed: the materialised training batches of that seed's data order};
      all lambdas of one seed train on the same batches from the same initial weights.
    eval_step: `step.make_eval_step(forward, 10)`, built once for the whole study: the
      eval batches do not depend on the training batch size, so neither does its program.
  """
  steps_per_epoch = num_train / batch_size
  total_steps = len(next(iter(batches_by_seed.values())))
  results = []
  step_fn = None
  for seed in study.seeds:
    for clipping in study.clippings:
      optimizer, schedule = make_optimizer(study, clipping, batch_size, steps_per_epoch,
                                           total_steps)
      if step_fn is None:
        # Built once: lambda is read from the optimizer state, so the program is shared.
        step_fn = step_lib.make_train_step(
            forward, optimizer, schedule, TrainOptions(label_smoothing=0.0, bfloat16=False),
            10, ema_decay=0.99, augment=augment_batch.make_augment(
                data_config('', study.image_size, 0)), mesh=one_device_mesh())
      result = {'batch_size': batch_size, 'clipping': clipping,
                'peak_lr': study.peak_lr(batch_size), 'total_steps': total_steps}
      result.update(train_one(study, step_fn, optimizer, forward, seed,
                              batches_by_seed[seed], eval_step, eval_batches))
      results.append(result)
      print(f'B={batch_size:5d} lr={result["peak_lr"]:.3f} seed={seed} '
            f'lambda={_label(clipping):>7s} top1={result["test_top1"]:.4f} '
            f'loss={result["final_train_loss"]:.4g} diverged={result["diverged"]} '
            f'clipped={result["mean_fraction_clipped"]:.3f} ({result["seconds"]:.1f} s)',
            flush=True)
  return results


def _label(clipping: Optional[float]) -> str:
  return 'no AGC' if clipping is NO_AGC else f'{clipping:g}'


def _runs(results: Sequence[dict[str, Any]], batch_size: int,
          clipping: Optional[float]) -> list[dict[str, Any]]:
  return [r for r in results if r['batch_size'] == batch_size and r['clipping'] == clipping]


def summarise_cell(runs: Sequence[dict[str, Any]]) -> str:
  """'91.4' for one run; 'mean [min-max]' over seeds; diverged runs (scored 10 %) counted."""
  if not runs:
    return 'not run'
  top1 = [100 * r['test_top1'] for r in runs]
  diverged = sum(bool(r['diverged']) for r in runs)
  if len(runs) == 1:
    return f'{top1[0]:.1f}' + (' (diverged)' if diverged else '')
  text = f'{np.mean(top1):.1f} [{min(top1):.1f}–{max(top1):.1f}]'
  return text + (f' ({diverged}/{len(runs)} diverged)' if diverged else '')


def results_table(study: StudyConfig, results: Sequence[dict[str, Any]]) -> str:
  """Markdown: one row per lambda, one column per batch size, cells from `summarise_cell`."""
  header = ['lambda'] + [f'B={b} (lr {study.peak_lr(b):g})' for b in study.batch_sizes]
  rows = [[_label(c)] + [summarise_cell(_runs(results, b, c)) for b in study.batch_sizes]
          for c in study.clippings]
  return outputs.markdown_table(header, rows)


def plot(study: StudyConfig, results: Sequence[dict[str, Any]], path) -> None:
  """Final test accuracy vs batch size, one line per lambda; x marks cells with a divergence."""
  outputs.use_agg_backend()
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(6.4, 4.2))
  colours = plt.cm.viridis(np.linspace(0.0, 0.9, len(study.clippings)))
  for colour, clipping in zip(colours, study.clippings):
    cells = [(b, _runs(results, b, clipping)) for b in study.batch_sizes]
    cells = [(b, runs) for b, runs in cells if runs]
    if not cells:
      continue
    xs = [b for b, _ in cells]
    top1 = [[100 * r['test_top1'] for r in runs] for _, runs in cells]
    ys = [float(np.mean(t)) for t in top1]
    # Bars span the seeds' min..max (zero length for a single seed).
    yerr = [[y - min(t) for y, t in zip(ys, top1)], [max(t) - y for y, t in zip(ys, top1)]]
    style = dict(color='black', linestyle='--') if clipping is NO_AGC else dict(color=colour)
    ax.errorbar(xs, ys, yerr=yerr, marker='o', capsize=3, label=_label(clipping)
                if clipping is NO_AGC else f'AGC λ={clipping:g}', **style)
    bad = [(x, y) for x, y, (_, runs) in zip(xs, ys, cells) if any(r['diverged'] for r in runs)]
    if bad:
      ax.scatter(*zip(*bad), marker='x', s=90, color='red', zorder=5)
  ax.set_xscale('log', base=2)
  ax.set_xticks(list(study.batch_sizes), [str(b) for b in study.batch_sizes])
  ax.set_xlabel('batch size (lr = %g × B / 256)' % study.base_lr)
  ax.set_ylabel('MNIST-5k test top-1 (%)')
  clipped = 'skip gains clipped' if SKIP_GAINS not in study.agc_exclude else 'skip gains unclipped'
  spread = ('one seed' if len(study.seeds) == 1
            else f'mean and min-max over {len(study.seeds)} seeds')
  ax.set_title(f'NF-ResNet, {study.epochs:g} epochs, {clipped}; {spread};\n'
               'red x = a seed diverged (scored as chance, 10 %)', fontsize=9)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--quick', action='store_true', help='~2-minute smoke version')
  parser.add_argument('--data-dir', default='workdirs/tfds',
                      help='TFDS data dir; mnist5k is built there on first use')
  parser.add_argument('--replot', action='store_true',
                      help='only rebuild the table and figure from the saved JSON (e.g. of a '
                      'run cut short: it is saved after every batch size)')
  parser.add_argument('--clip-skip-gains', action='store_true',
                      help="the paper's exclusions: clip the zero-initialised skip gains too")
  args = parser.parse_args(argv)
  study = QUICK if args.quick else FULL
  name = 'agc_batch_size'
  if args.clip_skip_gains:
    study = dataclasses.replace(study, agc_exclude=PAPER_EXCLUDE)
    name += '_skip_gains_clipped'
  if args.quick:
    name += '_quick'
  if args.replot:
    saved = json.loads((outputs.RESULTS_DIR / f'{name}.json').read_text())
    return write_summary(study_from_dict(saved['study']), name, saved)
  # Imported here: TensorFlow is heavy and only this script needs the input pipeline.
  from nfnets.data import pipeline  # pylint: disable=g-import-not-at-top

  begin = time.time()
  dconfig = data_config(args.data_dir, study.image_size, study.seeds[0])
  num_train = pipeline.dataset_info(dconfig).num_train
  eval_batches = list(pipeline.build_eval_iterator(
      dconfig, global_batch_size=500, host_index=0, host_count=1))
  forward = make_forward(study)
  eval_step = step_lib.make_eval_step(forward, 10, mesh=one_device_mesh())
  results = []
  payload = {'study': dataclasses.asdict(study), 'machine': outputs.machine_note(),
             'results': results}
  for batch_size in study.batch_sizes:
    t0 = time.time()
    steps = math.ceil(study.epochs * num_train / batch_size)
    batches_by_seed = {seed: materialise(pipeline.build_train_iterator(
        data_config(args.data_dir, study.image_size, seed), global_batch_size=batch_size,
        rows=(0, batch_size)), steps) for seed in study.seeds}
    print(f'B={batch_size}: {steps} steps x {len(study.seeds)} seeds, data ready in '
          f'{time.time() - t0:.1f} s', flush=True)
    results.extend(run_batch_size(study, batch_size, batches_by_seed, eval_step, eval_batches,
                                  num_train, forward))
    payload['seconds_so_far'] = time.time() - begin
    outputs.write_json(name, payload)  # After each batch size, so a timeout keeps results.
  payload['total_seconds'] = time.time() - begin
  outputs.write_json(name, payload)
  return write_summary(study, name, payload)


def study_from_dict(saved: dict[str, Any]) -> StudyConfig:
  """The StudyConfig of a results JSON (lists back to tuples; old files had one 'seed')."""
  fields = {k: tuple(v) if isinstance(v, list) else v for k, v in saved.items()}
  if 'seed' in fields:
    fields['seeds'] = (fields.pop('seed'),)
  return StudyConfig(**fields)


def write_summary(study: StudyConfig, name: str, payload: dict[str, Any]) -> dict[str, Any]:
  """Writes the Markdown table and the figure from a results payload, and prints the table."""
  results = payload['results']
  seconds = payload.get('total_seconds', payload.get('seconds_so_far', float('nan')))
  table = results_table(study, results)
  outputs.write_markdown(name, f'MNIST-5k test top-1 (%), NF-ResNet width {study.width}, '
                         f'depth {study.depth}, {study.epochs:g} epochs, '
                         f'seeds {", ".join(map(str, study.seeds))}, AGC excludes '
                         f'{", ".join(study.agc_exclude)}; '
                         f'{seconds:.0f} s on {payload["machine"]}.\n\n' + table)
  outputs.FIGURES_DIR.mkdir(parents=True, exist_ok=True)
  plot(study, results, outputs.FIGURES_DIR / f'{name}.png')
  print(table)
  print(f'Total {seconds:.1f} s')
  return payload


if __name__ == '__main__':
  main()
