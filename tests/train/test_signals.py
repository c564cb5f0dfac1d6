"""Tests for nfnets.train.signals: SIGTERM/SIGINT as a flag, start-up checks."""

import os
import signal
import subprocess
import sys

import pytest

from nfnets.train import signals


def test_stop_flag_catches_sigterm_and_restores_handler():
  before = signal.getsignal(signal.SIGTERM)
  with signals.StopFlag() as flag:
    assert not flag
    flag.check_startup("anything")  # No signal yet: nothing happens.
    os.kill(os.getpid(), signal.SIGTERM)
    assert flag and flag.signum == signal.SIGTERM and flag.name == "SIGTERM"
    with pytest.raises(signals.StopRequested, match="SIGTERM during start-up .*before compiling"):
      flag.check_startup("compiling")
  assert signal.getsignal(signal.SIGTERM) is before


def test_importing_the_flag_is_cheap():
  # experiment.py installs the handler before anything slow: the module must not pull in JAX.
  code = ("import sys; import nfnets.train.signals; "
          "print(sorted(m for m in sys.modules if m.split('.')[0] in ('jax', 'tensorflow', "
          "'haiku', 'optax')))")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
  assert out.stdout.strip() == "[]"
