"""Several processes (hosts): start-up, the compilation cache, and decisions taken together.

Every process runs the same command. `setup_jax` joins them (`jax.distributed.initialize`) and
points JAX's persistent compilation cache at the workdir. A process that finds a reason to stop
(a bad workdir, unreadable checkpoints, a refused config) must not stop alone: the others would
wait in their next collective until a cluster timeout, with no message. So every such check is
followed by `raise_together`, and verdicts that must be the same everywhere (which checkpoint to
resume from) by `agree`: both exchange one small message between all processes at a point every
process reaches, and every log names the cause.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Optional

import jax
import numpy as np

from nfnets import paths


class StoppedByOtherHostError(ValueError):
  """Another process refused to start or go on (its message is this error's)."""


# Room for one process's one-line error when it is sent to the others (longer is cut).
_MESSAGE_BYTES = 1024


def setup_jax(distributed: bool, compilation_cache_dir: str, workdir: str) -> None:
  """Multi-process init and the persistent compilation cache; must precede any computation.

  Args:
    distributed: call jax.distributed.initialize() (also when NFNETS_DISTRIBUTED=1).
    compilation_cache_dir: '' -> $NFNETS_COMPILATION_CACHE or <workdir>/jax_cache.
    workdir: the run's output root (local or gs://).
  """
  if distributed or os.environ.get("NFNETS_DISTRIBUTED") == "1":
    # Cross-process collectives of the CPU backend (e.g. a CPU-only cluster, or several
    # processes on one machine in tests); GPUs/TPUs use their own and ignore this.
    if not os.environ.get("JAX_CPU_COLLECTIVES_IMPLEMENTATION"):
      jax.config.update("jax_cpu_collectives_implementation", "gloo")
    # Without NFNETS_NUM_PROCESSES, JAX reads the coordinator and process ids from the
    # cluster environment (SLURM, Open MPI, TPU pods); with it, from JAX_COORDINATOR_ADDRESS
    # (host:port of process 0), NFNETS_NUM_PROCESSES and NFNETS_PROCESS_ID.
    kwargs = {}
    if os.environ.get("NFNETS_NUM_PROCESSES"):
      kwargs = dict(num_processes=int(os.environ["NFNETS_NUM_PROCESSES"]),
                    process_id=int(os.environ.get("NFNETS_PROCESS_ID", "0")))
    if os.environ.get("NFNETS_HEARTBEAT_TIMEOUT"):
      kwargs["heartbeat_timeout_seconds"] = int(os.environ["NFNETS_HEARTBEAT_TIMEOUT"])
    jax.distributed.initialize(**kwargs)
  cache = (compilation_cache_dir or os.environ.get("NFNETS_COMPILATION_CACHE")
           or os.fspath(paths.resolve(workdir) / "jax_cache"))
  jax.config.update("jax_compilation_cache_dir", paths.absolute(cache))
  _drop_empty_cache_entries(cache)
  # Cache every program, however fast it compiled: a restart must not recompile anything.
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


_STARTED = time.time()


def _cache_files(cache: str) -> list[str]:
  if not cache or paths.is_url(cache) or not os.path.isdir(cache):
    return []
  return [os.path.join(cache, n) for n in os.listdir(cache)]


def _drop_empty_cache_entries(cache: str) -> None:
  """Removes zero-byte entries (a write cut short by a full disk) so JAX does not warn."""
  for path in _cache_files(cache):
    try:
      if os.path.isfile(path) and os.path.getsize(path) == 0:
        os.unlink(path)
    except OSError:
      pass


def discard_recent_cache_entries() -> None:
  """Removes the compilation-cache entries this process wrote: after a full disk, any of
  them may be cut short (the next run compiles them again)."""
  for path in _cache_files(jax.config.jax_compilation_cache_dir or ""):
    try:
      if os.path.isfile(path) and os.path.getmtime(path) >= _STARTED:
        os.unlink(path)
    except OSError:
      pass


def is_host0() -> bool:
  return jax.process_index() == 0


def _encode(text: str) -> np.ndarray:
  data = text.encode()[:_MESSAGE_BYTES]
  message = np.zeros(_MESSAGE_BYTES, np.uint8)
  message[:len(data)] = np.frombuffer(data, np.uint8)
  return message


def _gather_messages(text: str) -> list[str]:
  """Every process's message (in process order); "" where a process had none."""
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  gathered = np.asarray(multihost_utils.process_allgather(_encode(text)))
  return [bytes(row).rstrip(b"\0").decode(errors="replace") for row in gathered]


def raise_together(error: Optional[Exception]) -> None:
  """Raises on every process when any process failed a check; returns when none did.

  Every process calls this at the same point with what it caught (or None). The process that
  failed raises its own error; the others raise `StoppedByOtherHostError` with its message.

  Raises:
    `error` on the process that caught it, `StoppedByOtherHostError` on the others.
  """
  if jax.process_count() == 1:
    if error is not None:
      raise error
    return
  text = f"{type(error).__name__}: {error}" if error is not None else ""
  messages = _gather_messages(text)
  if error is not None:
    raise error
  for index, received in enumerate(messages):
    if received:
      raise StoppedByOtherHostError(f"Process {index} stopped the run: {received}")


def agree(ok: bool, reason: str = "") -> Optional[str]:
  """Combines every process's verdict: None if all are ok, else the first failing reason."""
  if jax.process_count() == 1:
    return None if ok else reason
  messages = _gather_messages("" if ok else (reason or "failed"))
  return next((m for m in messages if m), None)


# Exit status of a process whose peer was lost: a temporary failure (sysexits' EX_TEMPFAIL),
# which re-running the same command on every host recovers from.
LOST_PROCESS_EXIT = 75


def lost_processes(wait_seconds: float) -> list[int]:
  """Processes the coordination service no longer counts as alive, waiting up to
  `wait_seconds` for its heartbeat check to notice ([] when it cannot tell)."""
  from jax._src import distributed as jax_distributed  # pylint: disable=g-import-not-at-top
  client = jax_distributed.global_state.client
  everyone = list(range(jax.process_count()))
  deadline = time.monotonic() + wait_seconds
  while client is not None:
    try:
      live = client.get_live_nodes(everyone)
    except Exception:  # pylint: disable=broad-except  (the service itself may be gone)
      return []
    lost = sorted(set(everyone) - set(live))
    if lost or time.monotonic() > deadline:
      return lost
    time.sleep(0.5)
  return []


def exit_lost_process(error: BaseException) -> None:
  """Ends this process at once, in one line, after a collective failed with a peer gone.

  Nothing is cleaned up or saved: the state may be partial, and a pending write of an
  earlier checkpoint cannot commit without the lost process (the next run sets it aside).
  """
  heartbeat = float(os.environ.get("NFNETS_HEARTBEAT_TIMEOUT", "100"))
  lost = lost_processes(wait_seconds=heartbeat + 5)
  who = ("process " + ", ".join(map(str, lost))) if lost else "another process"
  first = (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
  sys.stdout.flush()
  print(f"error: lost contact with {who} of this job ({first}); re-run the same command on "
        "every host to resume from the last checkpoint.", file=sys.stderr, flush=True)
  os._exit(LOST_PROCESS_EXIT)  # pylint: disable=protected-access


def is_collective_failure(error: BaseException) -> bool:
  """Whether `error` is a runtime failure of a multi-process job (a peer lost, most likely)."""
  return jax.process_count() > 1 and isinstance(error, jax.errors.JaxRuntimeError)
