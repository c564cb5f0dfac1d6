"""Directories built once per test run and shared by every pytest-xdist worker (not a test module).

A session-scoped fixture runs once per worker; the expensive ones (the end-to-end reference
runs: an experiment.py run with a cold compile is most of a minute on the 2-core CI machine)
would run once on each. `build_once` builds the directory under the run's common base
temporary directory (the parent of each worker's own) while holding a file lock: the first
worker to ask builds it, any other waits for it and then reads the same files.
"""

from __future__ import annotations

import fcntl
import os
import pathlib
import shutil
from typing import Callable


def run_root(tmp_path_factory) -> pathlib.Path:
  """The base temporary directory common to all workers of this run."""
  base = tmp_path_factory.getbasetemp()
  # Under xdist each worker's base is <run>/popen-gwN; the run's own base is its parent.
  return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


def build_once(tmp_path_factory, name: str,
               build: Callable[[pathlib.Path], None]) -> pathlib.Path:
  """<run root>/name, filled by `build(directory)` exactly once per run.

  A build that raises leaves no marker, so the next worker to ask builds it again (and
  reports its own failure).
  """
  root = run_root(tmp_path_factory)
  directory, done = root / name, root / f"{name}.built"
  with open(root / f"{name}.lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    try:
      if not done.exists():
        shutil.rmtree(directory, ignore_errors=True)
        directory.mkdir(parents=True)
        build(directory)
        done.touch()
    finally:
      fcntl.flock(lock, fcntl.LOCK_UN)
  return directory
