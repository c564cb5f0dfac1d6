"""SIGTERM/SIGINT as a flag the training loop checks, installed before anything slow.

Pre-emptible machines send SIGTERM; Ctrl-C sends SIGINT. Instead of dying mid-step, the process
records the signal; the loop checks the flag after every step, saves a checkpoint and exits 0.
`experiment.py` installs the handler first thing, before JAX, TensorFlow or the data are
loaded, so a signal in the first seconds is honoured too (the run then stops at the next
start-up check, having written nothing, and exits 0). Standard library only: importing this
module costs nothing.
"""

from __future__ import annotations

import logging
import signal
from typing import Any, Optional

_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopRequested(Exception):
  """A stop signal arrived before training began; nothing was trained or written."""


class StopFlag:
  """Records SIGTERM/SIGINT instead of dying, so the loop can checkpoint and exit cleanly.

  Use as a context manager (the previous handlers are restored on exit), or the process-wide
  `STOP` with `install()`. A second SIGINT while the flag is already set falls through to the
  default handler (a stuck run can still be killed with two Ctrl-C).
  """

  def __init__(self) -> None:
    self.signum: Optional[int] = None
    self._previous: dict[int, Any] = {}

  def __bool__(self) -> bool:
    return self.signum is not None

  @property
  def name(self) -> str:
    """The received signal's name, e.g. 'SIGTERM' ('' when none)."""
    return signal.Signals(self.signum).name if self.signum is not None else ""

  def _handle(self, signum: int, frame: Any) -> None:
    del frame
    if self.signum is not None and signum == signal.SIGINT:
      raise KeyboardInterrupt
    self.signum = signum
    logging.warning("Received %s: will save a checkpoint and exit after this step.",
                    signal.Signals(signum).name)

  def install(self, force: bool = False) -> "StopFlag":
    """Starts recording SIGTERM/SIGINT (idempotent).

    Args:
      force: install the handlers again even if installed before (a library, e.g. JAX's
        pre-emption notifier, may have replaced them since).
    """
    for sig in _SIGNALS:
      if sig in self._previous and not force:
        continue
      try:
        previous = signal.signal(sig, self._handle)
        self._previous.setdefault(sig, previous)
      except ValueError:  # Not the main thread (e.g. under some test runners): no handlers.
        pass
    return self

  def uninstall(self) -> None:
    """Restores the previous handlers."""
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    self._previous.clear()

  def check_startup(self, what: str) -> None:
    """Raises `StopRequested` if a signal came in during start-up (before `what`)."""
    if self.signum is not None:
      raise StopRequested(f"Stopped by {self.name} during start-up (before {what}); nothing "
                          "was trained or written.")

  def __enter__(self) -> "StopFlag":
    return self.install()

  def __exit__(self, *exc: Any) -> None:
    self.uninstall()


# The process-wide flag: installed by experiment.py at start, read by the loop.
STOP = StopFlag()
