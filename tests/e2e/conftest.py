"""Fixtures shared by the end-to-end modules: one reference run serves them all.

Every training run of these tests is `experiment.py` in a subprocess on the same recipe
(`e2e_helpers.random_recipe`: real photographs through tf.data, MixUp + CutMix + RandAugment,
dropout, stochastic depth, bf16), so one compiled train step from the session's persistent
compilation cache serves every run; restarts only trace and load it.
"""

import subprocess

import pytest

from tests.e2e import e2e_helpers as rh  # pylint: disable=g-import-not-at-top
from tests.shared_dirs import build_once  # pylint: disable=g-import-not-at-top


@pytest.fixture(scope="session")
def e2e_env(tmp_path_factory):
  """Environment of a 2-device child process sharing the session's compilation cache."""
  return rh.subprocess_env(tmp_path_factory, devices=2)


@pytest.fixture(scope="session")
def reference(e2e_env, tmp_path_factory, tiny_folder):
  """An uninterrupted run of STEPS steps, one for all workers: (workdir, final checkpoint
  leaves, seconds/step)."""
  def train(workdir):
    proc = subprocess.run(rh.train_cmd(workdir, folder=tiny_folder), cwd=rh.REPO, env=e2e_env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr

  workdir = build_once(tmp_path_factory, "reference", train)
  return workdir, rh.read_checkpoint(workdir, rh.STEPS), rh.step_seconds(workdir)
