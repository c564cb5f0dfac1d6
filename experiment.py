"""Config-driven NFNet training and evaluation, on one device, many devices or many hosts.

  python experiment.py --config=configs/demo.py --workdir=workdirs/demo
  python experiment.py --config=configs/nfnet.py:F0 --workdir=DIR --config.train.batch_size=1024
  python experiment.py --config=configs/nfnet.py:F0 --workdir=DIR --mode=eval \\
      --config.init.weights=F0_haiku.npz
  python experiment.py --workdir=DIR --mode=eval       # the run's own config.json, from DIR
  python experiment.py --config=configs/nfnet.py:F3 --mode=plan \\
      --config.plan.device_memory_gb=80 --config.plan.num_devices=8

Modes: 'train', 'eval' (the workdir's newest verified checkpoint, else config.init.weights;
reads the workdir only and writes its result to <workdir>/eval/), 'train_and_eval' (periodic +
final eval) and 'plan' (memory, FLOPs and input rate of the config, without data or a
workdir). The config file is locked, so a misspelt or mistyped `--config.x=y` fails before
anything is built. Without --config, the workdir's saved config.json is used (overrides still
apply). --workdir may be local or gs:// (see nfnets/train/workdir.py). All the work is done by
`nfnets.train.loop.run`; this file parses flags and turns the errors a user can fix into one
line each (NFNETS_DEBUG=1 shows the traceback).

Several processes: NFNETS_DISTRIBUTED=1 (or config.distributed=True) calls
jax.distributed.initialize(), from the cluster environment or, for explicit setups,
JAX_COORDINATOR_ADDRESS=host:port NFNETS_NUM_PROCESSES=N NFNETS_PROCESS_ID=i.
"""

# The stop flag goes first, before anything slow is imported: a SIGTERM in the first seconds
# of a job (a pre-empted or cancelled start) must end it cleanly with status 0.
from nfnets.train import signals

signals.STOP.install()


def _quiet_late_callbacks() -> None:
  """Late completions of an abandoned asynchronous write are dropped, not printed.

  When an orbax checkpoint write fails (a full disk), its event loop closes while TensorStore
  still completes the remaining I/O; each completion calls loop.call_soon_threadsafe from a
  C++ thread, which raises 'Event loop is closed' and prints a traceback there. Such a
  callback could never run anyway; the failure itself is reported once, as one line.
  """
  import asyncio  # pylint: disable=g-import-not-at-top
  original = asyncio.BaseEventLoop.call_soon_threadsafe

  def call_soon_threadsafe(self, callback, *args, context=None):
    if self.is_closed():
      return None
    return original(self, callback, *args, context=context)

  asyncio.BaseEventLoop.call_soon_threadsafe = call_soon_threadsafe


_quiet_late_callbacks()

# pylint: disable=g-import-not-at-top,wrong-import-position
import os
import sys

# TensorFlow's C++ INFO/WARNING lines (e.g. GeneratorDataset finalisation at exit) are noise here.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app
from absl import flags
from absl import logging as absl_logging
from ml_collections import config_flags

from nfnets import cli

REPO = os.path.dirname(os.path.abspath(__file__))
# A workdir's saved config.json is read through this config file (`configs/workdir.py:DIR`).
_WORKDIR_CONFIG = os.path.join(REPO, "configs", "workdir.py")

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Path to a configs/*.py file (optionally ':arg'); override fields with "
    "--config.a.b=value. Default: the --workdir's saved config.json.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output root (local or gs://): checkpoints, "
                                "logs, config.json. Not needed for --mode=plan.")
_MODE = flags.DEFINE_string("mode", "train_and_eval",
                            "What to run: train, eval, train_and_eval or plan (see above).")


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  absl_logging.set_verbosity(absl_logging.WARNING)  # Hide JAX's backend-probing INFO lines.
  from nfnets.train import loop
  from nfnets.train import metrics
  from nfnets.train import options as options_lib
  try:
    if _CONFIG.value is None:
      raise ValueError("pass --config=configs/<name>.py (e.g. configs/demo.py), or the "
                       "--workdir of a run to use its saved config.")
    options = options_lib.ExperimentOptions.from_config(_CONFIG.value)
    loop.run(options, _WORKDIR.value, _MODE.value)
  except signals.StopRequested as e:
    print(e)
    sys.exit(0)
  except (ValueError, metrics.NonFiniteError) as e:
    # Configuration, data and workdir problems are the user's to fix: one line, no traceback
    # (NFNETS_DEBUG=1 re-raises for the full traceback).
    if os.environ.get("NFNETS_DEBUG") == "1":
      raise
    _fail_now(f"{type(e).__name__}: {e}",
              every_process_fails=isinstance(e, metrics.NonFiniteError))
  except OSError as e:  # A full disk, a vanished mount: say which file, keep what is saved.
    if os.environ.get("NFNETS_DEBUG") == "1":
      raise
    import errno  # pylint: disable=g-import-not-at-top
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
      from nfnets.train import distributed  # pylint: disable=g-import-not-at-top
      distributed.discard_recent_cache_entries()
    _fail_now(os_error_line(e, _WORKDIR.value))


def _fail_now(message: str, every_process_fails: bool = False) -> None:
  """The one-line error, then exit at once: the run's own cleanup is done, and orbax's
  background threads, when a write failed, would print tracebacks while Python shuts down.
  When every process of a job fails here, they leave together
  (distributed.shutdown_after_failure)."""
  try:
    cli.fail(message)
  except SystemExit as e:
    sys.stdout.flush()
    sys.stderr.flush()
    if "jax" in sys.modules:  # A config error fails before JAX (or any peer) is started.
      from nfnets.train import distributed  # pylint: disable=g-import-not-at-top
      distributed.shutdown_after_failure(every_process_fails)
    os._exit(e.code)  # pylint: disable=protected-access


def os_error_line(error: OSError, workdir: str) -> str:
  """One line for a failed file operation, naming the cause (a full disk first)."""
  import errno  # pylint: disable=g-import-not-at-top
  if error.errno in (errno.ENOSPC, errno.EDQUOT):
    # A write deep in a library (a flushed log or metrics file) fails without a file name;
    # everything a run writes goes under its workdir.
    return (f"no space left on the device holding {error.filename or workdir} "
            f"({error.strerror}); free space (or point --workdir elsewhere), then rerun: the "
            "last checkpoint is kept.")
  where = error.filename or "no file name"
  return (f"{type(error).__name__}: {error.strerror or error} ({where}); fix the path or its "
          "permissions, then rerun: the last checkpoint is kept.")


def _config_argv(argv: list[str]) -> list[str]:
  """Without --config, reads the workdir's config.json; a --config=<...>.json means the same."""
  args = list(argv)
  names = [a for a in args[1:] if a == "--config" or a.startswith("--config=")]
  given = names[0].split("=", 1)[1] if names and "=" in names[0] else None
  workdir = next((a.split("=", 1)[1] for a in args[1:] if a.startswith("--workdir=")), None)
  # --config must come before its --config.x=y overrides, or they are unknown flags.
  if given is not None and given.endswith(".json"):
    args.remove(names[0])
    saved = os.path.dirname(os.path.abspath(given))
    return args[:1] + [f"--config={_WORKDIR_CONFIG}:{saved}"] + args[1:]
  if not names and workdir:
    return args[:1] + [f"--config={_WORKDIR_CONFIG}:{workdir}"] + args[1:]
  return args


def parse_flags(argv: list[str]) -> list[str]:
  """absl flag parsing, with config and override mistakes reported on one line (exit 2)."""
  return cli.parse_flags(_config_argv(argv))


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
