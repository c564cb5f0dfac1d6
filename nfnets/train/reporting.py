"""Training reports: TensorBoard events, a JSON-lines metrics log, config.json, progress lines.

Everything is written under the workdir by host 0 only (other hosts construct a `Reporter`
with `is_writer=False`, which only keeps time). Files:
  <workdir>/metrics.jsonl    one JSON object per logged step: {"step": .., "split": .., ...};
                             a resumed run first drops the records of steps after its checkpoint
                             (they were trained again), so every step appears once
  <workdir>/tb/              TensorBoard event files (tf.summary), when TensorFlow is importable
  <workdir>/log.txt          library log records (orbax, absl, JAX, TF)
A workdir on object storage (gs://) cannot be appended to: metrics.jsonl is rewritten whole at
each log step there (it stays small: one line per logged step).

Progress lines are meant for humans reading a log, e.g.
  step   200/1000 (20.0%) | loss 0.4123 | top1 0.8750 | lr 0.0800 | 1234 img/s/dev | ETA 0:01:05
A one-line progress bar is redrawn in place only when stdout is a terminal, so log files
(and CI output) never fill up with carriage returns.
"""

from __future__ import annotations

import datetime
import json
import logging
import math
import os
import sys
import time
from typing import Any, Mapping, Optional, TextIO

import numpy as np

from nfnets import paths


LOG_FILE = "log.txt"


class _QuietFileHandler(logging.FileHandler):
  """A log file that stops, silently, when it cannot be written (e.g. the disk is full):
  logging would otherwise print a traceback to stderr for every record that follows."""

  broken = False

  def handleError(self, record: logging.LogRecord) -> None:
    del record
    self.broken = True

  def emit(self, record: logging.LogRecord) -> None:
    if not self.broken:
      super().emit(record)

  def flush(self) -> None:
    try:
      super().flush()
    except OSError:
      self.broken = True

  def close(self) -> None:
    try:
      super().close()
    except OSError:
      self.broken = True


def route_library_logs(workdir: Optional[str], console_level: int = logging.CRITICAL) -> None:
  """Library log records (orbax, absl, JAX, TF) go to <workdir>/log.txt; the console shows only
  this project's own lines, so a one-line message is not buried in noise (orbax logs the
  failures of its background threads with tracebacks, which then reach us as exceptions).

  Args:
    workdir: where log.txt is written (None: no file, console filtering only).
    console_level: the lowest level still shown on the console.
  """
  root = logging.getLogger()
  for handler in root.handlers:
    if not isinstance(handler, logging.FileHandler):
      handler.setLevel(console_level)
  if workdir is not None and paths.is_url(workdir):
    workdir = None  # No appendable file on object storage: library logs stay off the console.
  if workdir is not None and not any(getattr(h, "_nfnets", False) for h in root.handlers):
    # delay: the file appears with its first record, so a run refused before any library
    # logged leaves none.
    file_handler = _QuietFileHandler(os.path.join(workdir, LOG_FILE), delay=True)
    file_handler.setLevel(logging.INFO)
    file_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    file_handler._nfnets = True  # pylint: disable=protected-access
    root.addHandler(file_handler)
  root.setLevel(logging.INFO)
  for name in ("absl", "orbax", "jax", "tensorflow"):
    logging.getLogger(name).setLevel(logging.INFO)


def format_eta(seconds: float) -> str:
  """Formats a duration as H:MM:SS ('?' when unknown or infinite)."""
  if seconds is None or not math.isfinite(seconds) or seconds < 0:
    return "?"
  return str(datetime.timedelta(seconds=int(round(seconds))))


def _scalar(v: Any) -> float:
  return float(np.asarray(v).reshape(()))


def format_progress(step: int, total_steps: int, metrics: Mapping[str, Any],
                    images_per_sec_per_device: Optional[float],
                    eta_seconds: Optional[float]) -> str:
  """Builds the human-readable progress line for a training step.

  Args:
    step: steps completed.
    total_steps: steps of the whole run.
    metrics: scalars; 'loss', 'top_1_acc' and 'learning_rate' are shown when present
      (a 'train_' prefix is accepted too).
    images_per_sec_per_device: measured throughput, or None before it is known.
    eta_seconds: estimated seconds to the end, or None.

  Returns:
    One line of text.
  """
  width = len(str(total_steps))
  parts = [f"step {step:>{width}d}/{total_steps} ({100.0 * step / max(total_steps, 1):.1f}%)"]
  for label, keys in (("loss", ("loss", "train_loss")), ("top1", ("top_1_acc", "train_top_1_acc")),
                      ("lr", ("learning_rate", "lr"))):
    for k in keys:
      if k in metrics:
        parts.append(f"{label} {_scalar(metrics[k]):.4g}")
        break
  if images_per_sec_per_device is not None:
    parts.append(f"{images_per_sec_per_device:.0f} img/s/dev")
  parts.append(f"ETA {format_eta(eta_seconds)}")
  return " | ".join(parts)


def progress_bar(step: int, total_steps: int, width: int = 30) -> str:
  """A fixed-width text bar, e.g. '[#######.......]'."""
  filled = int(width * min(max(step / max(total_steps, 1), 0.0), 1.0))
  return "[" + "#" * filled + "." * (width - filled) + "]"


# Dense peak matrix throughput per device kind (TFLOP/s, bf16, no sparsity), from vendor sheets.
# MFU is only reported against a known peak: a guessed peak would be a made-up number.
PEAK_TFLOPS = {
    "H100": 989.0,
    "H200": 989.0,
    "A100": 312.0,
    "TPU v4": 275.0,
    "TPU v5 lite": 197.0,
    "TPU v5p": 459.0,
}


def peak_flops(device_kind: str) -> Optional[float]:
  """Dense bf16 peak FLOP/s of one device of this kind, or None when not in PEAK_TFLOPS."""
  for key, tflops in PEAK_TFLOPS.items():
    if key.lower() in device_kind.lower():
      return tflops * 1e12
  return None


METRICS_FILE = "metrics.jsonl"


def _step_of(line: str) -> Optional[int]:
  """The step of a metrics.jsonl line (None for a line cut short by a kill)."""
  try:
    return int(json.loads(line)["step"])
  except (ValueError, KeyError, TypeError):
    return None


class Profiler:
  """A jax.profiler trace of steps [start, start + num) on host 0, under <workdir>/profile."""

  def __init__(self, start_step: int, num_steps: int, logdir: str, enabled: bool):
    self.start, self.stop = start_step, start_step + max(num_steps, 1)
    self.logdir = logdir
    self.enabled = enabled and start_step > 0
    self.active = False

  def before_step(self, step: int) -> None:
    """`step` is the 1-based step about to run."""
    if self.enabled and not self.active and step == self.start:
      import jax  # pylint: disable=g-import-not-at-top
      jax.profiler.start_trace(self.logdir)
      self.active = True

  def after_step(self, step: int, block_on: Any) -> None:
    if self.active and step + 1 >= self.stop:
      import jax  # pylint: disable=g-import-not-at-top
      jax.block_until_ready(block_on)
      jax.profiler.stop_trace()
      self.active = False


class Throughput:
  """Measures images/s per device, MFU, core-hours and the ETA, excluding compilation.

  Args:
    images_per_step: global batch size.
    num_devices: devices over which the batch is spread (all hosts).
    total_steps: steps of the run, for the ETA.
    train_flops_per_image: FLOPs of one training example (3 x 2 x forward MACs), for MFU.
    peak_flops_per_device: the device's peak, for MFU (None: MFU not reported).
  """

  def __init__(self, images_per_step: int, num_devices: int, total_steps: int,
               train_flops_per_image: Optional[float] = None,
               peak_flops_per_device: Optional[float] = None) -> None:
    self.images_per_step = images_per_step
    self.num_devices = max(num_devices, 1)
    self.total_steps = total_steps
    self.train_flops_per_image = train_flops_per_image
    self.peak_flops_per_device = peak_flops_per_device
    self._t0: Optional[float] = None
    self._s0 = 0
    self._started = time.monotonic()

  def start(self, step: int) -> None:
    """Marks the point after which steps count (call after the first step has finished)."""
    self._t0, self._s0 = time.monotonic(), step

  def rates(self, step: int) -> tuple[Optional[float], Optional[float]]:
    """Returns (images/s per device, ETA seconds); (None, None) before any timed step."""
    if self._t0 is None or step <= self._s0:
      return None, None
    dt = time.monotonic() - self._t0
    steps_per_sec = (step - self._s0) / max(dt, 1e-9)
    ips = steps_per_sec * self.images_per_step / self.num_devices
    return ips, (self.total_steps - step) / steps_per_sec

  def extras(self, step: int) -> dict[str, float]:
    """images_per_sec_per_device, mfu (when the peak is known) and core_hours so far."""
    ips, _ = self.rates(step)
    out = {"core_hours": (time.monotonic() - self._started) * self.num_devices / 3600.0}
    if ips is not None:
      out["images_per_sec_per_device"] = ips
      if self.train_flops_per_image and self.peak_flops_per_device:
        out["mfu"] = ips * self.train_flops_per_image / self.peak_flops_per_device
    return out


class Reporter:
  """Writes metrics (TensorBoard + JSON lines) and progress lines; host 0 only.

  Args:
    workdir: output root.
    total_steps: steps of the run (for percentages and the ETA).
    images_per_step: global batch size.
    num_devices: total device count.
    is_writer: False on hosts other than 0: nothing is written or printed.
    tensorboard: also write TensorBoard event files (needs TensorFlow; skipped with a warning
      when it cannot be imported).
    stream: where progress lines go (default stdout).
  """

  def __init__(self, workdir: str, *, total_steps: int, images_per_step: int, num_devices: int,
               is_writer: bool = True, tensorboard: bool = True,
               stream: Optional[TextIO] = None,
               train_flops_per_image: Optional[float] = None,
               peak_flops_per_device: Optional[float] = None) -> None:
    self.workdir = workdir
    self.total_steps = total_steps
    self.is_writer = is_writer
    self.stream = stream or sys.stdout
    self.throughput = Throughput(images_per_step, num_devices, total_steps,
                                 train_flops_per_image, peak_flops_per_device)
    self._tty = bool(getattr(self.stream, "isatty", lambda: False)())
    self._bar_shown = False
    self._jsonl: Optional[TextIO] = None
    self._metrics_path = paths.resolve(workdir) / METRICS_FILE
    self._lines: Optional[list[str]] = None  # Object storage: the whole file, rewritten.
    self._tb = None
    if not is_writer:
      return
    if paths.is_url(workdir):
      self._lines = (self._metrics_path.read_text().splitlines(keepends=True)
                     if self._metrics_path.exists() else [])
    else:
      os.makedirs(workdir, exist_ok=True)
      # Append: a resumed run continues the same log (steps say where it restarted).
      self._jsonl = open(self._metrics_path, "a", buffering=1)
    if tensorboard:
      try:
        from nfnets.quiet_tensorflow import tf  # pylint: disable=g-import-not-at-top
        self._tf = tf
        self._tb = tf.summary.create_file_writer(os.fspath(paths.resolve(workdir) / "tb"))
        # tf.summary.scalar needs the separate `tensorboard` package; writing the tensor with
        # the 'scalars' plugin tag ourselves produces the identical event without it.
        self._scalar_md = tf.compat.v1.SummaryMetadata(
            plugin_data=tf.compat.v1.SummaryMetadata.PluginData(plugin_name="scalars"))
      except ImportError as e:
        logging.warning("TensorBoard logging off (%s); metrics.jsonl is still written.", e)

  def print(self, text: str) -> None:
    """Prints a line on host 0 (clearing an in-place progress bar first)."""
    if not self.is_writer:
      return
    if self._bar_shown:
      self.stream.write("\r\033[K")
      self._bar_shown = False
    self.stream.write(text + "\n")
    self.stream.flush()

  def write_scalars(self, step: int, split: str, metrics: Mapping[str, Any]) -> None:
    """Appends scalars to metrics.jsonl and TensorBoard (as '<split>/<name>')."""
    if not self.is_writer:
      return
    values = {k: _scalar(v) for k, v in metrics.items()}
    record = {"step": int(step), "split": split, "time": round(time.time(), 3), **values}
    # json cannot write NaN/Inf portably: store them as strings so the file stays valid.
    record = {k: (repr(v) if isinstance(v, float) and not math.isfinite(v) else v)
              for k, v in record.items()}
    if self._lines is not None:
      self._lines.append(json.dumps(record) + "\n")
      self._metrics_path.write_text("".join(self._lines))
    else:
      self._jsonl.write(json.dumps(record) + "\n")
    if self._tb is not None:
      with self._tb.as_default(step=int(step)):
        for k, v in values.items():
          self._tf.summary.write(f"{split}/{k}", self._tf.constant(v, self._tf.float32),
                                 metadata=self._scalar_md)

  def forget_after(self, step: int) -> None:
    """Drops the records of steps after `step` (a resumed run trains them again)."""
    if not self.is_writer:
      return
    if self._lines is not None:
      lines = self._lines
    else:
      self._jsonl.close()
      with open(self._metrics_path) as f:
        lines = f.readlines()
    # Lines cut short by a kill (no step) go too: the next record would be glued to them.
    kept = [line if line.endswith("\n") else line + "\n" for line in lines
            if _step_of(line) is not None and _step_of(line) <= step]
    if kept != lines:
      paths.write_text_atomic(self._metrics_path, "".join(kept))
    if self._lines is not None:
      self._lines = kept
    else:
      self._jsonl = open(self._metrics_path, "a", buffering=1)

  def compile_done(self, step: int, seconds: float) -> None:
    """Reports the first step's time (dominated by compilation) and starts throughput timing."""
    self.throughput.start(step)
    self.print(f"First step (incl. compilation) took {seconds:.1f}s.")
    self.write_scalars(step, "timing", {"first_step_seconds": seconds})

  def log_train(self, step: int, metrics: Mapping[str, Any]) -> None:
    """Writes training scalars (interval means) and prints the progress line."""
    ips, eta = self.throughput.rates(step)
    self.write_scalars(step, "train", {**metrics, **self.throughput.extras(step)})
    self.print(format_progress(step, self.total_steps, metrics, ips, eta))

  def tick(self, step: int) -> None:
    """Redraws the in-place progress bar (terminals only; a no-op in logs)."""
    if not (self.is_writer and self._tty):
      return
    _, eta = self.throughput.rates(step)
    self.stream.write(f"\r{progress_bar(step, self.total_steps)} {step}/{self.total_steps} "
                      f"ETA {format_eta(eta)}")
    self.stream.flush()
    self._bar_shown = True

  def log_eval(self, step: int, metrics: Mapping[str, Any], prefix: str = "eval") -> None:
    """Writes evaluation scalars and prints them sorted on one line."""
    self.write_scalars(step, prefix, metrics)
    shown = " | ".join(f"{k} {_scalar(v):.4f}" for k, v in sorted(metrics.items()))
    self.print(f"[{prefix} @ step {step}] {shown}")

  def flush(self) -> None:
    if self._tb is not None:
      self._tb.flush()

  def close(self) -> None:
    """Flushes and closes the files."""
    if self._tb is not None:
      self._tb.flush()
      self._tb.close()
      self._tb = None
    if self._jsonl is not None:
      self._jsonl.close()
      self._jsonl = None
