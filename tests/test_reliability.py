"""Crash-proof training, proven end to end: kills, signals, NaNs and bad input.

Every training run here is `experiment.py` in a subprocess (2 forced CPU devices, a tiny
NFNet at 16 px, 10 steps, a checkpoint every step) with the SAME config, so one compiled
train step from the shared persistent compilation cache serves them all; restarts only
trace and load it. Bad-input checks call `experiment.run` in-process and must fail before
anything is compiled.
"""

import os
import pickle
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:  # experiment.py and configs/ live at the repo root.
  sys.path.insert(0, REPO)

import experiment  # pylint: disable=g-import-not-at-top,wrong-import-position
from configs import common  # pylint: disable=g-import-not-at-top,wrong-import-position
from configs import fake_data  # pylint: disable=g-import-not-at-top,wrong-import-position
import e2e_helpers as rh  # pylint: disable=g-import-not-at-top,wrong-import-position

STEPS = rh.STEPS


@pytest.fixture(scope="module")
def env(tmp_path_factory):
  return rh.subprocess_env(tmp_path_factory, devices=2)


@pytest.fixture(scope="module")
def reference(env, tmp_path_factory):
  """An uninterrupted run of STEPS steps: (workdir, final checkpoint leaves)."""
  workdir = tmp_path_factory.mktemp("reference")
  proc = subprocess.run(rh.train_cmd(workdir), cwd=REPO, env=env, capture_output=True,
                        text=True, timeout=900)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  return workdir, rh.read_checkpoint(workdir, STEPS)


# ------------------------------------------------------------------------ kills and signals
@pytest.mark.slow
def test_kills_and_signals_resume_bit_identically(reference, env, tmp_path):
  """5 SIGKILLs (one mid-save) + SIGTERM + SIGINT, each restarted with the same command."""
  seed = int(time.time())
  rng = random.Random(seed)
  plan = [signal.SIGKILL, signal.SIGKILL, signal.SIGTERM, signal.SIGKILL, signal.SIGINT,
          signal.SIGKILL, signal.SIGKILL]
  workdir = tmp_path / "chain"
  cmd = rh.train_cmd(workdir)
  pace = rh.step_seconds(reference[0])
  log = []
  for i, sig in enumerate(plan):
    result = rh.interrupt(cmd, env, workdir, sig, rng, during_save=i == 0, pace=pace)
    log.append((sig.name, result.step_before, result.kill_note))
    context = f"seed {seed}, interruptions so far {log}:\n{result.output[-3000:]}"
    if result.finished or (sig != signal.SIGKILL and "Stopped by" not in result.output
                           and rh.last_train_step(workdir) == STEPS):
      break  # It outran the plan (the signal came after the last step).
    # orbax renames a checkpoint into place only when complete: no restart may ever
    # find a broken newest checkpoint.
    assert "is unreadable" not in result.output, context
    if result.resume_from:
      assert f"Resumed from step {result.resume_from}" in result.output, context
    if sig == signal.SIGKILL:
      assert result.returncode == -signal.SIGKILL, context
    else:  # Graceful: checkpoint at the step reached, exit status 0.
      assert result.returncode == 0, context
      stopped = rh.last_train_step(workdir)
      assert f"Stopped by {sig.name} at step {stopped}; checkpoint saved" in result.output, context
      assert str(stopped) in os.listdir(workdir / "checkpoints"), context
  assert sum(1 for name, _, _ in log if name == "SIGKILL") >= 5, log
  proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  assert "is unreadable" not in proc.stdout
  final = rh.read_checkpoint(workdir, STEPS)
  # Params, Haiku state, optimizer state, EMA copies, step and rng: every bit.
  rh.assert_bit_identical(final, reference[1], context=f"seed {seed}, {log}")


# ------------------------------------------------------------------------------ NaN handling
@pytest.mark.slow
def test_nonfinite_stops_names_step_and_keeps_good_checkpoint(reference, env, tmp_path):
  workdir = tmp_path / "nan"
  proc = subprocess.run(rh.train_cmd(workdir, "--config.train.debug_nan_step=4"), cwd=REPO,
                        env=env, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 1, proc.stdout + proc.stderr
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith("error: NonFiniteError: Non-finite loss at step 4"), last
  assert "last good checkpoint: step 3" in last and "skip_nonfinite=True" in last
  assert sorted(int(s) for s in os.listdir(workdir / "checkpoints") if s.isdigit()) == [2, 3]
  good = rh.read_checkpoint(workdir, 3)
  assert all(np.all(np.isfinite(x)) for x in good.values() if x.dtype.kind == "f")

  # Now also damage the newest checkpoint, as a crashed disk would: the restart must name
  # it, fall back to step 2, and still end bit-identical to the uninterrupted run.
  victim = rh.truncate_checkpoint(workdir, 3)
  proc = subprocess.run(rh.train_cmd(workdir), cwd=REPO, env=env, capture_output=True,
                        text=True, timeout=900)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  assert f"Checkpoint {victim} is unreadable" in proc.stdout, proc.stdout
  assert "Resumed from step 2" in proc.stdout
  assert os.listdir(workdir / "unreadable_checkpoints")  # Kept for inspection, not deleted.
  rh.assert_bit_identical(rh.read_checkpoint(workdir, STEPS), reference[1])


@pytest.mark.slow
def test_skip_nonfinite_skips_and_counts(env, tmp_path):
  # A different compiled step (skipping is in the program), so keep it short: 4 steps.
  workdir = tmp_path / "skip"
  proc = subprocess.run(rh.train_cmd(workdir, "--config.train.debug_nan_step=3",
                                     "--config.train.skip_nonfinite=True",
                                     "--config.train.num_steps=4", "--config.checkpoint.keep=3"),
                        cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  records = {r["step"]: r for r in rh.records(workdir, "train")}
  assert records[3]["finite"] == 0 and records[3]["skipped"] == 1
  assert [records[s]["skipped_steps"] for s in (1, 2, 3, 4)] == [0, 0, 1, 1]
  before, after, final = (rh.read_checkpoint(workdir, s) for s in (2, 3, 4))
  meta_paths = rh.checkpoint_paths(workdir, 3)
  for key, path in zip(sorted(before), meta_paths):
    if path.startswith((".params", ".opt_state", ".ema_params")):
      # The poisoned step changed nothing it trains; only the step counter moved on.
      np.testing.assert_array_equal(after[key], before[key], err_msg=path)
    if path == ".step":
      assert int(after[key]) == 3
  assert all(np.all(np.isfinite(x)) for x in final.values() if x.dtype.kind == "f")


# ----------------------------------------------------------------------------- bad input
@pytest.fixture
def in_process(monkeypatch):
  """experiment.run without its JAX setup (no cache dir / distributed changes here)."""
  monkeypatch.setattr(experiment, "_setup_jax", lambda config, workdir: None)

  def call(config, workdir, mode="train"):
    return experiment.run(config, str(workdir), mode)

  return call


def _tiny_config(**train):
  config = fake_data.get_config()
  config.data.image_size = config.data.eval_image_size = 16
  config.train.batch_size = config.eval.batch_size = 16
  config.tensorboard = False
  for k, v in train.items():
    config.train[k] = v
  return config


def test_unknown_variant_and_unsafe_weights_fail_before_compiling(in_process, tmp_path):
  config = _tiny_config()
  config.model.kwargs = common.get_base_config().model.kwargs  # variant by name: 'F0'...
  config.model.kwargs.variant = "F99"
  with pytest.raises(ValueError, match=r"Unknown NFNet variant 'F99'; use one of .*'F0'"):
    in_process(config, tmp_path / "variant")

  # A "weights file" whose unpickling would run a shell command: refused, never run.
  marker = tmp_path / "pwned"

  class _Payload:
    def __reduce__(self):
      return (os.system, (f"touch {marker}",))

  evil = tmp_path / "F0_haiku.npz"
  with open(evil, "wb") as f:
    pickle.dump({"NFNet/~/stem": {"w": _Payload()}}, f)
  config = _tiny_config()
  config.init.official_weights = str(evil)
  from nfnets import weights  # pylint: disable=g-import-not-at-top
  with pytest.raises(weights.UnsafeWeightsError, match="refused"):
    in_process(config, tmp_path / "evil")
  assert not marker.exists()
  # Not a pickle at all (e.g. an HTML error page saved under the weights' name).
  fake = tmp_path / "F1_haiku.npz"
  fake.write_text("<html>404 Not Found</html>")
  config.init.official_weights = str(fake)
  with pytest.raises(ValueError, match=str(fake).replace(".", r"\.")):
    in_process(config, tmp_path / "fake")


def test_workdir_of_another_model_is_refused(reference, in_process):
  workdir = reference[0]
  before = sorted(os.listdir(workdir / "checkpoints")), (workdir / "config.json").read_text()
  config = _tiny_config()
  config.model.kwargs.variant.width = (16, 32, 64, 96)  # One stage wider.
  from nfnets import checkpoints  # pylint: disable=g-import-not-at-top
  with pytest.raises(checkpoints.SignatureMismatchError,
                     match=r"holds checkpoints of a different model .*fresh --workdir"):
    in_process(config, workdir)
  # Refused means untouched: no new checkpoint, config.json of the original run kept.
  after = sorted(os.listdir(workdir / "checkpoints")), (workdir / "config.json").read_text()
  assert after == before


def test_missing_or_undecodable_data_says_what_to_do(in_process, tmp_path):
  config = _tiny_config()
  config.data.name = "imagenet2012"
  config.data.num_classes = 1000
  empty = tmp_path / "tfds"
  empty.mkdir()
  config.data.data_dir = str(empty)
  with pytest.raises(ValueError, match=str(empty)):
    in_process(config, tmp_path / "imagenet")

  # A folder data set whose only images cannot be decoded.
  root = tmp_path / "images"
  for cls in ("cat", "dog"):
    (root / cls).mkdir(parents=True)
    (root / cls / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
  config = _tiny_config()
  config.data.name = "folder"
  config.data.folder = str(root)
  config.data.num_classes = 2
  with pytest.warns(RuntimeWarning, match="Skipped 2 corrupt"):
    with pytest.raises(ValueError, match="empty|no images|no readable"):
      in_process(config, tmp_path / "folder")
