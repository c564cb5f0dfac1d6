"""Two processes joined by jax.distributed on localhost equal one process with two devices.

Each process has one CPU device; cross-process collectives use JAX's gloo implementation
(experiment.py selects it when NFNETS_DISTRIBUTED=1). The input pipeline's global batch of a
step does not depend on the host layout, and all per-step randomness is keyed by the global
device, so both layouts train on the same examples with the same crops, mixes, RandAugment ops
and masks. Host 0 alone writes.
"""

import os

import pytest

from tests.e2e import e2e_helpers as rh  # pylint: disable=g-import-not-at-top

pytestmark = pytest.mark.slow


def _run_two_processes(tmp_path_factory, workdirs, *extra: str, timeout: float, folder=None):
  """Runs experiment.py as process 0 and 1 of one jax.distributed job; [(exit code, output)]."""
  job = rh.launch([rh.train_cmd(workdir, *extra, folder=folder) for workdir in workdirs],
                  tmp_path_factory, processes=2, devices=1,
                  log_dir=tmp_path_factory.mktemp("two_processes"))
  return [(code, job.output(index)) for index, code in enumerate(job.wait(timeout))]


def test_a_refusal_on_host_zero_stops_every_host(tmp_path_factory, tmp_path):
  # Only host 0 prepares and locks the workdir; here it is a file, so host 0 refuses. Host 1
  # must stop with host 0's message, not wait in its next collective.
  workdir = tmp_path / "a_file"
  workdir.write_text("not a directory")
  (code0, out0), (code1, out1) = _run_two_processes(tmp_path_factory, [workdir, workdir],
                                                    timeout=300)
  assert code0 == 1 and out0.strip().splitlines()[-1].startswith("error: WorkdirError: "), out0
  assert code1 == 1, out1[-3000:]
  last = out1.strip().splitlines()[-1]
  assert last.startswith("error: StoppedByOtherHostError: Process 0 stopped the run: "
                         "WorkdirError: "), out1[-3000:]
  assert workdir.read_text() == "not a directory"


def test_two_processes_match_one_process_with_two_devices(tmp_path_factory, tmp_path, reference,
                                                          tiny_folder):
  # Different workdir paths (on one machine) make "host 1 writes nothing" observable.
  workdirs = [tmp_path / "host0", tmp_path / "host1"]
  # Only the final checkpoint is compared: no checkpoint every step (the cadence is not part
  # of the compiled program, and every multi-process save waits for both processes).
  for code, out in _run_two_processes(tmp_path_factory, workdirs,
                                      "--config.checkpoint.every_steps=0", timeout=900,
                                      folder=tiny_folder):
    assert code == 0, out[-5000:]
  assert not workdirs[1].exists(), sorted(os.listdir(workdirs[1]))
  assert rh.last_train_step(workdirs[0]) == rh.STEPS
  got = rh.read_checkpoint(workdirs[0], rh.STEPS)
  # The gradient mean over two devices is one addition of two numbers, whichever process
  # does it, so every later value (params, optimizer state, EMA) agrees to the bit, with
  # every source of randomness on and in bfloat16.
  rh.assert_bit_identical(got, reference[1], context="2 processes x 1 device vs 1 process x 2")
