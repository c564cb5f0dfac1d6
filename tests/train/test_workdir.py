"""nfnets.train.workdir: the one-run lock and lease, bad workdirs, the run's saved records."""

import json
import os
import subprocess
import sys
import textwrap
import time

import pytest

from nfnets.data.options import DatasetInfo
from nfnets.train import workdir as workdir_lib
from nfnets.train.options import ExperimentOptions


def test_a_second_process_is_refused_and_a_dead_holder_frees_the_lock(tmp_path):
  wd = workdir_lib.prepare(str(tmp_path / "run"))
  holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
      import sys, time
      from nfnets.train import workdir
      workdir.FileLock({wd!r}).__enter__()
      print("locked", flush=True)
      time.sleep(60)
  """)], stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == "locked"
    with pytest.raises(workdir_lib.WorkdirError,
                       match=rf"in use by process {holder.pid} on host .* wait for that run"):
      with workdir_lib.lock(wd):
        pass
  finally:
    holder.kill()  # As kill -9: the kernel drops the lock with the process.
    holder.wait()
  with workdir_lib.lock(wd) as held:  # Taken at once, no stale lock.
    assert isinstance(held, workdir_lib.FileLock) and os.path.exists(held.path)


def test_a_lease_refuses_a_second_run_and_is_taken_over_when_stale(tmp_path, monkeypatch):
  # The lease is what guards a gs:// workdir; it works on any path, so it is tried here on a
  # local one (and against a real GCS API in tests/e2e/test_cloud_workdir.py).
  monkeypatch.setattr(workdir_lib, "LEASE_SECONDS", 2.0)
  wd = str(tmp_path / "run")
  os.makedirs(wd)
  first = workdir_lib.Lease(wd, settle_seconds=0.05).__enter__()
  record = json.loads((tmp_path / "run" / workdir_lib.LEASE_FILE).read_text())
  assert record["owner"] == first.owner and record["pid"] == os.getpid()
  with pytest.raises(workdir_lib.WorkdirError, match="is in use by process .* renewed"):
    workdir_lib.Lease(wd, settle_seconds=0.05).__enter__()
  time.sleep(1.2)  # Two heartbeats (every 0.5 s) later it is still fresh.
  with pytest.raises(workdir_lib.WorkdirError, match="in use"):
    workdir_lib.Lease(wd, settle_seconds=0.05).__enter__()
  # The holder dies without releasing (its heartbeat stops): after LEASE_SECONDS it is stale.
  first._stop.set()  # pylint: disable=protected-access
  first._thread.join()  # pylint: disable=protected-access
  time.sleep(2.2)
  second = workdir_lib.Lease(wd, settle_seconds=0.05).__enter__()
  # The first one notices at its next beat that it lost the lease.
  assert json.loads((tmp_path / "run" / workdir_lib.LEASE_FILE).read_text())["owner"] == \
      second.owner
  second.__exit__(None, None, None)
  assert not (tmp_path / "run" / workdir_lib.LEASE_FILE).exists()
  # A fresh lease whose holder ran on this host and is gone (killed): taken over at once.
  dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                        capture_output=True, text=True).stdout.strip()
  import socket  # pylint: disable=g-import-not-at-top
  (tmp_path / "run" / workdir_lib.LEASE_FILE).write_text(json.dumps(
      {"owner": "killed", "pid": int(dead), "host": socket.gethostname(), "heartbeat": time.time()}))
  third = workdir_lib.Lease(wd, settle_seconds=0.05).__enter__()
  third.__exit__(None, None, None)


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


def test_saved_records_round_trip_and_damaged_ones_are_named(tmp_path, monkeypatch):
  with pytest.raises(workdir_lib.WorkdirError, match="is not a run's workdir"):
    workdir_lib.saved_options(str(tmp_path))
  # Relative data paths are stored absolute: the record means the same from anywhere.
  monkeypatch.chdir(tmp_path)
  options = ExperimentOptions.from_config({"data": {"data_dir": "tfds", "name": "mnist5k"}})
  info = DatasetInfo(8, 4, 2, 3, ("cat", "dog"))
  workdir_lib.write_run_record(str(tmp_path), options, info)
  saved = workdir_lib.saved_options(str(tmp_path))
  assert saved.data.data_dir == str(tmp_path / "tfds")
  assert saved == options.with_absolute_paths()
  assert workdir_lib.saved_dataset_info(str(tmp_path)) == info
  config = tmp_path / workdir_lib.CONFIG_FILE
  for damage, expected in (("{broken", "config.json is unreadable"),
                           ("[" * 100000 + "]" * 100000, "config.json is unreadable"),
                           ('{"model": [1]}', "config.json is invalid")):
    config.write_text(damage)
    with pytest.raises(workdir_lib.WorkdirError, match=expected) as caught:
      workdir_lib.saved_options(str(tmp_path))
    assert "\n" not in str(caught.value) and len(str(caught.value)) < 400
  dataset = tmp_path / workdir_lib.DATASET_FILE
  dataset.write_text(json.dumps({"num_train": 8, "num_eval": 4, "num_classes": 3,
                                 "class_names": ["cat", "dog"]}))
  with pytest.raises(workdir_lib.WorkdirError, match="2 class names for 3 classes"):
    workdir_lib.saved_dataset_info(str(tmp_path))
  (tmp_path / workdir_lib.DATASET_FILE).unlink()
  assert workdir_lib.saved_dataset_info(str(tmp_path)) is None


def test_an_eval_record_goes_to_its_own_file(tmp_path):
  path = workdir_lib.write_eval_record(str(tmp_path), "test[:50%]", 375, {"top_1_acc": 0.9})
  assert path == str(tmp_path / "eval" / "test__50___375.json")
  assert json.loads(open(path).read()) == {"top_1_acc": 0.9}
