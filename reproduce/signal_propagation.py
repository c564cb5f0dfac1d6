"""Signal Propagation Plots at initialisation (NF-ResNet paper, Fig. 1 / NFNets paper, Fig. 1).

Feeds N(0, 1) noise to untrained networks and plots, per residual block, the average channel
squared mean, the average channel variance and the residual-branch variance, for

* a BatchNorm pre-activation ResNet-50 (v2), with training-mode (batch) statistics;
* an NF-ResNet-50 with every skip gain set to 1 (the paper's SPP; the official init is 0);
* an NFNet-F0 (full width by default; `--nfnet-width 0.25` for a narrower, faster one),
  twice: with skip gains set to 1, and with skip gains as initialised (0, SkipInit).

Why two NFNet lines: NF blocks compute x + alpha * skip_gain * f(...), and skip_gain starts at
0, so at initialisation every residual branch is switched off: the skip-path variance is then
flat within a stage (exactly) and only the transition convs change it. The branches are still
computed (their variance is measured before the skip gain), which is what the third panel
shows. With skip_gain = 1 the analysis predicts Var growing by alpha^2 = 0.04 per block and
resetting to ~1 + alpha^2 at each stage transition; the script prints that check.

Command:  python -m reproduce.signal_propagation [--image-size 128] [--batch 8]
Writes:   reproduce/figures/signal_propagation.png, reproduce/results/signal_propagation.json/.md
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from typing import Any, Optional

import jax
import numpy as np

from nfnets.models import registry as models
from nfnets.analysis import signal_propagation as sp
from nfnets.models.nfnet import VARIANTS as NFNET_VARIANTS
from nfnets.models.variants import RESNET_VARIANTS
from reproduce import outputs

ALPHA = 0.2


def model_specs(nfnet_width: float) -> list[dict[str, Any]]:
  """The networks of the figure: name, family, kwargs, depths, skip gain, BN or not."""
  resnet50 = RESNET_VARIANTS['ResNet50'].depth
  f0 = NFNET_VARIANTS['F0'].depth
  nfnet_name = 'NFNet-F0' if nfnet_width == 1.0 else f'NFNet-F0 (width x{nfnet_width:g})'
  nfnet_kwargs = dict(variant='F0', width=nfnet_width, alpha=ALPHA, stochdepth_rate=0.0,
                      drop_rate=0.0)
  return [
      dict(name='BN-ResNet-50 (v2, batch stats)', family='ResNet', depths=resnet50,
           kwargs=dict(variant='ResNet50', preactivation=True), skip_gain=None,
           is_training=True, style=dict(color='tab:red')),
      dict(name='NF-ResNet-50 (skip_gain=1)', family='NF_ResNet', depths=resnet50,
           kwargs=dict(variant='ResNet50', alpha=ALPHA, stochdepth_rate=0.0, drop_rate=0.0),
           skip_gain=1.0, is_training=False, style=dict(color='tab:blue')),
      dict(name=f'{nfnet_name} (skip_gain=1)', family='NFNet', depths=f0, kwargs=nfnet_kwargs,
           skip_gain=1.0, is_training=False, style=dict(color='tab:green')),
      dict(name=f'{nfnet_name} (skip_gain=0, as initialised)', family='NFNet', depths=f0,
           kwargs=nfnet_kwargs, skip_gain=0.0, is_training=False,
           style=dict(color='tab:green', linestyle='--')),
  ]


def measure_all(specs: Sequence[dict[str, Any]], images: jax.Array,
                seed: int = 0) -> list[dict[str, Any]]:
  """Initialises each network once (same family -> same params) and measures its SPP."""
  cache: dict[tuple, Any] = {}
  rows = []
  for spec in specs:
    start = time.time()
    key = (spec['family'], tuple(sorted(spec['kwargs'].items())))
    if key not in cache:
      forward = models.make_forward(spec['family'], 1000, **spec['kwargs'])
      params, state = jax.jit(lambda r, x, f=forward: f.init(r, x, is_training=True))(
          jax.random.PRNGKey(seed), images)
      cache[key] = (forward, params, state)
    forward, params, state = cache[key]
    if spec['skip_gain'] is not None:
      params = sp.set_skip_gains(params, spec['skip_gain'])
    stats = sp.measure(forward, params, state, images, is_training=spec['is_training'])
    rows.append(dict(spec=spec, stats=stats, seconds=time.time() - start))
    print(f'{spec["name"]}: {time.time() - start:.1f} s', flush=True)
  return rows


def nf_check(stats: sp.SignalStats, depths: Sequence[int],
             skip_gain: float) -> dict[str, float]:
  """Measured vs predicted variance growth for an NF network (the paper's alpha^2 claim)."""
  inc = sp.variance_increments(stats, depths)
  predicted = sp.predicted_nf_variance(depths, ALPHA, skip_gain)
  return {
      'predicted_within_stage_increment': (ALPHA * skip_gain) ** 2,
      'mean_within_stage_increment': float(np.mean(inc['within'])),
      'max_abs_within_error': float(np.max(np.abs(inc['within'] - (ALPHA * skip_gain) ** 2))),
      'predicted_after_transition': 1.0 + (ALPHA * skip_gain) ** 2,
      'after_transition': [float(v) for v in inc['transition']],
      'max_abs_error_vs_prediction': float(np.max(np.abs(stats.avg_var[1:] - predicted))),
  }


def plot(rows: Sequence[dict[str, Any]], path) -> None:
  """Three panels sharing the block axis; dotted/dash-dot verticals mark stage transitions."""
  outputs.use_agg_backend()
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, axes = plt.subplots(1, 3, figsize=(15, 4.3))
  panels = [('avg_sq_mean', 'average channel squared mean'),
            ('avg_var', 'average channel variance'),
            ('res_avg_var', 'residual branch variance (before skip gain)')]
  for ax, (field, title) in zip(axes, panels):
    for row in rows:
      values = getattr(row['stats'], field)
      # Output of block k sits at x = k + 1 (x = 0 is the stem), in every panel.
      xs = np.arange(1, len(values) + 1) if field == 'res_avg_var' else np.arange(len(values))
      ax.plot(xs, values, marker='.', label=row['spec']['name'], **row['spec']['style'])
    boundaries = {}
    for row in rows:
      boundaries[tuple(row['spec']['depths'])] = row['spec']['style']['color']
    for (depths, colour), ls in zip(boundaries.items(), (':', '-.')):
      for start in sp.stage_starts(depths)[1:]:
        ax.axvline(start + 1, color=colour, linestyle=ls, alpha=0.5, linewidth=1)
    ax.set_yscale('log')
    ax.set_title(title)
    ax.set_xlabel('residual block (0 = stem output)')
    ax.grid(alpha=0.3, which='both')
  axes[0].legend(fontsize=7, loc='best')
  fig.suptitle('Signal propagation at initialisation on N(0,1) inputs; vertical lines: first '
               'block of stages 2-4 (dotted: ResNet-50 depths, dash-dot: F0 depths)',
               fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def summary_markdown(rows: Sequence[dict[str, Any]], checks: dict[str, Any], header: str) -> str:
  """Per-model summary and the alpha^2 check, as Markdown."""
  table_rows = []
  for row in rows:
    s = row['stats']
    table_rows.append([row['spec']['name'], f'{s.avg_var[1]:.3f}', f'{s.avg_var[-1]:.3f}',
                       f'{np.max(s.avg_var[1:]):.3f}', f'{np.max(s.avg_sq_mean[1:]):.3g}',
                       f'{np.mean(s.res_avg_var):.3f}', f'{row["seconds"]:.0f}'])
  text = header + '\n\n' + outputs.markdown_table(
      ['model', 'Var after block 0', 'Var at output', 'max Var', 'max sq. mean',
       'mean branch Var', 'seconds'], table_rows)
  check_rows = [[name, f'{c["predicted_within_stage_increment"]:.3f}',
                 f'{c["mean_within_stage_increment"]:.4f}', f'{c["max_abs_within_error"]:.4f}',
                 ', '.join(f'{v:.3f}' for v in c['after_transition'])]
                for name, c in checks.items()]
  text += '\n' + outputs.markdown_table(
      ['NF model', 'predicted dVar/block', 'mean measured dVar', 'max |error|',
       'Var after each transition (pred. 1 + (alpha g)^2)'], check_rows)
  return text


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--image-size', type=int, default=128)
  parser.add_argument('--batch', type=int, default=8)
  parser.add_argument('--nfnet-width', type=float, default=1.0,
                      help='NFNet stage-width multiplier (1.0 = F0; 0.25 is ~10x cheaper)')
  parser.add_argument('--seed', type=int, default=0)
  args = parser.parse_args(argv)
  if args.image_size < 32 or args.batch < 2:
    raise ValueError('Use --image-size >= 32 (total stride 32) and --batch >= 2 (variances).')
  begin = time.time()
  images = jax.random.normal(jax.random.PRNGKey(args.seed + 1),
                             (args.batch, args.image_size, args.image_size, 3))
  rows = measure_all(model_specs(args.nfnet_width), images, seed=args.seed)
  checks = {row['spec']['name']: nf_check(row['stats'], row['spec']['depths'],
                                          row['spec']['skip_gain'])
            for row in rows if row['spec']['skip_gain'] is not None}
  total = time.time() - begin
  header = (f'N(0,1) inputs, batch {args.batch} at {args.image_size} px, alpha {ALPHA}; '
            f'{total:.0f} s on {outputs.machine_note()}.')
  outputs.write_json('signal_propagation', {
      'image_size': args.image_size, 'batch': args.batch, 'nfnet_width': args.nfnet_width,
      'alpha': ALPHA, 'machine': outputs.machine_note(), 'total_seconds': total,
      'models': [dict(name=r['spec']['name'], depths=list(r['spec']['depths']),
                      skip_gain=r['spec']['skip_gain'], seconds=r['seconds'],
                      **r['stats'].to_dict()) for r in rows],
      'nf_checks': checks})
  text = summary_markdown(rows, checks, header)
  outputs.write_markdown('signal_propagation', text)
  outputs.FIGURES_DIR.mkdir(parents=True, exist_ok=True)
  plot(rows, outputs.FIGURES_DIR / 'signal_propagation.png')
  print(text)
  return {'rows': rows, 'checks': checks, 'seconds': total}


if __name__ == '__main__':
  main()
