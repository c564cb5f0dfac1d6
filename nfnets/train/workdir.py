"""The workdir: one run per directory, and what a run leaves there to be come back to.

  <workdir>/.lock or .lease   held by the running job (see `lock`)
  <workdir>/config.json       the resolved options of the run, local paths absolute
  <workdir>/dataset.json      the data set's sizes, class count and class names
  <workdir>/checkpoints/      orbax checkpoints and the model signature (checkpoints.py)
  <workdir>/metrics.jsonl, tb/, log.txt, profile/   reports (reporting.py)
  <workdir>/eval/<split>_<step>.json                 results of `--mode=eval`

The workdir may be local or on cloud storage (gs://), through `nfnets.paths`. Process 0 writes
these files; every process reads the checkpoints.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sys
import threading
import time
import uuid
from typing import Any, Optional, Sequence

from nfnets import paths
from nfnets.data.options import DatasetInfo
from nfnets.train.options import ExperimentOptions

LOCK_FILE = ".lock"
LEASE_FILE = ".lease"
CONFIG_FILE = "config.json"
DATASET_FILE = "dataset.json"
EVAL_DIR = "eval"
# Lease of a workdir on object storage: refreshed every LEASE_SECONDS / 4, stale after that.
LEASE_SECONDS = float(os.environ.get("NFNETS_LEASE_SECONDS", "120"))
_MAX_JSON_BYTES = 16 << 20


class WorkdirError(ValueError):
  """The workdir cannot be used: not a directory, not writable, or in use by another run."""


def prepare(workdir: str) -> str:
  """Creates `workdir` if needed and checks it is a writable directory; returns its path."""
  path = paths.resolve(workdir)
  if paths.is_url(path):
    path.mkdir(parents=True, exist_ok=True)
    return os.fspath(path)
  if path.exists() and not path.is_dir():
    raise WorkdirError(f"--workdir={workdir} is a file, not a directory; pass a directory path.")
  try:
    path.mkdir(parents=True, exist_ok=True)
  except OSError as e:
    raise WorkdirError(f"Cannot create --workdir={workdir} ({e.strerror}); choose a path you "
                       "can write to.") from None
  if not os.access(path, os.W_OK | os.X_OK):
    raise WorkdirError(f"--workdir={workdir} is not writable; fix its permissions or choose "
                       "another directory.")
  return os.fspath(path)


def _holder_record(argv: Sequence[str] = ()) -> dict:
  return {"pid": os.getpid(), "host": socket.gethostname(),
          "started": time.strftime("%Y-%m-%d %H:%M:%S"), "command": " ".join(argv or sys.argv)}


def _describe(info: dict) -> str:
  return (f"process {info.get('pid', '?')} on host {info.get('host', '?')} (started "
          f"{info.get('started', '?')})")


class FileLock:
  """An exclusive `flock` on `<workdir>/.lock`, held for as long as the run lives.

  `flock` locks belong to the open file: the kernel drops them when the process ends, however it
  ends, so a kill -9 never leaves a stale lock and the next run simply takes it. A second process
  on the same workdir fails at once with the first one's pid, host and start time. On a local
  disk and on NFSv4 two runs can never share a workdir; some network filesystems (NFSv3 without
  lockd, certain FUSE mounts) accept the call without locking anything.
  """

  def __init__(self, workdir: str):
    self.path = os.path.join(paths.local(workdir), LOCK_FILE)
    self._fd: Optional[int] = None

  def __enter__(self) -> "FileLock":
    fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
      try:
        holder = _describe(json.loads(os.pread(fd, 4096, 0).decode() or "{}"))
      except (OSError, ValueError):
        holder = "another process"
      os.close(fd)
      if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
        raise WorkdirError(f"Cannot lock {self.path} ({e.strerror}); use a local --workdir.") from None
      raise WorkdirError(
          f"Workdir {os.path.dirname(self.path)} is in use by {holder}; wait for that run to "
          "finish (or stop it), or use another --workdir.") from None
    os.ftruncate(fd, 0)
    os.write(fd, json.dumps(_holder_record()).encode())
    os.fsync(fd)
    self._fd = fd
    return self

  def __exit__(self, *exc: Any) -> None:
    if self._fd is not None:
      os.close(self._fd)  # Closing drops the flock.
      self._fd = None


class Lease:
  """One run per workdir on object storage, where no lock exists: a lease object.

  `<workdir>/.lease` holds its owner (a random id, host, pid) and a heartbeat time, rewritten
  every LEASE_SECONDS / 4 by a background thread while the run lives. A second launch refuses
  while the lease is fresh, and takes over a stale one (its owner died without releasing it:
  no heartbeat for LEASE_SECONDS) or one whose owner ran on this host and is gone. Two launches
  racing for a stale lease both write it, wait, and read it back: only the one whose id is
  there goes on.
  """

  def __init__(self, workdir: str, settle_seconds: float = 1.0):
    self.path = paths.resolve(workdir) / LEASE_FILE
    self.owner = uuid.uuid4().hex
    self.settle = settle_seconds
    self.lost = threading.Event()
    self._stop = threading.Event()
    self._thread: Optional[threading.Thread] = None

  def _read(self) -> Optional[dict]:
    try:
      data = json.loads(self.path.read_text())
      return data if isinstance(data, dict) else None
    except FileNotFoundError:
      return None
    except (OSError, ValueError):
      return None  # A damaged lease protects nothing: treat it as stale.

  def _write(self) -> None:
    record = dict(_holder_record(), owner=self.owner, heartbeat=time.time())
    self.path.write_text(json.dumps(record))

  def __enter__(self) -> "Lease":
    current = self._read()
    if current and current.get("owner") != self.owner:
      age = time.time() - float(current.get("heartbeat", 0))
      if age < LEASE_SECONDS and not _dead_here(current):
        raise WorkdirError(
            f"Workdir {self.path.parent} is in use by {_describe(current)}, whose lease was "
            f"renewed {age:.0f}s ago; wait for that run to finish (or stop it), or use "
            "another --workdir.")
      print(f"Taking over the stale lease of {_describe(current)} (no heartbeat for "
            f"{age:.0f}s).", flush=True)
    self._write()
    time.sleep(self.settle)
    current = self._read()
    if not current or current.get("owner") != self.owner:
      raise WorkdirError(f"Workdir {self.path.parent} was taken by "
                         f"{_describe(current or {})} at the same moment; use another --workdir.")
    self._thread = threading.Thread(target=self._heartbeat, daemon=True, name="nfnets-lease")
    self._thread.start()
    return self

  def _heartbeat(self) -> None:
    while not self._stop.wait(LEASE_SECONDS / 4):
      current = self._read()
      if current and current.get("owner") != self.owner:
        self.lost.set()
        print(f"warning: the lease of {self.path.parent} was taken by {_describe(current)}; "
              "this run stops after its next step.", file=sys.stderr, flush=True)
        return
      try:
        self._write()
      except OSError:
        pass  # A transient storage error: the next beat retries well within the timeout.

  def __exit__(self, *exc: Any) -> None:
    self._stop.set()
    if self._thread is not None:
      self._thread.join()
    current = self._read()
    if current and current.get("owner") == self.owner:
      try:
        self.path.unlink()
      except OSError:
        pass


def _dead_here(holder: dict) -> bool:
  """Whether the lease's holder ran on this host and its process is gone (a restart after a
  kill, on the same machine, need not wait for the lease to go stale)."""
  if holder.get("host") != socket.gethostname():
    return False
  try:
    os.kill(int(holder.get("pid", -1)), 0)
  except ProcessLookupError:
    return True
  except (OSError, ValueError, TypeError):
    return False
  return False


def lock(workdir: str):
  """The run's exclusive hold on `workdir`: a FileLock on local disks, a Lease on gs://."""
  return Lease(workdir) if paths.is_url(workdir) else FileLock(workdir)


# ----------------------------------------------------------------------------- records
def write_run_record(workdir: str, options: ExperimentOptions, data: DatasetInfo) -> None:
  """Writes config.json (local paths absolute) and dataset.json."""
  root = paths.resolve(workdir)
  paths.write_text_atomic(root / CONFIG_FILE, options.with_absolute_paths().to_json())
  info = {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(data).items()}
  paths.write_text_atomic(root / DATASET_FILE, json.dumps(info, indent=2, sort_keys=True))


def write_eval_record(workdir: str, split: str, step: int, record: dict) -> Optional[str]:
  """Writes `<workdir>/eval/<split>_<step>.json`; None when the workdir is read-only."""
  safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in split)
  path = paths.resolve(workdir) / EVAL_DIR / f"{safe}_{step}.json"
  try:
    path.parent.mkdir(parents=True, exist_ok=True)
    paths.write_text_atomic(path, json.dumps(record, indent=2, sort_keys=True))
  except OSError:
    return None
  return os.fspath(path)


def _read_json(path: Any, what: str) -> Any:
  """The JSON at `path`, or a one-line WorkdirError naming the file and what to do."""
  try:
    with path.open("rb") as f:
      data = f.read(_MAX_JSON_BYTES + 1)
    if len(data) > _MAX_JSON_BYTES:
      raise ValueError(f"larger than {_MAX_JSON_BYTES >> 20} MB")
    return json.loads(data)
  except FileNotFoundError:
    raise
  except RecursionError:
    raise WorkdirError(f"{path} is unreadable (nested too deeply); {what}") from None
  except (OSError, ValueError, UnicodeDecodeError) as e:
    first = str(e).splitlines()[0][:120] if str(e) else type(e).__name__
    raise WorkdirError(f"{path} is unreadable ({type(e).__name__}: {first}); {what}") from None


def saved_options(workdir: str) -> ExperimentOptions:
  """The options a run saved in its workdir (for --mode=eval / predict from a workdir)."""
  path = paths.resolve(workdir) / CONFIG_FILE
  hint = "restore it from a backup or pass --config=configs/<name>.py."
  try:
    data = _read_json(path, hint)
  except FileNotFoundError:
    raise WorkdirError(f"{workdir} is not a run's workdir (it has no {CONFIG_FILE}); pass "
                       "--config=configs/<name>.py with --workdir, or the workdir of a run.") from None
  try:
    return ExperimentOptions.from_config(data)
  except (ValueError, TypeError) as e:
    raise WorkdirError(f"{path} is invalid ({str(e).splitlines()[0][:200]}); {hint}") from None


def saved_dataset_info(workdir: str) -> Optional[DatasetInfo]:
  """The dataset.json of a workdir, or None (runs from before it existed)."""
  path = paths.resolve(workdir) / DATASET_FILE
  try:
    data = _read_json(path, "restore it from a backup.")
  except FileNotFoundError:
    return None
  try:
    names = data.get("class_names")
    if names is not None and (not isinstance(names, list)
                              or not all(isinstance(n, str) for n in names)):
      raise ValueError("class_names must be a list of strings")
    info = DatasetInfo(num_train=int(data["num_train"]), num_eval=int(data["num_eval"]),
                       num_classes=int(data["num_classes"]),
                       channels=int(data.get("channels", 3)),
                       class_names=tuple(names) if names else None)
  except (AttributeError, KeyError, TypeError, ValueError) as e:
    raise WorkdirError(f"{path} is invalid ({type(e).__name__}: {e}); restore it from a "
                       "backup.") from None
  if info.class_names is not None and len(info.class_names) != info.num_classes:
    raise WorkdirError(f"{path} is invalid: {len(info.class_names)} class names for "
                       f"{info.num_classes} classes; restore it from a backup.")
  return info
