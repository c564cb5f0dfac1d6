"""Several processes (hosts): start-up, the compilation cache, and host 0's refusals.

Every process runs the same command. `setup_jax` joins them (`jax.distributed.initialize`) and
points JAX's persistent compilation cache at the workdir; only host 0 reads and writes the
workdir, so when it refuses to start, `raise_together` hands its one-line reason to the others
instead of leaving them to time out in their next collective.
"""

from __future__ import annotations

import os
from typing import Optional

import jax
import numpy as np


class StoppedByHostZeroError(ValueError):
  """Host 0 refused to start (bad workdir, unreadable checkpoints, nothing to evaluate)."""


# Room for host 0's one-line error when it is sent to the other hosts (longer is cut).
_MESSAGE_BYTES = 1024


def setup_jax(distributed: bool, compilation_cache_dir: str, workdir: str) -> None:
  """Multi-process init and the persistent compilation cache; must precede any computation.

  Args:
    distributed: call jax.distributed.initialize() (also when NFNETS_DISTRIBUTED=1).
    compilation_cache_dir: '' -> $NFNETS_COMPILATION_CACHE or <workdir>/jax_cache.
    workdir: the run's output root.
  """
  if distributed or os.environ.get("NFNETS_DISTRIBUTED") == "1":
    # Cross-process collectives of the CPU backend (e.g. a CPU-only cluster, or two
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
    jax.distributed.initialize(**kwargs)
  cache = (compilation_cache_dir or os.environ.get("NFNETS_COMPILATION_CACHE")
           or os.path.join(workdir, "jax_cache"))
  jax.config.update("jax_compilation_cache_dir", os.path.abspath(cache))
  # Cache every program, however fast it compiled: a restart must not recompile anything.
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def is_host0() -> bool:
  return jax.process_index() == 0


def raise_together(error: Optional[Exception]) -> None:
  """Raises on every process when host 0 failed a start-up check; returns when it did not.

  Only host 0 reads the workdir, so only host 0 can find it unusable. If it raised alone, the
  other hosts would wait in their next collective until a cluster timeout, with no message.
  Every process calls this at the same point; host 0 passes what it caught (or None), the
  others pass None and receive host 0's message, so every log names the cause.

  Args:
    error: the exception host 0 caught, or None.

  Raises:
    `error` itself on host 0, `StoppedByHostZeroError` with host 0's message elsewhere.
  """
  if jax.process_count() == 1:
    if error is not None:
      raise error
    return
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  text = f"{type(error).__name__}: {error}".encode()[:_MESSAGE_BYTES] if error else b""
  message = np.zeros(_MESSAGE_BYTES, np.uint8)
  message[:len(text)] = np.frombuffer(text, np.uint8)
  message = np.asarray(multihost_utils.broadcast_one_to_all(message))  # Host 0's copy wins.
  if error is not None:
    raise error
  received = bytes(message).rstrip(b"\0").decode(errors="replace")
  if received:
    raise StoppedByHostZeroError(f"Host 0 stopped the run: {received}")


