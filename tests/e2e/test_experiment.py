"""Tests for experiment.py and the run it drives: config checks, weight merging, eval-only runs.

End-to-end runs use subprocesses (a fresh JAX with 2 CPU devices each) on synthetic data and
a tiny NFNet at 16 px, sharing the session's persistent compilation cache. Kill/resume,
signals and non-finite handling are proven in test_reliability.py.
"""

import dataclasses
import json
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest

from tests.e2e import e2e_helpers as rh  # pylint: disable=g-import-not-at-top

REPO = rh.REPO

from configs import fake_data  # pylint: disable=g-import-not-at-top
from nfnets import weights  # pylint: disable=g-import-not-at-top
from nfnets.train import loop  # pylint: disable=g-import-not-at-top
from nfnets.train.options import ExperimentOptions  # pylint: disable=g-import-not-at-top


def _options(**train):
  options = ExperimentOptions.from_config(fake_data.get_config())
  return dataclasses.replace(options, train=dataclasses.replace(options.train, **train))


def _records(workdir, split):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [r for r in map(json.loads, f) if r["split"] == split]


# ----------------------------------------------------------------------------- in-process
def test_validate_rejects_bad_settings():
  loop.validate(_options(), "train", device_count=8)  # Valid as shipped.
  with pytest.raises(ValueError, match="multiple of the device count"):
    loop.validate(_options(batch_size=12), "train", device_count=8)
  opts = _options()
  with pytest.raises(ValueError, match="Unknown optimizer.name 'lamb'"):  # Read once, here.
    dataclasses.replace(opts.optimizer, name="lamb")
  bad_model = dataclasses.replace(opts, model=dataclasses.replace(opts.model, name="EffNet"))
  with pytest.raises(ValueError, match="Unknown model 'EffNet'"):
    loop.validate(bad_model, "train", device_count=8)
  typo = dataclasses.replace(opts, model=dataclasses.replace(
      opts.model, kwargs={**opts.model.kwargs, "stochdepth": 0.1}))
  with pytest.raises(ValueError, match=r"NFNet has no argument\(s\) \['stochdepth'\]"):
    loop.validate(typo, "train", device_count=8)
  with pytest.raises(ValueError, match="--mode"):
    loop.validate(_options(), "predict", device_count=8)


def test_merge_params_keeps_fresh_head_only_when_asked():
  fresh = {"NFNet/~/stem": {"w": np.zeros((3, 3, 1, 4), np.float32)},
           "NFNet/~/nf_block_0/~/squeeze_excite/~/linear": {"w": np.zeros((4, 2), np.float32)},
           "NFNet/~/linear": {"w": np.zeros((8, 5), np.float32), "b": np.zeros(5, np.float32)}}
  loaded = {"NFNet/~/stem": {"w": np.ones((3, 3, 1, 4), np.float32)},
            "NFNet/~/nf_block_0/~/squeeze_excite/~/linear": {"w": np.ones((4, 2), np.float32)},
            "NFNet/~/linear": {"w": np.ones((8, 1000), np.float32), "b": np.ones(1000)}}
  pattern = _options().init.head_pattern
  merged = weights.merge_params(fresh, loaded, drop_head=True, head_pattern=pattern)
  assert merged["NFNet/~/stem"]["w"].min() == 1  # Loaded.
  # The SE block's nested 'linear' is not the classifier: it must be loaded too.
  assert merged["NFNet/~/nf_block_0/~/squeeze_excite/~/linear"]["w"].min() == 1
  assert merged["NFNet/~/linear"]["w"].shape == (8, 5) and merged["NFNet/~/linear"]["w"].max() == 0
  with pytest.raises(ValueError, match=r"NFNet/~/linear/w has shape \(8, 1000\)"):
    weights.merge_params(fresh, loaded, drop_head=False, head_pattern=pattern)


def test_nonfinite_error_names_step_and_quantity():
  from nfnets.train import metrics  # pylint: disable=g-import-not-at-top
  sums = {"first_bad_step": 7.0, "first_bad_loss": 1.0, "first_bad_grad_norm": float("inf"),
          "first_bad_update_norm": float("nan"), "first_bad_param_norm": 1.0}
  error = metrics.nonfinite_error(sums, 4)
  assert str(error).startswith("Non-finite grad_norm at step 7; last good checkpoint: step 4.")


def test_a_full_disk_without_a_file_name_names_the_workdir():
  # A write that fails deep in a library (a flush of metrics.jsonl, TensorBoard, a log
  # handler) raises OSError(ENOSPC) without a file name: the line names the workdir's device.
  import errno  # pylint: disable=g-import-not-at-top
  import experiment  # pylint: disable=g-import-not-at-top
  line = experiment.os_error_line(OSError(errno.ENOSPC, "No space left on device"), "/data/run")
  assert line.startswith("no space left on the device holding /data/run (No space left on "
                         "device); free space"), line
  line = experiment.os_error_line(OSError(errno.EACCES, "Permission denied", "/x/y"), "/data/run")
  assert line == ("PermissionError: Permission denied (/x/y); fix the path or its permissions, then "
                  "rerun: the last checkpoint is kept."), line


# ---------------------------------------------------------------------------- end-to-end
def _eval_records(workdir):
  folder = os.path.join(workdir, "eval")
  return {name: json.load(open(os.path.join(folder, name))) for name in sorted(os.listdir(folder))}


def test_eval_only_from_official_format_weights_and_from_the_workdir(tmp_path, e2e_env):
  import jax  # pylint: disable=g-import-not-at-top
  from nfnets.models import registry  # pylint: disable=g-import-not-at-top
  kwargs = fake_data.get_config().model.kwargs
  forward = registry.make_forward("NFNet", 10, **kwargs)
  shapes, _ = jax.eval_shape(lambda: forward.init(jax.random.PRNGKey(0),
                                                  np.zeros((1, 16, 16, 3)), is_training=True))
  rng = np.random.RandomState(0)
  # The released files are pickles of a plain dict of dicts of float32 arrays.
  tree = {m: {n: np.asarray(rng.randn(*s.shape) * 0.1, np.float32) for n, s in leaves.items()}
          for m, leaves in shapes.items()}
  path = tmp_path / "F_tiny_haiku.npz"
  with open(path, "wb") as f:
    pickle.dump(tree, f)
  workdir = tmp_path / "eval"
  workdir.mkdir()
  proc = subprocess.run(rh.train_cmd(workdir, "--mode=eval", f"--config.init.weights={path}"),
                        cwd=REPO, env=e2e_env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  records = _eval_records(workdir)
  (result,) = records.values()
  assert list(records) == ["test_0.json"] and result["weights"] == str(path)
  assert result["num_examples"] == 32 and result["step"] == 0
  assert 0.0 <= result["top_1_acc"] <= result["top_5_acc"] <= 1.0
  assert f"FINAL step 0: top-1 {result['top_1_acc']:.4f}" in proc.stdout
  # The EMA copy is the loaded weights, so both evaluations must agree exactly.
  assert result["ema_top_1_acc"] == result["top_1_acc"]
  assert result["ema_loss"] == pytest.approx(result["loss"], rel=1e-6)
  # An evaluation writes only its own record: no metrics, no TensorBoard, no lock, no cache.
  assert sorted(os.listdir(workdir)) == ["eval"]
  # Nothing to evaluate at all must be an error, not an accuracy of random weights.
  proc = subprocess.run(rh.train_cmd(tmp_path / "empty", "--mode=eval"), cwd=REPO, env=e2e_env,
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 1 and "Nothing to evaluate" in proc.stderr
  assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


@pytest.mark.slow  # Reads the end-to-end reference run (built once: ~1 min).
def test_coming_back_to_a_run_leaves_it_as_it_was(reference, e2e_env, tmp_path, tiny_folder):
  # --mode=eval of a finished run, from another directory: the result is printed and written
  # to eval/<split>_<step>.json; the run's metrics.jsonl, TensorBoard events, checkpoints and
  # config are untouched.
  import shutil  # pylint: disable=g-import-not-at-top
  import tempfile  # pylint: disable=g-import-not-at-top
  copy = tmp_path / "run"
  shutil.copytree(reference[0], copy, ignore=shutil.ignore_patterns(".lock", "jax_cache"))

  def snapshot(root):
    return {os.path.relpath(os.path.join(r, f), root): open(os.path.join(r, f), "rb").read()
            for r, _, fs in os.walk(root) for f in fs}

  before = snapshot(copy)
  elsewhere = tmp_path / "elsewhere"
  elsewhere.mkdir()
  cmd = [sys.executable, os.path.join(REPO, "experiment.py"), f"--workdir={copy}", "--mode=eval"]
  proc = subprocess.run(cmd, cwd=elsewhere, env=e2e_env, capture_output=True, text=True,
                        timeout=600)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  assert f"FINAL step {rh.STEPS}" in proc.stdout
  after = snapshot(copy)
  written = sorted(set(after) - set(before))
  assert written == [f"eval/test_{rh.STEPS}.json"], written
  assert all(after[k] == v for k, v in before.items())  # Nothing else changed.
  record = json.loads(after[written[0]])
  assert record["step"] == rh.STEPS and record["num_examples"] == 12

  # A read-only copy (as an unprivileged user when this runs as root, who writes anywhere):
  # the same evaluation, printed, nothing written.
  base = tempfile.mkdtemp(prefix="nfnets_readonly_")
  try:
    shutil.copytree(reference[0], os.path.join(base, "run"),
                    ignore=shutil.ignore_patterns(".lock", "jax_cache"))
    shutil.copytree(tiny_folder, os.path.join(base, "images"))
    for root, dirs, files in os.walk(base):
      for name in files:
        os.chmod(os.path.join(root, name), 0o444)
      for name in dirs:
        os.chmod(os.path.join(root, name), 0o555)
    os.chmod(base, 0o555)
    scratch = tempfile.mkdtemp(prefix="nfnets_scratch_")
    os.chmod(scratch, 0o777)
    as_user = (["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
               if os.geteuid() == 0 else [])
    probe = f"open({os.path.join(REPO, 'experiment.py')!r}).close()"
    if as_user and subprocess.run(as_user + [sys.executable, "-c", probe], cwd=scratch,
                                  capture_output=True).returncode != 0:
      pytest.skip("the unprivileged user (uid 65534) cannot read this checkout (it is in a "
                  "private directory): the read-only copy cannot be tested")
    env = dict(rh.seeded_cache_env(e2e_env, os.path.join(scratch, "cache")), HOME=scratch)
    proc = subprocess.run(as_user + [
        sys.executable, os.path.join(REPO, "experiment.py"),
        f"--workdir={os.path.join(base, 'run')}", "--mode=eval",
        f"--config.data.folder={os.path.join(base, 'images')}"],
                          cwd=scratch, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"FINAL step {rh.STEPS}: top-1 {record['top_1_acc']:.4f}" in proc.stdout
    assert not os.path.exists(os.path.join(base, "run", "eval"))
  finally:
    for root, dirs, _ in os.walk(base):
      os.chmod(root, 0o755)
    shutil.rmtree(base, ignore_errors=True)


@pytest.mark.slow  # Reads the end-to-end reference run (built once: ~1 min).
def test_reading_a_runs_weights_builds_no_optimizer(reference, e2e_env):
  # A partial restore: params and model state of the newest verified checkpoint, read by a
  # process that never imports the optimizer (so a change to the optimizer, or a run trained
  # with another one, leaves every workdir readable).
  code = (
      "import sys, nfnets\n"
      f"loaded = nfnets.load_model({str(reference[0])!r})\n"
      "assert 'nfnets.train.optim' not in sys.modules, 'the optimizer was imported'\n"
      "assert 'nfnets.train.step' not in sys.modules\n"
      "print(loaded.source, len(loaded.params))\n")
  proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=e2e_env,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  assert f"(step {rh.STEPS}, EMA weights)" in proc.stdout
