"""Every command a user types, run as they type it: exit status and output.

`python -m nfnets.predict` and `python -m nfnets.export` have their own tests
(tests/inference/test_predict.py, test_export.py); here: `python -m nfnets.plot`,
`python -m nfnets.data.prepare_imagenet` on tiny generated tars, and `--help` of every command
line of the project (reproduce/, bench/, experiment.py, the nfnets modules), whose help must
list the flags the docs test (tests/test_docs.py) reads from their source.
"""

import concurrent.futures
import glob
import json
import os

import pytest

from tests.command_helpers import REPO, run
from tests import docs_helpers


def test_plot_writes_a_png_and_says_where(tmp_path):
  with open(tmp_path / "metrics.jsonl", "w") as f:
    for step in (10, 20):
      f.write(json.dumps({"step": step, "split": "train", "loss": 1.0 / step}) + "\n")
  proc = run(["-m", "nfnets.plot", str(tmp_path), f"--out={tmp_path / 'run.png'}"])
  assert proc.returncode == 0, proc.stderr
  assert proc.stdout.strip() == f"wrote {tmp_path / 'run.png'}"
  assert (tmp_path / "run.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("case", ["not a run", "out in a missing directory"])
def test_plot_mistakes_are_one_line(tmp_path, case):
  if case == "not a run":
    args, message = [str(tmp_path)], "metrics.jsonl does not exist"
  else:
    (tmp_path / "metrics.jsonl").write_text(json.dumps(
        {"step": 1, "split": "train", "loss": 1.0}) + "\n")
    args, message = [str(tmp_path), f"--out={tmp_path / 'nodir' / 'x.png'}"], "nodir"
  proc = run(["-m", "nfnets.plot", *args])
  assert proc.returncode == 1 and proc.stdout == ""
  (line,) = proc.lines("stderr")
  assert line.startswith("error: ") and message in line, line


def test_prepare_imagenet_builds_tiny_generated_tars(tmp_path):
  # --fake writes tiny tars in the official layout (tests/conftest.py tiny_imagenet), then
  # prepares them as it would prepare the real ones.
  proc = run(["-m", "nfnets.data.prepare_imagenet", f"--manual_dir={tmp_path / 'tars'}",
              f"--data_dir={tmp_path / 'tfds'}", "--fake"], timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  last = proc.lines()[-1]  # After TFDS's own progress lines.
  assert last.startswith("Prepared imagenet2012 in ") and last.endswith(
      "{'train': 12, 'validation': 6}"), last
  assert os.path.isdir(tmp_path / "tfds" / "imagenet2012")


def _help_commands():
  """(name, argv) of every command line: scripts of reproduce/ and bench/ as the README runs
  them (reproduce as modules), experiment.py and the nfnets command modules."""
  commands = [("experiment.py", ["experiment.py"])]
  for path in sorted(glob.glob(os.path.join(REPO, "reproduce", "*.py"))
                     + glob.glob(os.path.join(REPO, "bench", "*.py"))):
    with open(path) as f:
      if "__main__" not in f.read():
        continue
    rel = os.path.relpath(path, REPO)
    module = rel[:-3].replace(os.sep, ".")
    commands.append((rel, ["-m", module] if rel.startswith("reproduce") else [rel]))
  # prepare_imagenet's flags are all used by its own run above (its --help alone imports
  # TensorFlow: ~10 s of CI).
  for module in ("nfnets.predict", "nfnets.export", "nfnets.plot"):
    commands.append((module, ["-m", module]))
  return commands


def test_help_of_every_command_lists_its_flags():
  commands = _help_commands()
  assert {"reproduce/agc_batch_size.py", "bench/benchmark.py", "bench/predict_latency.py",
          "nfnets.predict"} <= {name for name, _ in commands}
  absl = {name: docs_helpers.uses_absl(name) for name, _ in commands}
  # All at once: most of the time is each interpreter importing its libraries.
  with concurrent.futures.ThreadPoolExecutor(len(commands)) as pool:
    results = dict(zip([n for n, _ in commands], pool.map(
        lambda c: run([*c[1], "--helpfull" if absl[c[0]] else "--help"], timeout=600),
        commands)))
  for name, proc in results.items():
    # absl exits with status 1 after printing the help; argparse with 0.
    assert proc.returncode == (1 if absl[name] else 0), (name, proc.stderr[-2000:])
    text = proc.stdout + proc.stderr
    assert "Traceback" not in text, (name, text[-2000:])
    assert ("USAGE" in text or "flags:" in text) if absl[name] else text.startswith("usage: "), name
    # The flags read from the source (what the docs test checks commands against) are the
    # flags the command takes.
    defined = docs_helpers.flags_of(name, shown_only=True)
    listed = docs_helpers.flags_in_help(text)
    assert defined and defined <= listed, (name, sorted(defined - listed))
