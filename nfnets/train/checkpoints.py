"""Crash-proof training checkpoints over orbax: the named TrainState, written by every host.

What a checkpoint `<workdir>/checkpoints/<step>/` holds:
  state/   the TrainState under its leaf paths (`params/NFNet/~/stem_conv0/w`, `ema_params/...`,
           `opt_state/...`, `step`, `rng`): a plain orbax PyTree that stock orbax can browse,
           `ocp.StandardCheckpointer().restore('<step>/state')`;
  meta/    JSON: format, step, the shape and SHA-256 digest of every array by leaf path;
  nfnets_files.sha256.json   the digest of every file above (the seal, see integrity.py).
The data position needs no extra field: batch k depends only on (seed, k), so the restored
step *is* the data position, on any topology.

Every process takes part in saving and restoring, as orbax does it for multi-process jobs (each
writes what it owns, replicated arrays once; each reads what it needs), so nothing funnels the
state through host 0. Process 0 alone digests, seals and moves files.

Guarantees:
  * Atomic: orbax writes into a temporary directory and renames it when complete.
  * Verified before use: the seal (every file), the array digests (every leaf), the format the
    directory requires (recorded in its model signature, not in the checkpoint), and the step,
    which must be the same in the state, the meta item and the directory name. A checkpoint
    failing any check is unreadable: named, moved to `<workdir>/unreadable_checkpoints/` by the
    writer (never by a reader), and the previous one is used. Only a sealed checkpoint of
    another layout (a changed model or optimizer) is refused outright.
  * A checkpoint left unsealed by a kill is sealed when a run resumes from it.
  * Nothing non-finite is written.
  * Readers (`read_weights`: predict, export, eval, fine-tuning from a workdir) restore params
    and model state alone, build no optimizer, and never write, move or delete anything: they
    run beside a training run and on a read-only copy.
Checkpoints of formats 1 and 2 (arrays under index keys) still restore.
"""

from __future__ import annotations

import concurrent.futures
import errno
import json
import logging
import os
import shutil
import time
from typing import Any, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from orbax.checkpoint.checkpoint_managers import save_decision_policy as save_policies

from nfnets import paths
from nfnets.train import checkpoint_reading
from nfnets.train import integrity
from nfnets.train import mesh as mesh_lib
from nfnets.train.distributed import agree, raise_together
from nfnets.train.integrity import SignatureMismatchError
from nfnets.train.options import CheckpointOptions
from nfnets.train.state import first_nonfinite

ITEMS = ("state", "meta")
UNREADABLE_DIR = "unreadable_checkpoints"
# Readers and the step reader live in checkpoint_reading; re-exported for callers of this module.
read_weights = checkpoint_reading.read_weights
step_dirs = checkpoint_reading.step_dirs
Weights = checkpoint_reading.Weights
UnreadableError = checkpoint_reading.UnreadableError
__all__ = ["Checkpointer", "NonFiniteStateError", "SignatureMismatchError", "read_weights",
           "step_dirs", "Weights", "UnreadableError"]


class NonFiniteStateError(ValueError):
  """A state with NaN/Inf values was handed to `save`; it was not written."""


def _disk_full(error: BaseException) -> bool:
  text = str(error)
  return (getattr(error, "errno", None) in (errno.ENOSPC, errno.EDQUOT)
          or "RESOURCE_EXHAUSTED" in text or "No space left" in text)


def _no_space(directory: Any, detail: str = "") -> OSError:
  return OSError(errno.ENOSPC, "No space left on device" + (f" ({detail})" if detail else ""),
                 os.fspath(directory))


# ------------------------------------------------------------------------------- writer
def _as_dict(state: Any) -> dict:
  """A TrainState (any NamedTuple) or a dict, as the dict of its fields."""
  return state._asdict() if hasattr(state, "_asdict") else dict(state)


def _save_policy(options: CheckpointOptions) -> save_policies.SaveDecisionPolicy:
  # Time-based saves are decided by every host together (the loop's 'save_due' flag), so
  # orbax only ever sees forced saves.
  del options
  return save_policies.SpecificStepsPolicy(())


class Checkpointer:
  """Periodic, atomic, verified, resumable checkpoints of the (global) TrainState.

  Every process constructs one and calls `restore_latest`, `save`, `wait` and `close` at the
  same points (orbax's multi-process protocol). Only the process holding the workdir's lock may
  construct one (readers use `read_weights`).

  Args:
    directory: '<workdir>/checkpoints' (local or gs://).
    options: cadence and retention (`config.checkpoint`).
    async_save: write in a background thread (orbax async); `wait()` waits for it.
  """

  def __init__(self, directory: paths.PathLike,
               options: CheckpointOptions = CheckpointOptions(), *,
               async_save: bool = True) -> None:
    self.directory = paths.resolve(directory)
    self.options = options
    self.is_primary = jax.process_index() == 0
    self._last_save_step: Optional[int] = None
    self._last_save_time = time.monotonic()
    self._async = async_save
    self._rules = checkpoint_reading.Rules(frozenset(), True)
    # Saved steps whose files are not sealed yet, and the thread that seals them.
    self._unsealed: list[int] = []
    self._sealer = concurrent.futures.ThreadPoolExecutor(max_workers=1)
    self._sealing: list[concurrent.futures.Future] = []
    # (path, reason) of checkpoints skipped by the last restore, newest first.
    self.unreadable: list[tuple[str, str]] = []
    self._manager = ocp.CheckpointManager(
        self.directory, item_names=ITEMS, options=ocp.CheckpointManagerOptions(
            max_to_keep=options.keep, create=True, enable_async_checkpointing=async_save,
            save_decision_policy=_save_policy(options), cleanup_tmp_directories=True))

  # ---------------------------------------------------------------- signature
  def check_signature(self, signature: dict) -> None:
    """Refuses checkpoints of another model; records the signature (and format) if new.

    Raises (on every process):
      SignatureMismatchError: checkpoints exist and their stored signature differs.
    """
    error = None
    if self.is_primary:
      try:
        self._rules = self._check_signature(signature)
      except SignatureMismatchError as e:
        error = e
    raise_together(error)
    if not self.is_primary:
      self._rules = checkpoint_reading.Rules.of(integrity.read_signature(self.directory))

  def _check_signature(self, signature: dict) -> checkpoint_reading.Rules:
    old = integrity.read_signature(self.directory)
    existing = [s for s, _ in step_dirs(self.directory)]
    if old is not None and existing and not integrity.same_model(old, signature):
      raise SignatureMismatchError(
          f"Workdir {self.directory.parent} holds checkpoints of a different model "
          f"({integrity.signature_diff(old, signature)}); use a fresh --workdir or restore "
          "the original config.")
    if existing and old is not None and old.get("checkpoint_format", 0) >= (
        integrity.FORMAT_VERSION):
      return checkpoint_reading.Rules.of(old)
    if existing:
      # Checkpoints of an older format stay readable by their own rules; new ones are strict.
      signature = dict(signature, legacy_steps=existing)
    paths.write_text_atomic(self.directory / integrity.SIGNATURE_FILE,
                            json.dumps(signature, indent=1, sort_keys=True))
    return checkpoint_reading.Rules.of(signature)

  # ------------------------------------------------------------------ restore
  def all_steps(self) -> list[int]:
    """Steps of the committed checkpoints, ascending."""
    return [s for s, _ in step_dirs(self.directory)]

  def restore_latest(self, template: Any) -> tuple[Optional[Any], int]:
    """Restores the newest readable checkpoint as global arrays shaped like `template`.

    Args:
      template: a TrainState of ShapeDtypeStructs carrying the shardings to restore to.

    Returns:
      (state, step), or (None, 0) when there is no checkpoint.

    Raises (on every process):
      SignatureMismatchError: a sealed checkpoint holds another layout.
      ValueError: checkpoints exist but none is readable.
    """
    self.unreadable = []
    target = _as_dict(template)
    found = step_dirs(self.directory)
    for step, step_dir in reversed(found):
      restored, reason, error = None, "", None
      try:
        restored = checkpoint_reading.load_step(step_dir, step, target, self._rules, partial=False,
                             on_device=True, verify=self.is_primary)
      except UnreadableError as e:
        reason = str(e)
      except SignatureMismatchError as e:
        error = e
      raise_together(error)
      verdict = agree(restored is not None, reason)
      if verdict is None:
        self._set_aside_newer(step)
        if self.is_primary and not integrity.is_sealed(step_dir):
          integrity.seal(step_dir)  # A kill after the commit left it unsealed.
        self._last_save_step = step
        logging.info("Restored checkpoint %s (step %d).", step_dir, step)
        # Older formats come back as numpy: place them like the template.
        restored = jax.tree.map(
            lambda x, t: mesh_lib.place(x, t.sharding) if isinstance(
                getattr(t, "sharding", None), jax.sharding.Sharding) and not isinstance(
                    x, jax.Array) else x, restored, target)
        return (type(template)(**restored) if hasattr(template, "_asdict") else restored), step
      self.unreadable.append((os.fspath(step_dir), verdict))
    if found:
      # Starting from scratch here would silently throw away a run: refuse instead.
      raise ValueError(
          f"All {len(found)} checkpoints in {self.directory} are unreadable (newest: "
          f"{self.unreadable[0][1]}); move that directory away to start from scratch.")
    return None, 0

  def _set_aside_newer(self, step: int) -> None:
    """Moves unreadable checkpoints newer than `step` out of the way, kept for inspection.

    The resumed run will write those step numbers again, which orbax refuses while a
    directory of that name exists.
    """
    error = None
    if self.is_primary:
      aside = self.directory.parent / UNREADABLE_DIR
      for name, _ in self.unreadable:
        source = epath.Path(name)
        if int(source.name) <= step or not source.exists():
          continue
        target = aside / f"{source.name}.{int(time.time())}"
        while target.exists():  # The same step set aside twice within a second.
          target = target.with_name(target.name + "_")
        try:
          aside.mkdir(parents=True, exist_ok=True)
          source.rename(target)
        except OSError as e:
          error = ValueError(f"Checkpoint {name} is unreadable and cannot be moved to {aside} "
                             f"({e.strerror}); move or delete it by hand, then rerun.")
          break
    raise_together(error)
    if self.unreadable:
      self._manager.reload()

  # --------------------------------------------------------------------- save
  def time_due(self) -> bool:
    """Whether `every_seconds` passed since the last save (this host's clock)."""
    every = self.options.every_seconds
    return bool(every) and time.monotonic() - self._last_save_time >= every

  def step_due(self, step: int) -> bool:
    every = self.options.every_steps
    return bool(every) and step % every == 0

  def save(self, step: int, state: Any) -> bool:
    """Writes `state` as checkpoint `step`, on every process (a no-op if already saved).

    Args:
      step: the training step the state has completed (also the data position).
      state: the TrainState of global arrays. It is copied to host memory before this
        returns, so the caller may donate the device buffers to the next step at once.

    Returns:
      True if a save was started.

    Raises (on every process):
      NonFiniteStateError: a leaf holds NaN or Inf (nothing is written).
    """
    if step == self._last_save_step:
      return False
    named = _as_dict(state)
    meta = {"format": integrity.FORMAT_VERSION, "step": int(step), "time": time.time()}
    error = None
    if self.is_primary:
      # Host copies: process 0 writes the (replicated) arrays, as orbax would, and saved as
      # numpy they carry no device layout, so stock orbax restores them on any topology.
      tree = jax.tree.map(checkpoint_reading.host_array, named)
      host = integrity.leaves_by_path(tree)
      bad = first_nonfinite(host)
      if bad is not None:
        error = NonFiniteStateError(f"the state to checkpoint at step {step} holds NaN/Inf "
                                    f"in {bad}")
      meta.update(shapes={p: list(x.shape) for p, x in host.items()},
                  digests=integrity.digests(host))
      # A disk too full for the checkpoint fails here, in one line, before orbax starts a
      # write that would fail in its background threads.
      needed = sum(x.nbytes for x in host.values()) * 1.05 + (1 << 20)
      if error is None and not paths.is_url(self.directory):
        free = shutil.disk_usage(self.directory).free
        if free < needed:
          error = _no_space(self.directory, f"checkpoint {step} needs {needed / 1e6:.0f} MB, "
                                            f"{free / 1e6:.0f} MB free")
    else:  # Only process 0 writes numpy arrays: the others pass views of a zero, no copies.
      tree = jax.tree.map(lambda x: np.broadcast_to(np.zeros((), x.dtype), x.shape), named)
    raise_together(error)
    # The previous write must have committed before its files can be sealed (orbax would wait
    # for it here anyway); the seal is then computed in the background.
    self._wait_for_orbax()
    self._seal_committed(background=True)
    try:
      self._manager.save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave(tree), meta=ocp.args.JsonSave(meta)), force=True)
    except Exception as e:  # pylint: disable=broad-except
      if _disk_full(e):
        raise _no_space(self.directory) from None
      raise
    self._unsealed.append(step)
    self._last_save_step = step
    self._last_save_time = time.monotonic()
    if not self._async:
      self.wait()
    return True

  def _seal_committed(self, background: bool) -> None:
    steps, self._unsealed = self._unsealed, []
    if not self.is_primary:
      return
    for step in steps:
      step_dir = self.directory / str(step)
      if background:
        self._sealing.append(self._sealer.submit(integrity.seal, step_dir))
      else:
        integrity.seal(step_dir)

  def _wait_for_orbax(self) -> None:
    try:
      self._manager.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except  (a background write failed)
      if _disk_full(e):
        raise _no_space(self.directory) from None
      raise

  def wait(self) -> None:
    """Blocks until any background write has been committed and sealed."""
    self._wait_for_orbax()
    self._seal_committed(background=False)
    for future in self._sealing:
      future.result()
    self._sealing = []

  def close(self) -> None:
    """Waits for pending writes and seals and releases orbax resources."""
    if self._manager is not None:
      try:
        self.wait()
      finally:
        self._manager.close()
        self._manager = None
        self._sealer.shutdown(wait=True)

