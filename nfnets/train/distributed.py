"""Several processes (hosts): start-up, the compilation cache, and decisions taken together.

Every process runs the same command. `setup_jax` joins them (`jax.distributed.initialize`) and
points JAX's persistent compilation cache at the workdir. A process that finds a reason to stop
(a bad workdir, unreadable checkpoints, a refused config) must not stop alone: the others would
wait in their next collective until a cluster timeout, with no message. So every such check is
followed by `raise_together`, and verdicts that must be the same everywhere (which checkpoint to
resume from) by `agree`: both exchange one small message between all processes (through the
coordination service, not a device collective) at a point every process reaches, and every log
names the cause. Programs with collectives are compiled on their first call and then wait for
every process (`CompiledTogether`), and a process whose peer is lost ends in one line
(`exit_lost_process`).
"""

from __future__ import annotations

import itertools
import os
import re
import sys
import threading
import time
from typing import Any, Optional

import jax

from nfnets import paths
from nfnets.train import signals


class StoppedByOtherHostError(ValueError):
  """Another process refused to start or go on (its message is this error's)."""


# One process's one-line error, as sent to the others (longer is cut).
_MESSAGE_CHARS = 2000


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
    # JAX's pre-emption notifier takes over SIGTERM during initialize (and swallows it unless
    # its own sync point is polled): take it back, so that a signal on any host reaches the
    # flags every host decides on after each step.
    signals.STOP.install(force=True)
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


# Seconds a process waits for the others at an exchange or barrier (a slow host may still be
# compiling or reading its data: generous, but bounded).
_BARRIER_SECONDS = float(os.environ.get("NFNETS_BARRIER_TIMEOUT", "1800"))
_SEQUENCE = itertools.count()


def _client():
  from jax._src import distributed as jax_distributed  # pylint: disable=g-import-not-at-top
  return jax_distributed.global_state.client


def _gather_messages(text: str) -> list[str]:
  """Every process's message (in process order); "" where a process had none.

  Through the coordination service's key-value store and a barrier, not a device collective:
  processes may arrive minutes apart (one still compiling), longer than a collective waits for
  its peers to join.
  """
  name = f"nfnets/exchange/{next(_SEQUENCE)}"
  client = _client()
  client.key_value_set(f"{name}/{jax.process_index()}", "+" + text)
  timeout = int(_BARRIER_SECONDS * 1000)
  client.wait_at_barrier(f"{name}/barrier", timeout)
  return [client.blocking_key_value_get(f"{name}/{i}", timeout)[1:]
          for i in range(jax.process_count())]


def barrier(name: str) -> None:
  """Waits until every process reaches `barrier(name)` (no-op with one process)."""
  if jax.process_count() > 1:
    _client().wait_at_barrier(f"nfnets/{name}/{next(_SEQUENCE)}", int(_BARRIER_SECONDS * 1000))


class CompiledTogether:
  """A jitted program compiled on its first call, after which every process waits for the rest.

  The first run of a program with collectives sets up its communicators, which waits only
  seconds (30 with gloo) for every peer; a process that loads the program from the persistent
  cache would otherwise get there minutes before one that compiles it. Later calls run the
  compiled program (the same inputs' shapes and shardings every time).
  """

  def __init__(self, jitted: Any):
    self.jitted = jitted
    self._compiled = None

  def __call__(self, *args: Any) -> Any:
    if self._compiled is None:
      self._compiled = self.jitted.lower(*args).compile()
      barrier("compiled")
    return self._compiled(*args)

  def lower(self, *args: Any) -> Any:
    return self.jitted.lower(*args)


# Whether `raise_together` raised on every process (see `shutdown_after_failure`).
_FAILED_TOGETHER = False


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
  text = f"{type(error).__name__}: {error}"[:_MESSAGE_CHARS] if error is not None else ""
  messages = _gather_messages(text)
  if any(messages):
    global _FAILED_TOGETHER
    _FAILED_TOGETHER = True
    # Everyone has read every message before anyone leaves (see `shutdown_after_failure`).
    barrier("read")
  if error is not None:
    raise error
  for index, received in enumerate(messages):
    if received:
      raise StoppedByOtherHostError(f"Process {index} stopped the run: {received}")


def shutdown_after_failure(every_process_fails: bool = False) -> None:
  """Before a process exits with an error: leaves the job with its peers when they all fail.

  Process 0 holds JAX's coordination service. If it exits at once, a peer still finishing
  (printing the same refusal, say) is aborted by JAX's client (LOG(FATAL), SIGABRT: "Failed to
  send RPC to coordination service") instead of printing its own line. `jax.distributed.
  shutdown()` waits in a barrier until every process has reached it, so the service outlives
  them all. Only when every process is known to be failing at the same point (after
  `raise_together` raised, or `every_process_fails`: e.g. a non-finite step, whose all-reduced
  metrics every process reads alike): a lone failing process would wait for peers that never
  come, up to JAX's shutdown timeout (300 s).
  """
  if jax.process_count() > 1 and (_FAILED_TOGETHER or every_process_fails):
    try:
      jax.distributed.shutdown()
    except Exception:  # pylint: disable=broad-except  (leaving anyway; the line is printed)
      pass


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
  """Processes the coordination service no longer counts as alive ([] when it cannot tell
  within `wait_seconds`: its query waits for every live process, and a live one may be stuck
  in a collective)."""
  from jax._src import distributed as jax_distributed  # pylint: disable=g-import-not-at-top
  client = jax_distributed.global_state.client
  if client is None:
    return []
  everyone = list(range(jax.process_count()))
  found: list[int] = []

  def query():
    try:
      found.extend(sorted(set(everyone) - set(client.get_live_nodes(everyone))))
    except Exception:  # pylint: disable=broad-except  (the service itself may be gone)
      pass

  thread = threading.Thread(target=query, daemon=True)
  thread.start()
  thread.join(wait_seconds)
  return list(found)


def exit_lost_process(error: BaseException) -> None:
  """Ends this process at once, in one line, after a collective failed with a peer gone.

  Nothing is cleaned up or saved: the state may be partial, and a pending write of an
  earlier checkpoint cannot commit without the lost process (the next run sets it aside).
  """
  # The coordination service names a lost process only after its heartbeat timeout, and then
  # aborts every process with a stack dump: ask briefly, and leave before that.
  lost = lost_processes(wait_seconds=2.0)
  others = [i for i in range(jax.process_count()) if i != jax.process_index()]
  if not lost and len(others) == 1:
    lost = others  # With two processes, the lost one is the other one.
  who = ("process " + ", ".join(map(str, lost))) if lost else "another process"
  first = (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
  sys.stdout.flush()
  print(f"error: lost contact with {who} of this job ({first}); re-run the same command on "
        "every host to resume from the last checkpoint.", file=sys.stderr, flush=True)
  os._exit(LOST_PROCESS_EXIT)  # pylint: disable=protected-access


# The status code that starts the message of an error of XLA's runtime ("UNKNOWN: Gloo
# AllGather failed: ... Connection reset by peer").
_RUNTIME_STATUS = re.compile(r"(UNKNOWN|UNAVAILABLE|INTERNAL|ABORTED|CANCELLED|"
                             r"DEADLINE_EXCEEDED): ")

# What a failed collective can raise: JaxRuntimeError from a program of ours; a ValueError
# carrying the runtime's status from the small program with which JAX syncs processes
# (multihost_utils.sync_global_devices, which orbax calls when a checkpoint save starts).
COLLECTIVE_ERRORS = (jax.errors.JaxRuntimeError, ValueError)


def is_collective_failure(error: BaseException) -> bool:
  """Whether `error` is a runtime failure of a multi-process job (a peer lost, most likely)."""
  if jax.process_count() == 1:
    return False
  if isinstance(error, jax.errors.JaxRuntimeError):
    return True
  return isinstance(error, ValueError) and bool(_RUNTIME_STATUS.match(str(error)))
