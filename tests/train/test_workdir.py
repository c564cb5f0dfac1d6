"""Tests for nfnets.train.workdir: the one-run lock, bad workdirs, saved config and data info."""

import os
import subprocess
import sys
import textwrap

import pytest

from nfnets.data.options import DatasetInfo
from nfnets.train import workdir as workdir_lib
from nfnets.train.options import ExperimentOptions


def test_a_second_process_is_refused_and_a_dead_holder_frees_the_lock(tmp_path):
  wd = workdir_lib.prepare(str(tmp_path / "run"))
  holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
      import sys, time
      from nfnets.train import workdir
      workdir.WorkdirLock({wd!r}).acquire(["experiment.py", "--workdir=run"])
      print("locked", flush=True)
      time.sleep(60)
  """)], stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == "locked"
    with pytest.raises(workdir_lib.WorkdirError,
                       match=rf"in use by process {holder.pid} on host .* wait for that run"):
      workdir_lib.WorkdirLock(wd).acquire()
  finally:
    holder.kill()  # As kill -9: the kernel drops the lock with the process.
    holder.wait()
  with workdir_lib.WorkdirLock(wd) as lock:  # Taken at once, no stale lock.
    assert os.path.exists(lock.path)


def test_bad_workdirs_are_one_line_errors(tmp_path):
  a_file = tmp_path / "file"
  a_file.write_text("x")
  with pytest.raises(workdir_lib.WorkdirError, match="is a file, not a directory"):
    workdir_lib.prepare(str(a_file))
  if os.geteuid() != 0:  # root may write anywhere
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    with pytest.raises(workdir_lib.WorkdirError, match="not writable"):
      workdir_lib.prepare(str(ro))


def test_saved_options_and_dataset_info(tmp_path):
  with pytest.raises(workdir_lib.WorkdirError, match="is not a workdir of a run"):
    workdir_lib.saved_options(str(tmp_path))
  options = ExperimentOptions()
  workdir_lib.write_json(str(tmp_path), workdir_lib.CONFIG_FILE, options.to_json())
  assert workdir_lib.saved_options(str(tmp_path)) == options
  (tmp_path / workdir_lib.CONFIG_FILE).write_text("{broken")
  with pytest.raises(workdir_lib.WorkdirError, match="config.json is unreadable"):
    workdir_lib.saved_options(str(tmp_path))
  assert workdir_lib.saved_dataset_info(str(tmp_path)) is None
  workdir_lib.write_json(str(tmp_path), workdir_lib.DATASET_FILE,
                         {"num_train": 8, "num_eval": 4, "num_classes": 2, "channels": 3,
                          "class_names": ["cat", "dog"]})
  assert workdir_lib.saved_dataset_info(str(tmp_path)) == DatasetInfo(
      8, 4, 2, 3, ("cat", "dog"))
