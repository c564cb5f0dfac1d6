"""Tests for nfnets.plot: a PNG of a run's curves from metrics.jsonl (the command itself is run
as a user types it in tests/test_commands.py)."""

import json

import pytest

from nfnets import plot


def _write_run(workdir, killed=False):
  with open(workdir / "metrics.jsonl", "w") as f:
    for step in (10, 20, 30):
      f.write(json.dumps({"step": step, "split": "train", "loss": 2.0 / step, "top_1_acc": 0.1,
                          "learning_rate": 0.1, "agc/fraction_clipped": 0.2}) + "\n")
    # A resumed run logs step 30 again: the later value wins.
    f.write(json.dumps({"step": 30, "split": "train", "loss": 0.05, "top_1_acc": 0.3}) + "\n")
    f.write(json.dumps({"step": 30, "split": "eval", "top_1_acc": 0.5, "ema_top_1_acc": 0.6}) + "\n")
    if killed:
      f.write('{"step": 40, "split": "tr')  # A line cut short by kill -9.


def test_writes_a_png_of_the_curves(tmp_path):
  _write_run(tmp_path, killed=True)
  records = plot.read_metrics(str(tmp_path))
  assert plot.series(records, "train", "loss") == ([10, 20, 30], [0.2, 0.1, 0.05])
  assert plot.series(records, "eval", "ema_top_1_acc") == ([30], [0.6])
  assert plot.plot(str(tmp_path)) == str(tmp_path / "curves.png")
  png = (tmp_path / "curves.png").read_bytes()
  assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_not_a_run_is_one_line(tmp_path):
  with pytest.raises(ValueError, match="metrics.jsonl does not exist"):
    plot.plot(str(tmp_path))
  (tmp_path / "metrics.jsonl").write_text("")
  with pytest.raises(ValueError, match="no train or eval scalars"):
    plot.plot(str(tmp_path))
