"""The curves a researcher checks first, as one PNG, from a run's metrics.jsonl.

  python -m nfnets.plot workdirs/demo                 # writes workdirs/demo/curves.png
  python -m nfnets.plot workdirs/demo --out=run.png

Panels: training loss; top-1 on the training batches and at each evaluation (raw and EMA
weights); the learning rate; the fraction of units AGC clipped. Train curves are the logged
interval means. (The same scalars are in <workdir>/tb for `tensorboard --logdir`.)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Sequence
from typing import Optional

PANELS = (
    ("loss", (("train", "loss", "train"),)),
    ("top-1", (("train", "top_1_acc", "train batches"), ("eval", "top_1_acc", "eval"),
               ("eval", "ema_top_1_acc", "eval, EMA"))),
    ("learning rate", (("train", "learning_rate", "lr"),)),
    ("AGC: fraction of units clipped", (("train", "agc/fraction_clipped", "clipped"),)),
)


def read_metrics(workdir: str) -> list[dict]:
  """The records of <workdir>/metrics.jsonl (a line cut short by a kill is skipped)."""
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    raise ValueError(f"{path} does not exist: is {workdir} the workdir of a run?")
  records = []
  with open(path) as f:
    for line in f:
      try:
        records.append(json.loads(line))
      except json.JSONDecodeError:
        continue
  return records


def series(records: Sequence[dict], split: str, key: str) -> tuple[list[int], list[float]]:
  """(steps, values) of one scalar; a resumed run's repeated steps keep the latest value."""
  points = {}
  for r in records:
    value = r.get(key)
    if r.get("split") == split and isinstance(value, (int, float)) and math.isfinite(value):
      points[int(r["step"])] = float(value)
  steps = sorted(points)
  return steps, [points[s] for s in steps]


def plot(workdir: str, out: Optional[str] = None) -> str:
  """Writes the PNG; returns its path."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")  # No display on a training machine.
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  records = read_metrics(workdir)
  fig, axes = plt.subplots(2, 2, figsize=(10, 7))
  drawn = 0
  for ax, (title, lines) in zip(axes.flat, PANELS):
    for split, key, label in lines:
      steps, values = series(records, split, key)
      if steps:
        ax.plot(steps, values, marker="o" if len(steps) < 30 else None, ms=3, label=label)
        drawn += 1
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    if ax.lines:
      ax.legend(fontsize=8)
  if not drawn:
    raise ValueError(f"{workdir}/metrics.jsonl holds no train or eval scalars yet.")
  fig.suptitle(os.path.basename(os.path.abspath(workdir)))
  fig.tight_layout()
  out = out or os.path.join(workdir, "curves.png")
  fig.savefig(out, dpi=110)
  plt.close(fig)
  return out


def main(argv: Optional[Sequence[str]] = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("workdir")
  parser.add_argument("--out", default=None, help="PNG path (default: <workdir>/curves.png)")
  args = parser.parse_args(argv)
  try:
    print(f"wrote {plot(args.workdir, args.out)}")
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
  except OSError as e:  # --out in a missing or read-only directory, a full disk.
    print(f"error: cannot write {args.out or args.workdir}: {e.strerror or e}; choose a "
          "writable --out", file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
  main()
