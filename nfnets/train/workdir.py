"""The workdir: one run per directory, and what a run leaves there to be come back to.

  <workdir>/.lock             held by the running process (see `WorkdirLock`)
  <workdir>/config.json       the resolved options of the run (`ExperimentOptions.to_json`)
  <workdir>/dataset.json      the data set's sizes, class count and class names
  <workdir>/checkpoints/      orbax checkpoints and the model signature (checkpoints.py)
  <workdir>/metrics.jsonl, tb/, profile/   reports (reporting.py)

Only host 0 touches the workdir; the other hosts of a multi-host run never read or write it.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sys
import time
from typing import Any, Optional, Sequence

from nfnets.data.options import DatasetInfo
from nfnets.train.options import ExperimentOptions

LOCK_FILE = ".lock"
CONFIG_FILE = "config.json"
DATASET_FILE = "dataset.json"


class WorkdirError(ValueError):
  """The workdir cannot be used: not a directory, not writable, or in use by another run."""


def prepare(workdir: str) -> str:
  """Creates `workdir` if needed and checks it is a writable directory; returns its path."""
  path = os.path.abspath(workdir)
  if os.path.exists(path) and not os.path.isdir(path):
    raise WorkdirError(f"--workdir={workdir} is a file, not a directory; pass a directory path.")
  try:
    os.makedirs(path, exist_ok=True)
  except OSError as e:
    raise WorkdirError(f"Cannot create --workdir={workdir} ({e.strerror}); choose a path you "
                       "can write to.") from None
  if not os.access(path, os.W_OK | os.X_OK):
    raise WorkdirError(f"--workdir={workdir} is not writable; fix its permissions or choose "
                       "another directory.")
  return path


class WorkdirLock:
  """An exclusive lock on `<workdir>/.lock`, held for as long as the run lives.

  `flock` locks belong to the open file: the kernel drops them when the process ends, however it
  ends, so a kill -9 never leaves a stale lock and the next run simply takes it. A second process
  on the same workdir fails at once with the first one's pid, host and start time.

  What it guarantees where: on a local disk, and on NFSv4 (where Linux maps flock to byte-range
  locks the server arbitrates), two runs can never share a workdir. Some network filesystems
  (NFSv3 without lockd, certain FUSE mounts) accept the call without locking anything; object
  stores (gs://, s3://) have no locks at all. There, keep to one launcher per workdir.
  """

  def __init__(self, workdir: str):
    self.path = os.path.join(workdir, LOCK_FILE)
    self._fd: Optional[int] = None

  def acquire(self, argv: Sequence[str] = ()) -> "WorkdirLock":
    fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
      holder = _read_holder(fd)
      os.close(fd)
      if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
        raise WorkdirError(f"Cannot lock {self.path} ({e.strerror}); use a local --workdir.") from None
      raise WorkdirError(
          f"Workdir {os.path.dirname(self.path)} is in use by {holder}; wait for that run to "
          "finish (or stop it), or use another --workdir.") from None
    holder = {"pid": os.getpid(), "host": socket.gethostname(),
              "started": time.strftime("%Y-%m-%d %H:%M:%S"),
              "command": " ".join(argv or sys.argv)}
    os.ftruncate(fd, 0)
    os.write(fd, json.dumps(holder).encode())
    os.fsync(fd)
    self._fd = fd
    return self

  def release(self) -> None:
    if self._fd is not None:
      os.close(self._fd)  # Closing drops the flock.
      self._fd = None

  def __enter__(self) -> "WorkdirLock":
    return self.acquire()

  def __exit__(self, *exc: Any) -> None:
    self.release()


def _read_holder(fd: int) -> str:
  try:
    info = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    return (f"process {info.get('pid', '?')} on host {info.get('host', '?')} (started "
            f"{info.get('started', '?')})")
  except (OSError, ValueError):
    return "another process"


def write_json(workdir: str, name: str, payload: Any) -> None:
  """Writes `<workdir>/<name>` atomically (temp file + rename)."""
  path = os.path.join(workdir, name)
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    f.write(payload if isinstance(payload, str) else json.dumps(payload, indent=2,
                                                                 sort_keys=True))
  os.replace(tmp, path)


def saved_options(workdir: str) -> ExperimentOptions:
  """The options a run saved in its workdir (for --mode=eval / predict from a workdir)."""
  path = os.path.join(workdir, CONFIG_FILE)
  try:
    with open(path) as f:
      return ExperimentOptions.from_json(f.read())
  except FileNotFoundError:
    raise WorkdirError(f"{path} does not exist: {workdir} is not a workdir of a run; pass "
                       "--config=configs/<name>.py.") from None
  except (OSError, ValueError, TypeError) as e:
    raise WorkdirError(f"{path} is unreadable ({type(e).__name__}: {e}); pass --config="
                       "configs/<name>.py instead.") from None


def saved_dataset_info(workdir: str) -> Optional[DatasetInfo]:
  """The dataset.json of a workdir, or None (runs from before it existed)."""
  path = os.path.join(workdir, DATASET_FILE)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    data = json.load(f)
  names = data.get("class_names")
  return DatasetInfo(num_train=int(data["num_train"]), num_eval=int(data["num_eval"]),
                     num_classes=int(data["num_classes"]), channels=int(data.get("channels", 3)),
                     class_names=tuple(names) if names else None)
