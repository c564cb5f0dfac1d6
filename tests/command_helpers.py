"""Running the project's commands as a user types them, for the tests (not a test module).

`run` starts `python -m nfnets.predict ...` (or any argv) in a fresh process from the repository
root and returns its exit status, output, wall time and peak resident memory. The peak is the
command's own `ru_maxrss`, read with `os.wait4` by a small launcher process: Linux starts a
child's high-water mark at its parent's size when it execs, so measured from the test process
(hundreds of MB of JAX) every command would seem at least that big. Compiled programs are shared with the rest of the suite through its persistent
cache (NFNETS_TEST_JAX_CACHE, set by tests/conftest.py), which the commands read as
NFNETS_COMPILATION_CACHE.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import tempfile
import time
from typing import Optional, Sequence

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# XLA flags of every test process and of the commands the tests start. The tests run tiny
# models, so the code they compile is cheap to run but expensive to optimise: LLVM optimisation
# level 0 (a lone jax.random.normal took ~30 s of CPU to compile at the default level on the
# 2-core CI machine, 0.4 s at level 0; the suite's CPU time fell ~20 %), and XLA:CPU's classic
# fusion code generator instead of its MLIR fusion emitters (`pytest -m "not slow"` on 2 cores,
# 2026-12-04: 13 min 42 s of CPU with the emitters, 9 min 17 s without; the same tests pass),
# and its LLVM module compiled whole rather than split for parallel threads, which two busy
# cores cannot use (the end-to-end tests' train step, compiled cold 4 times each way,
# alternated, 2026-12-07: 16.7-18.9 s split, 11.8-15.7 s whole; loading it from the cache
# took the same 1.4-2.0 s).
FAST_XLA_FLAGS = ("--xla_backend_optimization_level=0", "--xla_cpu_use_fusion_emitters=false",
                  "--xla_cpu_parallel_codegen_split_count=1")


@dataclasses.dataclass
class Result:
  """What a command did."""
  returncode: int
  stdout: str
  stderr: str
  seconds: float
  peak_rss_mb: float

  def lines(self, stream: str = "stdout") -> list[str]:
    return [line for line in getattr(self, stream).splitlines() if line.strip()]


def environment(**extra: str) -> dict[str, str]:
  """The test process's environment, with the suite's compile cache and quiet TensorFlow."""
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
  cache = os.environ.get("NFNETS_TEST_JAX_CACHE")
  if cache:
    env["NFNETS_COMPILATION_CACHE"] = cache
  env.pop("NFNETS_DEBUG", None)
  env.update(extra)
  return env


# Runs argv[2:] as its child, writes the child's peak RSS (KiB) to argv[1], exits as it did.
_LAUNCHER = """
import os, sys
pid = os.fork()
if pid == 0:
  os.execv(sys.argv[2], sys.argv[2:])
_, status, usage = os.wait4(pid, 0)
with open(sys.argv[1], "w") as f:
  f.write(str(usage.ru_maxrss))
sys.exit(os.waitstatus_to_exitcode(status) % 256)
"""


def run(argv: Sequence[str], *, timeout: float = 300, cwd: str = REPO,
        env: Optional[dict[str, str]] = None, python: bool = True) -> Result:
  """Runs `python argv...` (or `argv` itself when python=False) and waits at most `timeout` s.

  A command still running at the timeout is killed (its process group) and the test fails
  with what it had printed, so a command that blocks (e.g. on a FIFO) cannot hang the suite.
  """
  cmd = [sys.executable, *argv] if python else list(argv)
  with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err, \
      tempfile.NamedTemporaryFile("r") as rss:
    start = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-S", "-c", _LAUNCHER, rss.name, *cmd], cwd=cwd,
                            env=env or environment(), stdout=out, stderr=err,
                            stdin=subprocess.DEVNULL, start_new_session=True)
    while True:
      pid, status = os.waitpid(proc.pid, os.WNOHANG)
      if pid:
        break
      if time.monotonic() - start > timeout:
        os.killpg(proc.pid, signal.SIGKILL)
        os.waitpid(proc.pid, 0)
        out.seek(0)
        err.seek(0)
        raise AssertionError(f"{' '.join(cmd)} still ran after {timeout} s; it printed:\n"
                             f"{out.read()[-2000:]}\n{err.read()[-2000:]}")
      time.sleep(0.05)
    seconds = time.monotonic() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    out.seek(0)
    err.seek(0)
    peak_kib = int(rss.read() or 0)  # ru_maxrss is in KiB on Linux.
    return Result(proc.returncode, out.read(), err.read(), seconds, peak_kib / 1024)


def control_characters(text: str) -> list[str]:
  """The control characters in `text` other than newlines (escape sequences start with one)."""
  return sorted({c for c in text if not c.isprintable() and c != "\n"})
