"""Activation gammas: `nfnets.analysis.gamma.compute_gamma` next to the official constants (NFNets code, base.py).

gamma = 1 / std(f(x)) for x ~ N(0, 1) makes f(x) * gamma unit-variance, which is what keeps an
NF network's signal at unit scale. The official literals are finite-sample estimates; this
table shows how far each is from the population value computed here (a deterministic
quasi-Monte-Carlo estimate, accurate to ~1e-6 for elementwise functions). For relu the
closed form sqrt(2 / (1 - 1/pi)) is shown as a third reference.

Command:  python -m reproduce.gamma_table
Writes:   reproduce/results/gamma_table.md and .json
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Sequence
from typing import Any, Optional

from nfnets.analysis import gamma
from nfnets.models import activations
from reproduce import outputs

# Closed forms where they are short: relu(x) has E = 1/sqrt(2 pi), E[x^2] = 1/2.
ANALYTIC = {'relu': math.sqrt(2.0 / (1.0 - 1.0 / math.pi))}


def gamma_rows(num_samples: int = 2**20) -> list[dict[str, Any]]:
  """One row per official activation: computed gamma, official literal and their difference."""
  rows = []
  for name, official in activations.GAMMAS.items():
    computed = gamma.compute_gamma(
        activations.BASE_FUNCTIONS[name], num_samples=num_samples,
        axis_size=gamma.AXIS_SIZES.get(name, 1))
    rows.append({'activation': name, 'computed': computed, 'official': official,
                 'difference': computed - official,
                 'relative_difference': (computed - official) / official,
                 'analytic': ANALYTIC.get(name)})
  return rows


def markdown(rows: Sequence[dict[str, Any]], note: str) -> str:
  """The table as Markdown, with the largest relative difference stated under it."""
  body = outputs.markdown_table(
      ['activation', 'computed gamma', 'official gamma', 'computed - official', 'relative',
       'closed form'],
      [[r['activation'], f'{r["computed"]:.6f}', f'{r["official"]:.6f}',
        f'{r["difference"]:+.6f}', f'{100 * r["relative_difference"]:+.3f}%',
        '' if r['analytic'] is None else f'{r["analytic"]:.6f}'] for r in rows])
  worst = max(rows, key=lambda r: abs(r['relative_difference']))
  return (f'{note}\n\n{body}\nLargest relative difference: {worst["activation"]} '
          f'({100 * worst["relative_difference"]:+.3f}%). glu uses pairs of N(0,1) inputs '
          f'(axis 2), log_softmax an axis of {gamma.AXIS_SIZES["log_softmax"]}.\n')


def main(argv: Optional[Sequence[str]] = None) -> list[dict[str, Any]]:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--num-samples', type=int, default=2**20,
                      help='N(0,1) samples per activation')
  args = parser.parse_args(argv)
  start = time.time()
  rows = gamma_rows(args.num_samples)
  seconds = time.time() - start
  note = (f'{args.num_samples} quasi-random N(0,1) samples per activation; {seconds:.1f} s on '
          f'{outputs.machine_note()}.')
  text = markdown(rows, note)
  outputs.write_markdown('gamma_table', text)
  outputs.write_json('gamma_table', {'num_samples': args.num_samples, 'seconds': seconds,
                                     'rows': rows})
  print(text)
  return rows


if __name__ == '__main__':
  main()
