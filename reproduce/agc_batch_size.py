"""AGC lets NF-ResNets train at large batch sizes (NFNets paper, Fig. 3), at MNIST-5k scale.

The paper trains NF-ResNet-50/200 on ImageNet at batch sizes 256..4096 with the linear
scaling rule lr = 0.1 * B / 256 (1.6 at 4096): without AGC the largest batches fail, with AGC
(lambda in {0.01, ..., 0.16}) they train, and larger batches want a smaller lambda.

Here: a one-block-per-stage NF-ResNet on the 4,000 real MNIST digits of `mnist5k`, the same
epochs at every batch size, lr = base_lr * B / 256 with warm-up + cosine, Nesterov SGD, and
lambda in {no AGC, 0.01, 0.02, 0.04, 0.08, 0.16}. base_lr is 0.2, twice the paper's 0.1
(lr 0.1..0.8 for B = 128..1024). Measured while choosing it: base 0.4 already diverged without
AGC at B = 128 (lr 0.2), and base 0.1 barely trained in 3 epochs at B = 128 (lr 0.05, ~15%).

Cost control: the train step is compiled once per batch size and reused for every lambda,
because lambda lives in the optimizer state (`optax.inject_hyperparams`), not in the program.
"No AGC" is the same program with lambda = inf, which is exactly the identity on finite
gradients (AGC keeps g unchanged when ||g|| < lambda * ||w||). Training batches are produced
once per batch size by `build_train_iterator` and shared by all lambdas, and every run starts
from the same initial weights, so runs differ only in lambda.

Command:  python -m reproduce.agc_batch_size [--quick] [--data-dir workdirs/tfds]
Writes:   reproduce/results/agc_batch_size{,_quick}.json / .md,
          reproduce/figures/agc_batch_size{,_quick}.png
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
import ml_collections
import numpy as np
import optax

from nfnets import agc as agc_lib
from nfnets import models, optim, training
from nfnets.resnet import ResNetVariant
from reproduce import outputs

NO_AGC = None  # The clipping value that stands for "trained without AGC".


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
    seed: Seed of the initial weights and of the data order.
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
  seed: int = 0

  def __post_init__(self):
    if not self.batch_sizes or any(b < 1 for b in self.batch_sizes):
      raise ValueError(f'batch_sizes must be positive, got {self.batch_sizes}.')
    if any(c is not None and not c > 0 for c in self.clippings):
      raise ValueError(f'clippings must be > 0 or None (no AGC), got {self.clippings}.')
    if not 0 < self.warmup_epochs < self.epochs:
      raise ValueError(f'Need 0 < warmup_epochs < epochs, got {self.warmup_epochs}, '
                       f'{self.epochs}.')

  def peak_lr(self, batch_size: int) -> float:
    return self.base_lr * batch_size / optim.LR_REFERENCE_BATCH


FULL = StudyConfig()
# The ~2-minute smoke version: the smallest and largest batch, three lambdas, fewer epochs.
QUICK = dataclasses.replace(FULL, batch_sizes=(128, 1024), clippings=(NO_AGC, 0.01, 0.16),
                            epochs=3.0, warmup_epochs=0.5)


def data_config(data_dir: str, image_size: int, seed: int) -> ml_collections.ConfigDict:
  """The mnist5k section of a config, with the demo's light augmentation (4-px shifts)."""
  return ml_collections.ConfigDict({
      'name': 'mnist5k', 'data_dir': data_dir, 'num_classes': 10, 'seed': seed,
      'train_split': 'train', 'eval_split': 'test',
      'image_size': image_size, 'eval_image_size': image_size,
      'train_preproc': 'random_crop_pad4', 'eval_preproc': 'resize_only',
      'random_flip': False, 'randaugment': '', 'mixup_alpha': 0.0, 'cutmix': False})


def make_forward(study: StudyConfig):
  """The NF-ResNet under study (no stochastic depth or dropout: short runs need neither)."""
  return models.make_forward('NF_ResNet', 10, variant=ResNetVariant(depth=study.depth),
                             width=study.width, stochdepth_rate=0.0, drop_rate=0.0)


def make_optimizer(study: StudyConfig, clipping: Optional[float], batch_size: int,
                   steps_per_epoch: float, total_steps: int):
  """AGC with an injectable lambda, then the project's decay + Nesterov SGD chain.

  Mathematically `optim.build_optimizer` with name 'sgd_agc' (or 'sgd' for `NO_AGC`): the
  chain is AGC -> masked coupled decay -> SGD; only lambda moves into the optimizer state so
  one compiled train step serves every lambda.

  Returns:
    (optimizer, schedule).
  """
  opt_config = optim.default_config()
  opt_config.name = 'sgd'  # AGC is prepended below, with lambda as state.
  opt_config.lr = study.base_lr
  opt_config.warmup_epochs = study.warmup_epochs
  opt_config.weight_decay = study.weight_decay
  sgd, schedule = optim.build_optimizer(opt_config, batch_size=batch_size,
                                        steps_per_epoch=steps_per_epoch,
                                        total_steps=total_steps)
  agc = optax.inject_hyperparams(agc_lib.adaptive_grad_clip, static_args=('exclude',))(
      clipping=math.inf if clipping is NO_AGC else float(clipping),
      eps=opt_config.agc.eps, exclude=tuple(opt_config.agc.exclude))
  return optax.chain(agc, sgd), schedule


def materialise(iterator, num_batches: int) -> list[dict[str, np.ndarray]]:
  """Reads `num_batches` batches once, so every lambda trains on identical data."""
  return [next(iterator) for _ in range(num_batches)]


def evaluate(eval_step, params, state, eval_batches) -> float:
  """Top-1 accuracy over the whole test split (padding excluded)."""
  correct = count = 0.0
  for batch in eval_batches:
    sums = training.unreplicate(eval_step(params, state, batch))
    correct += float(sums['top_1_correct'])
    count += float(sums['count'])
  return correct / count


def run_batch_size(study: StudyConfig, batch_size: int, train_batches, eval_batches,
                   num_train: int, forward) -> list[dict[str, Any]]:
  """Trains one run per lambda at `batch_size`, reusing one compiled train step."""
  steps_per_epoch = num_train / batch_size
  total_steps = len(train_batches)
  results = []
  step_fn = None
  eval_step = training.make_eval_step(forward, 10)
  for clipping in study.clippings:
    optimizer, schedule = make_optimizer(study, clipping, batch_size, steps_per_epoch,
                                         total_steps)
    if step_fn is None:
      # Built once: lambda is read from the optimizer state, so the program is shared.
      step_fn = training.make_train_step(forward, optimizer, schedule,
                                         ml_collections.ConfigDict({'label_smoothing': 0.0}),
                                         10, ema_decay=0.99)
    # Same seed for every lambda: identical initial weights.
    ts = training.replicate(training.init_train_state(
        forward, optimizer, study.seed, (study.image_size, study.image_size, 1)))
    start = time.time()
    losses, clipped, diverged_at = [], [], None
    for step, batch in enumerate(train_batches):
      ts, metrics = step_fn(ts, batch)
      metrics = training.unreplicate(metrics)
      loss = float(metrics['loss'])
      losses.append(loss)
      clipped.append(float(metrics.get('agc/fraction_clipped', 0.0)))
      if not math.isfinite(loss):
        # Non-finite weights cannot recover; stop instead of spending the remaining steps.
        diverged_at = step
        break
    params = training.unreplicate(ts.params)
    state = training.unreplicate(ts.state)
    finite_params = all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(params))
    diverged = diverged_at is not None or not finite_params
    # argmax of NaN logits is meaningless: a diverged run scores chance level (10 classes).
    accuracy = 0.1 if diverged else evaluate(eval_step, training.replicate(params),
                                             training.replicate(state), eval_batches)
    result = {
        'batch_size': batch_size, 'clipping': clipping, 'peak_lr': study.peak_lr(batch_size),
        'steps': len(losses), 'total_steps': total_steps, 'test_top1': accuracy,
        'diverged': diverged, 'diverged_at_step': diverged_at,
        'final_train_loss': losses[-1], 'min_train_loss': float(np.nanmin(losses)),
        'mean_fraction_clipped': float(np.mean(clipped)), 'seconds': time.time() - start}
    results.append(result)
    print(f'B={batch_size:5d} lr={result["peak_lr"]:.3f} lambda={_label(clipping):>7s} '
          f'top1={accuracy:.4f} loss={losses[-1]:.4g} diverged={diverged} '
          f'clipped={result["mean_fraction_clipped"]:.3f} ({result["seconds"]:.1f} s)',
          flush=True)
  return results


def _label(clipping: Optional[float]) -> str:
  return 'no AGC' if clipping is NO_AGC else f'{clipping:g}'


def results_table(study: StudyConfig, results: Sequence[dict[str, Any]]) -> str:
  """Markdown: one row per lambda, one column per batch size; '(diverged)' marks failures."""
  header = ['lambda'] + [f'B={b} (lr {study.peak_lr(b):g})' for b in study.batch_sizes]
  rows = []
  for clipping in study.clippings:
    row = [_label(clipping)]
    for b in study.batch_sizes:
      match = [r for r in results if r['batch_size'] == b and r['clipping'] == clipping]
      if not match:
        row.append('not run')
      else:
        r = match[0]
        row.append(f'{100 * r["test_top1"]:.1f}' + (' (diverged)' if r['diverged'] else ''))
    rows.append(row)
  return outputs.markdown_table(header, rows)


def plot(study: StudyConfig, results: Sequence[dict[str, Any]], path) -> None:
  """Final test accuracy vs batch size, one line per lambda; x marks diverged runs."""
  outputs.use_agg_backend()
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(6.4, 4.2))
  colours = plt.cm.viridis(np.linspace(0.0, 0.9, len(study.clippings)))
  for colour, clipping in zip(colours, study.clippings):
    runs = sorted((r for r in results if r['clipping'] == clipping),
                  key=lambda r: r['batch_size'])
    if not runs:
      continue
    xs = [r['batch_size'] for r in runs]
    ys = [100 * r['test_top1'] for r in runs]
    style = dict(color='black', linestyle='--') if clipping is NO_AGC else dict(color=colour)
    ax.plot(xs, ys, marker='o', label=_label(clipping) if clipping is NO_AGC
            else f'AGC λ={clipping:g}', **style)
    bad = [(x, y) for x, y, r in zip(xs, ys, runs) if r['diverged']]
    if bad:
      ax.scatter(*zip(*bad), marker='x', s=90, color='red', zorder=5)
  ax.set_xscale('log', base=2)
  ax.set_xticks(list(study.batch_sizes), [str(b) for b in study.batch_sizes])
  ax.set_xlabel('batch size (lr = %g × B / 256)' % study.base_lr)
  ax.set_ylabel('MNIST-5k test top-1 (%)')
  ax.set_title(f'NF-ResNet, {study.epochs:g} epochs; red x = diverged (chance)')
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
  args = parser.parse_args(argv)
  study = QUICK if args.quick else FULL
  name = 'agc_batch_size_quick' if args.quick else 'agc_batch_size'
  if args.replot:
    saved = json.loads((outputs.RESULTS_DIR / f'{name}.json').read_text())
    return write_summary(study, name, saved)
  # Imported here: TensorFlow is heavy and only this script needs the input pipeline.
  from nfnets import data as data_lib  # pylint: disable=g-import-not-at-top

  begin = time.time()
  dconfig = data_config(args.data_dir, study.image_size, study.seed)
  num_train, _, _ = data_lib.dataset_info(dconfig)
  eval_batches = list(data_lib.build_eval_iterator(
      dconfig, global_batch_size=500, host_index=0, host_count=1, local_device_count=1))
  forward = make_forward(study)
  results = []
  payload = {'study': dataclasses.asdict(study), 'machine': outputs.machine_note(),
             'results': results}
  for batch_size in study.batch_sizes:
    t0 = time.time()
    steps = math.ceil(study.epochs * num_train / batch_size)
    train_batches = materialise(data_lib.build_train_iterator(
        dconfig, global_batch_size=batch_size, host_index=0, host_count=1,
        local_device_count=1), steps)
    print(f'B={batch_size}: {steps} steps, data ready in {time.time() - t0:.1f} s', flush=True)
    results.extend(run_batch_size(study, batch_size, train_batches, eval_batches, num_train,
                                  forward))
    payload['seconds_so_far'] = time.time() - begin
    outputs.write_json(name, payload)  # After each batch size, so a timeout keeps results.
  payload['total_seconds'] = time.time() - begin
  outputs.write_json(name, payload)
  return write_summary(study, name, payload)


def write_summary(study: StudyConfig, name: str, payload: dict[str, Any]) -> dict[str, Any]:
  """Writes the Markdown table and the figure from a results payload, and prints the table."""
  results = payload['results']
  seconds = payload.get('total_seconds', payload.get('seconds_so_far', float('nan')))
  table = results_table(study, results)
  outputs.write_markdown(name, f'MNIST-5k test top-1 (%), NF-ResNet width {study.width}, '
                         f'depth {study.depth}, {study.epochs:g} epochs; '
                         f'{seconds:.0f} s on {payload["machine"]}.\n\n' + table)
  outputs.FIGURES_DIR.mkdir(parents=True, exist_ok=True)
  plot(study, results, outputs.FIGURES_DIR / f'{name}.png')
  print(table)
  print(f'Total {seconds:.1f} s')
  return payload


if __name__ == '__main__':
  main()
