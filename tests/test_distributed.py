"""Two processes joined by jax.distributed on localhost equal one process with two devices.

Each process has one CPU device; cross-process collectives use JAX's gloo implementation
(experiment.py selects it when NFNETS_DISTRIBUTED=1). The fake data is keyed by global
device, so both layouts see the same global batch of every step. Host 0 alone writes.
"""

import os
import socket
import subprocess

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import pytest  # pylint: disable=g-import-not-at-top,wrong-import-position

import e2e_helpers as rh  # pylint: disable=g-import-not-at-top,wrong-import-position

pytestmark = pytest.mark.slow


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes_match_one_process_with_two_devices(tmp_path_factory, tmp_path):
  one = tmp_path / "one_process"
  env = rh.subprocess_env(tmp_path_factory, devices=2)
  proc = subprocess.run(rh.train_cmd(one), cwd=REPO, env=env, capture_output=True, text=True,
                        timeout=900)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  want = rh.read_checkpoint(one, rh.STEPS)

  port = _free_port()
  workdirs = [tmp_path / "host0", tmp_path / "host1"]
  procs = []
  for pid, workdir in enumerate(workdirs):
    penv = rh.subprocess_env(tmp_path_factory, devices=1)
    penv.update(NFNETS_DISTRIBUTED="1", JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
                NFNETS_NUM_PROCESSES="2", NFNETS_PROCESS_ID=str(pid))
    # Different workdir paths (on one machine) make "host 1 writes nothing" observable.
    procs.append(subprocess.Popen(rh.train_cmd(workdir), cwd=REPO, env=penv,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
  outs = []
  try:
    for p in procs:
      outs.append(p.communicate(timeout=900)[0])
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out[-5000:]
  assert not workdirs[1].exists(), sorted(os.listdir(workdirs[1]))
  assert rh.last_train_step(workdirs[0]) == rh.STEPS
  got = rh.read_checkpoint(workdirs[0], rh.STEPS)
  # The gradient mean over two devices is one addition of two numbers, whichever process
  # does it, so every later value (params, optimizer state, EMA) agrees to the bit.
  rh.assert_bit_identical(got, want, context="2 processes x 1 device vs 1 process x 2")
