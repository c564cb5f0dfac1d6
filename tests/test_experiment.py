"""Tests for experiment.py: config checks, weight merging, fake data, and end-to-end runs.

End-to-end runs use subprocesses (a fresh JAX with 8 CPU devices each) on synthetic data and
a tiny NFNet at 16 px, sharing the session's persistent compilation cache. Kill/resume,
signals and non-finite handling are proven in test_reliability.py.
"""

import json
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:  # experiment.py and configs/ live at the repo root, not in a package.
  sys.path.insert(0, REPO)

import experiment  # pylint: disable=g-import-not-at-top,wrong-import-position
from configs import fake_data  # pylint: disable=g-import-not-at-top,wrong-import-position
import e2e_helpers as rh  # pylint: disable=g-import-not-at-top,wrong-import-position
# Small everything: 2 examples per device, 16 px, 10 classes.
TINY = ["--config.data.image_size=16", "--config.data.eval_image_size=16",
        "--config.train.batch_size=16", "--config.eval.batch_size=16",
        "--config.data.fake_num_eval=32", "--config.train.log_every_steps=1",
        "--config.optimizer.lr=2.0", "--config.tensorboard=False"]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
  e = dict(os.environ)
  e["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
  # Shared with the other end-to-end modules of the session (see e2e_helpers).
  e["NFNETS_COMPILATION_CACHE"] = rh.shared_cache_dir(tmp_path_factory)
  e["CUDA_VISIBLE_DEVICES"] = ""
  e["PYTHONUNBUFFERED"] = "1"
  return e


def _cmd(workdir, *extra, config="configs/fake_data.py"):
  return [sys.executable, "experiment.py", f"--config={config}", f"--workdir={workdir}",
          *TINY, *extra]


def _records(workdir, split):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [r for r in map(json.loads, f) if r["split"] == split]


# ----------------------------------------------------------------------------- in-process
def _config(**train):
  config = fake_data.get_config()
  for k, v in train.items():
    config.train[k] = v
  return config


def test_validate_config_rejects_bad_settings():
  experiment.validate_config(_config(), "train", device_count=8)  # Valid as shipped.
  with pytest.raises(ValueError, match="multiple of the device count"):
    experiment.validate_config(_config(batch_size=12), "train", device_count=8)
  bad_opt = _config()
  bad_opt.optimizer.name = "lamb"
  with pytest.raises(ValueError, match="Unknown optimizer.name 'lamb'"):
    experiment.validate_config(bad_opt, "train", device_count=8)
  bad_model = _config()
  bad_model.model.name = "EffNet"
  with pytest.raises(ValueError, match="Unknown model 'EffNet'"):
    experiment.validate_config(bad_model, "train", device_count=8)
  with pytest.raises(ValueError, match="--mode"):
    experiment.validate_config(_config(), "predict", device_count=8)


def test_merge_params_keeps_fresh_head_only_when_asked():
  fresh = {"NFNet/~/stem": {"w": np.zeros((3, 3, 1, 4))},
           "NFNet/~/nf_block_0/~/squeeze_excite/~/linear": {"w": np.zeros((4, 2))},
           "NFNet/~/linear": {"w": np.zeros((8, 5)), "b": np.zeros(5)}}
  loaded = {"NFNet/~/stem": {"w": np.ones((3, 3, 1, 4))},
            "NFNet/~/nf_block_0/~/squeeze_excite/~/linear": {"w": np.ones((4, 2))},
            "NFNet/~/linear": {"w": np.ones((8, 1000)), "b": np.ones(1000)}}
  pattern = fake_data.get_config().init.head_pattern
  merged = experiment.merge_params(fresh, loaded, drop_head=True, head_pattern=pattern)
  assert merged["NFNet/~/stem"]["w"].min() == 1  # Loaded.
  # The SE block's nested 'linear' is not the classifier: it must be loaded too.
  assert merged["NFNet/~/nf_block_0/~/squeeze_excite/~/linear"]["w"].min() == 1
  assert merged["NFNet/~/linear"]["w"].shape == (8, 5) and merged["NFNet/~/linear"]["w"].max() == 0
  with pytest.raises(ValueError, match=r"NFNet/~/linear/w has shape \(8, 1000\).*drop_head=True"):
    experiment.merge_params(fresh, loaded, drop_head=False, head_pattern=pattern)


def test_nonfinite_error_names_step_and_quantity():
  class _Ckpt:
    def wait(self):  # Nothing in flight.
      pass

    def all_steps(self):
      return [4]

  class _State:  # Replicated layout: a leading device axis.
    params = {"NFNet/~/linear": {"w": np.array([[1.0, np.inf]])}}

  with pytest.raises(experiment.NonFiniteError,
                     match=r"Non-finite loss at step 7 .*NFNet/~/linear/w.*step 4"):
    experiment._raise_nonfinite({"loss": float("nan"), "grad_norm": 1.0}, _State(), 7, _Ckpt())


# ---------------------------------------------------------------------------- end-to-end
def test_bad_overrides_fail_before_compiling(tmp_path, env):
  for override, key in (("--config.train.batchsize=8", "batchsize"),
                        ("--config.train.batch_size=eight", "batch_size")):
    workdir = tmp_path / key
    proc = subprocess.run(_cmd(workdir, override), cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode != 0
    assert key in proc.stderr
    assert not workdir.exists()  # Rejected while parsing flags: nothing was built.
  workdir = tmp_path / "divisible"
  proc = subprocess.run(_cmd(workdir, "--config.train.batch_size=12"), cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 1
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith("error: ValueError: train.batch_size=12 must be a positive multiple")
  assert not (workdir / "checkpoints").exists()


def test_eval_only_from_official_format_weights(tmp_path, env):
  import jax  # pylint: disable=g-import-not-at-top
  from nfnets import models  # pylint: disable=g-import-not-at-top
  kwargs = fake_data.get_config().model.kwargs
  forward = models.make_forward("NFNet", 10, **kwargs)
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
  proc = subprocess.run(_cmd(workdir, "--mode=eval", f"--config.init.official_weights={path}"),
                        cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  assert f"Initialised from {path}" in proc.stdout
  (result,) = _records(workdir, "eval")
  assert result["num_examples"] == 32 and result["step"] == 0
  assert 0.0 <= result["top_1_acc"] <= result["top_5_acc"] <= 1.0
  # The EMA copy starts as the loaded weights, so both evaluations must agree exactly.
  assert result["ema_top_1_acc"] == result["top_1_acc"]
  assert result["ema_loss"] == pytest.approx(result["loss"], rel=1e-6)
  # Nothing to evaluate at all must be an error, not an accuracy of random weights.
  proc = subprocess.run(_cmd(tmp_path / "empty", "--mode=eval"), cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 1 and "Nothing to evaluate" in proc.stderr
