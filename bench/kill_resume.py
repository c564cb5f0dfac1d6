"""Kill-and-resume soak test: N random SIGKILLs, every resumed step checked bit for bit.

  python bench/kill_resume.py --kills=20 --out=bench/results/kill_resume.json

Runs the end-to-end recipe of tests/e2e/test_reliability.py (experiment.py on crops of real
photographs through tf.data, every source of randomness on: Inception crops, flips, MixUp,
CutMix, RandAugment, dropout, stochastic depth, bf16; a tiny NFNet, 2 CPU devices, a
checkpoint every step): once uninterrupted as the reference, then chains
of runs each SIGKILLed at a random moment after it trained a new step (every 4th kill the
moment a checkpoint write is in progress) and restarted with the same command, until
`--kills` kills were delivered. All checkpoints are kept, so every checkpoint a resumed
process wrote is compared with the reference's checkpoint of the same step; a kill point
"matches" when the restart after it resumed cleanly (no unreadable checkpoint) and
everything it wrote is bit-identical. Not part of CI: minutes of CPU.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import signal
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # The test helpers are the `tests` package at the repository root.

from tests.e2e import e2e_helpers as rh  # pylint: disable=g-import-not-at-top,wrong-import-position
from tests.photos import write_tiny_folder  # pylint: disable=g-import-not-at-top,wrong-import-position

KEEP_ALL = "--config.checkpoint.keep=1000"  # Not part of the compiled program.


class _Factory:
  """The one method of pytest's tmp_path_factory that e2e_helpers uses."""

  def __init__(self, root: str) -> None:
    import pathlib  # pylint: disable=g-import-not-at-top
    self._root = pathlib.Path(root)

  def getbasetemp(self):
    return self._root


def _written_by_segment(workdir: str, before: set[int]) -> list[int]:
  root = os.path.join(workdir, "checkpoints")
  return sorted({int(n) for n in os.listdir(root) if n.isdigit()} - before)


def _steps_on_disk(workdir: str) -> set[int]:
  root = os.path.join(workdir, "checkpoints")
  return {int(n) for n in os.listdir(root) if n.isdigit()} if os.path.isdir(root) else set()


def _identical(got: dict, want: dict) -> bool:
  return got.keys() == want.keys() and all(got[k].tobytes() == want[k].tobytes() for k in want)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--kills", type=int, default=20)
  parser.add_argument("--seed", type=int, default=None, help="Kill-timing seed (default: time).")
  parser.add_argument("--root", default="", help="Scratch dir (default: a new temp dir).")
  parser.add_argument("--out", default="", help="Write the JSON result here too.")
  args = parser.parse_args()
  seed = int(time.time()) if args.seed is None else args.seed
  rng = random.Random(seed)
  root = args.root or tempfile.mkdtemp(prefix="kill_resume_")
  env = rh.subprocess_env(_Factory(root), devices=2)
  t0 = time.time()
  load_before = os.getloadavg()

  folder = write_tiny_folder(os.path.join(root, "tiny_folder"))
  ref = os.path.join(root, "reference")
  proc = subprocess.run(rh.train_cmd(ref, KEEP_ALL, folder=folder), cwd=REPO, env=env, capture_output=True,
                        text=True)
  if proc.returncode:
    sys.exit(f"reference run failed:\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}")
  reference = {s: rh.read_checkpoint(ref, s) for s in range(1, rh.STEPS + 1)}
  pace = rh.step_seconds(ref)

  points, chain = [], 0
  while len(points) < args.kills:
    chain += 1
    workdir = os.path.join(root, f"chain{chain}")
    cmd = rh.train_cmd(workdir, KEEP_ALL, folder=folder)
    pending = None  # The kill point whose restart we are about to judge.
    while True:
      before = _steps_on_disk(workdir)
      killing = len(points) + (pending is not None) < args.kills
      if killing:
        result = rh.interrupt(cmd, env, workdir, signal.SIGKILL, rng,
                              during_save=(len(points) % 4 == 3), pace=pace)
      else:  # Enough kills: let this restart run to the end.
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
        result = rh.Interrupted(proc.returncode, proc.stdout + proc.stderr, 0, 0,
                                proc.returncode == 0, "")
      if pending is not None:
        written = _written_by_segment(workdir, before)
        bad = [s for s in written if not _identical(rh.read_checkpoint(workdir, s), reference[s])]
        pending["resumed_cleanly"] = "is unreadable" not in result.output
        pending["checked_steps"] = written
        pending["matched"] = pending["resumed_cleanly"] and not bad and (
            bool(written) or result.finished or result.returncode == -signal.SIGKILL)
        points.append(pending)
        print(f"kill {len(points):2d}: {pending['when']:<45s} resumed from "
              f"{pending['resumed_from']}, checked {written} -> "
              f"{'MATCH' if pending['matched'] else 'MISMATCH'}", flush=True)
        pending = None
      if result.finished or not killing:
        break
      pending = {"chain": chain, "when": result.kill_note,
                 "resumed_from": rh.latest_checkpoint(workdir)}

  matched = sum(p["matched"] for p in points)
  summary = {
      "kills": len(points), "matched": matched, "seed": seed, "steps_per_run": rh.STEPS,
      "recipe": rh.random_recipe(folder),
      "load_avg_before": load_before, "load_avg_after": os.getloadavg(),
      "seconds": round(time.time() - t0, 1), "machine": f"{platform.machine()} "
      f"{os.cpu_count()}-core CPU, {platform.platform()}",
      "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
      "points": points}
  print(f"{matched}/{len(points)} kill points resumed bit-identically "
        f"({summary['seconds']} s, seed {seed}).")
  if args.out:
    with open(args.out, "w") as f:
      json.dump(summary, f, indent=1)


if __name__ == "__main__":
  main()
