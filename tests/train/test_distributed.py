"""A lost peer is told apart from every other error (nfnets/train/distributed.py, loop.py).

A survivor of a multi-process job must end in one line with exit status 75 whichever
collective noticed the loss; tests/e2e/test_pod.py kills a process at a moment it does not
choose, so the two ways a failed collective surfaces are pinned down here.
"""

import jax
import numpy as np
import pytest

from nfnets.train import distributed
from nfnets.train import loop
from nfnets.train import mesh as mesh_lib

# What process 0 raised, as a ValueError, when process 1 was SIGKILLed while orbax's
# process sync at the start of a checkpoint save was waiting for it (2 processes x 1 device).
GLOO = ("UNKNOWN: Gloo AllGather failed: [external/gloo/gloo/transport/tcp/pair.cc:538] Read "
        "error [127.0.0.1]:42712: Connection reset by peer")


@pytest.fixture
def two_processes(monkeypatch):
  monkeypatch.setattr(jax, "process_count", lambda: 2)


def test_a_failed_collective_is_a_lost_peer_whatever_it_raises(two_processes):
  del two_processes
  assert distributed.is_collective_failure(ValueError(GLOO))
  assert distributed.is_collective_failure(jax.errors.JaxRuntimeError(GLOO))
  # The user's mistakes and the peers' refusals are not.
  assert not distributed.is_collective_failure(ValueError("data.folder /x does not exist"))
  assert not distributed.is_collective_failure(distributed.StoppedByOtherHostError(
      "Process 0 stopped the run: WorkdirError: ..."))
  assert not distributed.is_collective_failure(OSError(28, "No space left on device"))


def test_one_process_has_no_peer_to_lose():
  assert not distributed.is_collective_failure(ValueError(GLOO))
  assert not distributed.is_collective_failure(jax.errors.JaxRuntimeError(GLOO))


def test_the_step_loop_ends_in_one_line_when_a_save_finds_the_peer_gone(two_processes,
                                                                       monkeypatch):
  del two_processes
  ended = []

  def exit_lost_process(error):
    ended.append(str(error))
    raise SystemExit(distributed.LOST_PROCESS_EXIT)

  monkeypatch.setattr(distributed, "exit_lost_process", exit_lost_process)
  class Step:  # A train step that does nothing, on this process's devices.
    mesh = mesh_lib.make_mesh()

    def __call__(self, ts, batch, flags):
      return ts, {}

  batches = [{"x": np.zeros((jax.device_count(),), np.float32)}] * 3

  def after_step(done, ts, metrics):
    del done, ts, metrics
    raise ValueError(GLOO)  # The checkpoint save after the step.

  with pytest.raises(SystemExit) as raised:
    loop.run_steps(Step(), {}, batches, 0, 3, after_step)
  assert raised.value.code == distributed.LOST_PROCESS_EXIT and ended == [GLOO]
