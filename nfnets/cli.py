"""What the command lines share (experiment.py, predict, export, plot): flags and one-line errors.

  app.run(cli.one_line_errors(main), flags_parser=cli.parse_flags)

A user's mistake (a flag, a path, a weights or config file) is printed as one line,
`error: <what is wrong, naming the file or option, and what to do>`, on stderr: exit status 2
for the command line itself (flags, a config override, no input), 1 for everything found
afterwards; Ctrl-C is `error: interrupted` (130). NFNETS_DEBUG=1 shows the full traceback
instead. This module loads neither JAX nor TensorFlow (absl, the standard library and the path
checks of inputs.py), so a mistake on the command line is reported before JAX is loaded.
"""

from __future__ import annotations

import ctypes
import functools
import os
import re
import sys
from typing import Callable, NoReturn

from absl import flags
from absl import logging as absl_logging

from nfnets import files
from nfnets.inference import inputs

USAGE_EXIT = 2


class UsageError(ValueError):
  """A mistake on the command line itself (exit status 2)."""


def debugging() -> bool:
  return os.environ.get("NFNETS_DEBUG") == "1"


def fail(message: str, code: int = 1) -> NoReturn:
  """Prints `error: message` as one line (newlines and control characters escaped), exits."""
  line = " ".join(str(message).split("\n"))
  print(f"error: {files.printable(line)}", file=sys.stderr)
  sys.exit(code)


def _flag_message(text: str) -> str:
  """absl's flag errors, said the way a user reads them (one line)."""
  text = " ".join(text.split())
  required = re.search(r"Flag --(\w+) must have a value other than None", text)
  if required:
    return f"--{required.group(1)} is required (see --help)"
  return text


def _config_error(argv: list[str], error: BaseException) -> str:
  """An ml_collections error on --config or a --config.x=y override, as one line.

  ml_collections raises a bare AttributeError/KeyError naming just the key for an unknown
  override on a locked config, and a config file's own errors as whatever the file raised
  (inside a flags error holding the traceback).
  """
  inner = error.args[0] if error.args else error
  text = str(inner.args[0] if isinstance(inner, BaseException) and inner.args else inner)
  lines = [l for l in text.replace("\\'", "'").replace("\\n", "\n").splitlines() if l.strip()]
  lines = lines or [type(error).__name__]
  overrides = [a.split("=", 1)[0][2:] for a in argv[1:] if a.startswith("--config.")]
  key = lines[0].strip().strip("'\"")
  if re.fullmatch(r"\w+", key):  # The bare key of an unknown override.
    named = [o for o in overrides if key in o.split(".")[1:]]
    where = f"--{named[0]}" if named else f"--config key {key!r}"
    return f"{where}: no such config key; the config file lists the keys it takes"
  if "Error whilst parsing config file" in lines[0]:
    lines = lines[-1:]  # The traceback's last line: the file's own exception.
  given = " ".join(a for a in argv[1:] if a.startswith("--config"))
  return f"{' '.join(' '.join(lines).split())} ({given})"


def parse_flags(argv: list[str]) -> list[str]:
  """absl flag parsing (a `flags_parser` for `app.run`), mistakes as one line with exit 2."""
  for arg in argv[1:]:
    if arg.startswith("--config="):
      try:
        inputs.check_config_path(arg.split("=", 1)[1])
      except ValueError as e:
        fail(str(e), USAGE_EXIT)
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    error, message = e, _flag_message(str(e))
    if "Error whilst parsing config file" in message:
      message = _config_error(argv, e)
  except ImportError as e:
    config = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), "")
    error, message = e, inputs.config_import_message(config, e)
  except (AttributeError, KeyError, TypeError, ValueError) as e:
    error, message = e, _config_error(argv, e)
  if debugging():
    raise error
  fail(message, USAGE_EXIT)


def release_freed_memory() -> None:
  """Has glibc give large freed blocks back to the system, so a long run's memory stays flat.

  glibc serves big allocations (over 128 KiB) with mmap and unmaps them when freed, but after
  the first such free it raises that threshold (up to 32 MiB), so later decoded photos and
  resize buffers are carved from the heap, which fragments and stays mapped: measured on a
  tiny model at 256 px, peak RSS grew by ~75 MB from 8 to 120 images and ~95 MB by 480.
  Pinning the threshold keeps it flat (+0.4 MB over 120 images); the extra page faults cost
  well under a millisecond per image. Elsewhere than glibc this does nothing.
  """
  try:
    mallopt = ctypes.CDLL(None).mallopt
  except (OSError, AttributeError):
    return
  m_mmap_threshold = -3  # <malloc.h>
  mallopt(ctypes.c_int(m_mmap_threshold), ctypes.c_int(128 << 10))


def one_line_errors(main: Callable[[list[str]], None]) -> Callable[[list[str]], None]:
  """`main` with the errors a user can cause printed as one line (see the module docstring)."""

  @functools.wraps(main)
  def wrapped(argv: list[str]) -> None:
    # orbax and JAX log at INFO through absl (every restore step, backend probing): noise on
    # a command line's console.
    absl_logging.set_verbosity(absl_logging.WARNING)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
      main(argv)
    except UsageError as e:
      if debugging():
        raise
      fail(str(e), USAGE_EXIT)
    except ValueError as e:  # Wrong weights, a model that does not fit, a bad config value.
      if debugging():
        raise
      fail(str(e))
    except OSError as e:  # A full disk, a vanished mount, a permission: say which file.
      if debugging():
        raise
      where = f" ({e.filename})" if e.filename else ""
      fail(f"{e.strerror or e}{where}; check the path and free space, then rerun")
    except KeyboardInterrupt:
      if debugging():
        raise
      fail("interrupted", 130)

  return wrapped
