"""Crash-proof training checkpoints over orbax: periodic, atomic, verified, resumable.

What a checkpoint holds: the whole host-local (unreplicated) `TrainState` -- params, Haiku
state, optimizer state, EMA copies, step and rng. The data position needs no extra field: the
input pipeline is keyed by step (batch k depends only on (seed, k, host)), so the restored step
*is* the data position.

Guarantees:
  * Atomic writes: orbax writes into a temporary directory and renames it when complete, so a
    crash mid-write never leaves a half checkpoint that looks finished.
  * Integrity, two digests (SHA-256), both verified on restore; a mismatch makes the
    checkpoint unreadable like a truncated one:
    - of every array, computed from the host copy before writing and committed atomically
      with the data (the small JSON item): it catches corruption on the way to the disk too;
    - of every file of the checkpoint, read back from the disk once orbax has committed it
      (`<step>/nfnets_files.sha256.json`, written in a background thread): it catches every
      flipped bit afterwards, also in bytes that no value depends on.
    A kill between the commit and the file digests leaves a checkpoint with array digests
    only, which restores (verified by them). We looked for this in orbax 0.12.8 first: its
    zarr3 layout checksums (crc32c) only the shard *index*, never the chunk data, no option
    adds a data checksum, and OCDBT files carry none, so the digests are ours. Checkpoints
    written before digests existed restore unverified.
  * Unreadable checkpoints (truncated, corrupt, digest mismatch) are reported by name, moved to
    `<workdir>/unreadable_checkpoints/`, and the previous good one is used.
  * Nothing non-finite is written: `save` refuses a state with a NaN/Inf anywhere (params, EMA,
    model state, optimizer state).
  * Keep the last K; save every N steps (orbax `FixedIntervalPolicy`) and/or every M seconds
    (orbax `ContinuousCheckpointingPolicy`).
  * A small JSON *model signature* (model name, kwargs, param shapes) is stored next to the
    checkpoints; resuming a workdir whose signature differs is refused with a clear error
    instead of silently re-initialising or loading mismatched weights.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import logging
import os
import time
from typing import Any, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint.checkpoint_managers import save_decision_policy as save_policies

from nfnets.train.distributed import raise_together
from nfnets.train.options import CheckpointOptions, to_plain
from nfnets.train.state import first_nonfinite

SIGNATURE_FILE = "model_signature.json"
FILE_DIGESTS = "nfnets_files.sha256.json"
# Version 2: the meta item holds per-array digests. Version 1 checkpoints (no digests) restore
# unverified, so workdirs written before digests existed still resume.
FORMAT_VERSION = 2


class SignatureMismatchError(ValueError):
  """The workdir holds checkpoints of a different model than the one configured."""


class NonFiniteStateError(ValueError):
  """A state with NaN/Inf values was handed to `save`; it was not written."""


def _leaf_paths(tree: Any) -> list[str]:
  return [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def digest(array: np.ndarray) -> str:
  """SHA-256 of an array's bytes, with its dtype and shape (so a reinterpretation differs)."""
  array = np.ascontiguousarray(array)
  h = hashlib.sha256(f"{array.dtype.str}{array.shape}".encode())
  h.update(memoryview(array).cast("B") if array.size else b"")
  return h.hexdigest()


def _digests(arrays: dict[str, np.ndarray]) -> dict[str, str]:
  # hashlib releases the GIL on large buffers: threads hash several arrays at once.
  with concurrent.futures.ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
    return dict(zip(arrays, pool.map(digest, arrays.values())))


def _file_digest(path: str) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 24), b""):
      h.update(block)
  return h.hexdigest()


def _checkpoint_files(step_dir: str) -> list[str]:
  """Every file of a committed checkpoint, relative to it, but the file-digest list itself."""
  out = []
  for root, _, names in os.walk(step_dir):
    for name in names:
      rel = os.path.relpath(os.path.join(root, name), step_dir)
      if rel != FILE_DIGESTS:
        out.append(rel)
  return sorted(out)


def seal(step_dir: str) -> None:
  """Writes the digest of every file of a committed checkpoint into it (atomically)."""
  try:
    digests = {rel: _file_digest(os.path.join(step_dir, rel))
               for rel in _checkpoint_files(step_dir)}
  except FileNotFoundError:  # Deleted meanwhile (keep=K dropped it): nothing to seal.
    return
  tmp = os.path.join(step_dir, FILE_DIGESTS + ".tmp")
  with open(tmp, "w") as f:
    json.dump(digests, f, indent=0, sort_keys=True)
  os.replace(tmp, os.path.join(step_dir, FILE_DIGESTS))


def verify_files(step_dir: str) -> bool:
  """Checks a sealed checkpoint's files against its digests; False when it is not sealed."""
  path = os.path.join(step_dir, FILE_DIGESTS)
  if not os.path.exists(path):
    return False
  with open(path) as f:
    saved = json.load(f)
  files = _checkpoint_files(step_dir)
  if sorted(saved) != files:
    missing, extra = sorted(set(saved) - set(files)), sorted(set(files) - set(saved))
    raise ValueError(f"its files changed (missing {missing[:2]}, unexpected {extra[:2]})")
  for rel in files:
    if _file_digest(os.path.join(step_dir, rel)) != saved[rel]:
      raise ValueError(f"{rel} does not match its digest: the file changed on disk after the "
                       "checkpoint was written")
  return True


def model_signature(model_name: str, model_kwargs: Any, params: Any) -> dict:
  """Builds the JSON-able identity of a model: name, constructor kwargs, param shapes.

  Args:
    model_name: registry name, e.g. 'NFNet'.
    model_kwargs: constructor kwargs (dict or ConfigDict).
    params: a params tree (arrays or ShapeDtypeStructs) whose shapes identify the weights.

  Returns:
    A dict with keys 'model', 'kwargs' and 'param_shapes' ({path: [dims...]}).
  """
  shapes = {jax.tree_util.keystr(p): [int(d) for d in np.shape(x)]
            for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}
  return {"model": model_name, "kwargs": to_plain(model_kwargs), "param_shapes": shapes}


def _signature_diff(old: dict, new: dict, limit: int = 3) -> str:
  """One-line summary of the first differences between two signatures."""
  diffs = []
  if old.get("model") != new.get("model"):
    diffs.append(f"model {old.get('model')!r} -> {new.get('model')!r}")
  ok, nk = old.get("kwargs", {}), new.get("kwargs", {})
  for k in sorted(set(ok) | set(nk)):
    if ok.get(k) != nk.get(k):
      diffs.append(f"kwargs.{k} {ok.get(k)!r} -> {nk.get(k)!r}")
  os_, ns = old.get("param_shapes", {}), new.get("param_shapes", {})
  for k in sorted(set(os_) | set(ns)):
    if os_.get(k) != ns.get(k):
      diffs.append(f"param {k} {os_.get(k)} -> {ns.get(k)}")
  more = f" (+{len(diffs) - limit} more)" if len(diffs) > limit else ""
  return "; ".join(diffs[:limit]) + more


def _save_policy(options: CheckpointOptions) -> save_policies.SaveDecisionPolicy:
  policies = []
  if options.every_steps:
    policies.append(save_policies.FixedIntervalPolicy(options.every_steps))
  if options.every_seconds:
    policies.append(save_policies.ContinuousCheckpointingPolicy(
        minimum_interval_secs=int(options.every_seconds)))
  # Never by itself: saves are then only the forced ones (end of training, signals).
  return save_policies.AnySavePolicy(policies or [save_policies.SpecificStepsPolicy(())])


class Checkpointer:
  """Periodic, atomic, verified, resumable checkpoints of a host-local `TrainState`.

  Only the writer process (host 0) creates files; other hosts get `restore` results by
  broadcast from host 0, so the workdir need not be shared storage for restoring.

  Args:
    directory: where checkpoints live (created on host 0), e.g. '<workdir>/checkpoints'.
    options: cadence and retention (`config.checkpoint`).
    is_writer: whether this process writes (True on host 0 only).
    async_save: write in a background thread (orbax async); `close()` waits for it.
  """

  def __init__(self, directory: str, options: CheckpointOptions = CheckpointOptions(), *,
               is_writer: bool = True, async_save: bool = True) -> None:
    self.directory = os.path.abspath(directory)
    self.is_writer = is_writer
    self._last_save_step: Optional[int] = None
    self._manager: Optional[ocp.CheckpointManager] = None
    self._async = async_save
    # Saved steps whose files are not digested yet, and the thread that digests them.
    self._unsealed: list[int] = []
    self._sealer = concurrent.futures.ThreadPoolExecutor(max_workers=1)
    self._sealing: list[concurrent.futures.Future] = []
    # (path, reason) of checkpoints skipped by the last restore, newest first.
    self.unreadable: list[tuple[str, str]] = []
    if is_writer:
      manager_options = ocp.CheckpointManagerOptions(
          # create=False: orbax refuses to create the root when active_processes is set.
          max_to_keep=options.keep, create=False, enable_async_checkpointing=async_save,
          save_decision_policy=_save_policy(options),
          # Only host 0 takes part: other hosts never call into orbax, so no barriers.
          multiprocessing_options=ocp.options.MultiprocessingOptions(
              primary_host=jax.process_index(), active_processes={jax.process_index()}),
          cleanup_tmp_directories=True)
      os.makedirs(self.directory, exist_ok=True)
      self._manager = ocp.CheckpointManager(self.directory, options=manager_options,
                                            item_names=("state", "meta"))

  # ---------------------------------------------------------------- signature
  def check_signature(self, signature: dict) -> None:
    """Refuses to continue if existing checkpoints belong to a different model.

    Writes the signature when the directory holds no checkpoint yet.

    Args:
      signature: from `model_signature`.

    Raises:
      SignatureMismatchError: checkpoints exist and their stored signature differs.
    """
    if not self.is_writer:
      return
    path = os.path.join(self.directory, SIGNATURE_FILE)
    if self.all_steps() and os.path.exists(path):
      try:
        with open(path) as f:
          old = json.load(f)
      except (OSError, ValueError) as e:
        raise SignatureMismatchError(
            f"{path} is unreadable ({type(e).__name__}: {e}); restore it from a backup, or "
            "delete it to accept the checkpoints beside it as this model's.") from None
      new = json.loads(json.dumps(signature))  # Normalise tuples -> lists, int keys -> str.
      if old != new:
        raise SignatureMismatchError(
            f"Workdir {os.path.dirname(self.directory)} holds checkpoints of a different model "
            f"({_signature_diff(old, new)}); use a fresh --workdir or restore the original config.")
      return
    os.makedirs(self.directory, exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
      json.dump(signature, f, indent=1, sort_keys=True)
    os.replace(tmp, path)  # Atomic: a crash never leaves a half-written signature.

  # ------------------------------------------------------------------ restore
  def all_steps(self) -> list[int]:
    """Steps of the finished checkpoints on disk, ascending."""
    if self._manager is None:
      return []
    self._manager.reload()
    return sorted(self._manager.all_steps())

  def restore_latest(self, template: Any) -> tuple[Optional[Any], int]:
    """Restores the newest readable checkpoint into the structure of `template`.

    Args:
      template: a host-local TrainState (arrays or ShapeDtypeStructs) giving the tree
        structure, shapes and dtypes.

    Returns:
      (state, step): the restored tree and its step, or (None, 0) when there is none.
    """
    restored, step, error = None, 0, None
    if self.is_writer:
      try:
        restored, step = self._restore_on_writer(template)
      except ValueError as e:  # Unreadable checkpoints or another model's: see raise_together.
        error = e
    raise_together(error)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      found = multihost_utils.broadcast_one_to_all(np.int32(restored is not None))
      if not found:
        return None, 0
      if restored is None:  # Non-writers receive the writer's values.
        restored = jax.tree.map(lambda x: np.zeros(np.shape(x), x.dtype), template)
      restored = multihost_utils.broadcast_one_to_all(restored)
      step = int(multihost_utils.broadcast_one_to_all(np.int64(step)))
    return restored, step

  def _restore_on_writer(self, template: Any) -> tuple[Optional[Any], int]:
    leaves, treedef = jax.tree_util.tree_flatten(template)
    paths = _leaf_paths(template)
    shapes = [[int(d) for d in np.shape(x)] for x in leaves]
    target = {f"{i:05d}": np.zeros(np.shape(x), np.dtype(x.dtype)) for i, x in enumerate(leaves)}
    self.unreadable = []
    steps = self.all_steps()
    for step in reversed(steps):
      name = os.path.join(self.directory, str(step))
      try:
        meta = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        meta = meta["meta"]
      except Exception as e:  # pylint: disable=broad-except
        self._note_unreadable(name, e)
        continue
      # Layout and shapes are checked from the small JSON first: a checkpoint of another
      # model must be refused, never mistaken for a corrupt one (which would fall back and,
      # with nothing left, silently start from scratch).
      if list(meta.get("paths", [])) != paths:
        raise SignatureMismatchError(
            f"Checkpoint {name} holds a different train-state layout than this run builds "
            "(optimizer or model changed); use a fresh --workdir or restore the original config.")
      if "shapes" in meta and meta["shapes"] != shapes:
        bad = next(p for p, a, b in zip(paths, meta["shapes"], shapes) if a != b)
        raise SignatureMismatchError(
            f"Checkpoint {name} holds {bad} with a different shape than this model builds; "
            "use a fresh --workdir or restore the original config.")
      try:
        verify_files(name)
        out = self._manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target)))
        arrays = {k: np.asarray(v) for k, v in out["state"].items()}
        self._verify(meta, arrays)
      except Exception as e:  # pylint: disable=broad-except
        # Any failure to read (truncated file, missing shard, bad metadata, changed bytes)
        # means this checkpoint is unusable; the previous one was written completely before it.
        self._note_unreadable(name, e)
        continue
      state = jax.tree_util.tree_unflatten(treedef, [arrays[k] for k in sorted(arrays)])
      self._set_aside_newer(step)
      self._last_save_step = step
      logging.info("Restored checkpoint %s (step %d).", name, step)
      return state, step
    if steps:
      # Starting from scratch here would silently throw away a run: refuse instead.
      raise ValueError(
          f"All {len(steps)} checkpoints in {self.directory} are unreadable (newest: "
          f"{self.unreadable[0][1]}); move that directory away to start from scratch.")
    return None, 0

  @staticmethod
  def _verify(meta: dict, arrays: dict[str, np.ndarray]) -> None:
    """Raises when the restored arrays are not the bytes that were saved (version >= 2)."""
    if meta.get("format", 1) < 2:
      return
    saved = meta.get("digests")
    if not isinstance(saved, dict) or sorted(saved) != sorted(arrays):
      raise ValueError("its digest list does not match its arrays")
    got = _digests(arrays)
    bad = [k for k in sorted(arrays) if got[k] != saved[k]]
    if bad:
      where = meta["paths"][int(bad[0])] if bad[0].isdigit() else bad[0]
      raise ValueError(f"digest mismatch in {len(bad)} array(s), first {where}: the data "
                       "changed on disk after it was written")

  def _note_unreadable(self, name: str, error: Exception) -> None:
    first = str(error).splitlines()[0][:200] if str(error) else ""
    reason = f"{type(error).__name__}: {first}"
    self.unreadable.append((name, reason))
    logging.info("Checkpoint %s is unreadable (%s); falling back to the previous one.",
                 name, reason)

  def _set_aside_newer(self, step: int) -> None:
    """Moves unreadable checkpoints newer than `step` out of the way, kept for inspection.

    The resumed run will write those step numbers again, which orbax refuses while a
    directory of that name exists.
    """
    aside = os.path.join(os.path.dirname(self.directory), "unreadable_checkpoints")
    for name, _ in self.unreadable:
      if int(os.path.basename(name)) > step and os.path.exists(name):
        target = os.path.join(aside, f"{os.path.basename(name)}.{int(time.time())}")
        while os.path.exists(target):  # The same step set aside twice within a second.
          target += "_"
        try:
          os.makedirs(aside, exist_ok=True)
          os.replace(name, target)
        except OSError as e:
          raise ValueError(f"Checkpoint {name} is unreadable and cannot be moved to {aside} "
                           f"({e.strerror}); move or delete it by hand, then rerun.") from None
    if self.unreadable:
      self._manager.reload()

  # --------------------------------------------------------------------- save
  def should_save(self, step: int) -> bool:
    """Whether orbax's save policies (every N steps / M seconds) want a checkpoint at `step`."""
    if self._manager is None or (self._last_save_step is not None
                                 and step <= self._last_save_step):
      return False
    return self._manager.should_save(step)

  def save(self, step: int, state: Any) -> bool:
    """Writes `state` as checkpoint `step` (no-op on non-writers or if already saved).

    Args:
      step: the training step the state has completed (also the data position).
      state: host-local TrainState; it is copied to host memory before returning, so the
        caller may donate the device buffers to the next step at once.

    Returns:
      True if a save was started.

    Raises:
      NonFiniteStateError: a leaf holds NaN or Inf (nothing is written).
    """
    if self._manager is None or step == self._last_save_step:
      return False
    leaves = jax.device_get(jax.tree_util.tree_leaves(state))
    arrays = {f"{i:05d}": np.asarray(x) for i, x in enumerate(leaves)}
    paths = _leaf_paths(state)
    bad = first_nonfinite(dict(zip(paths, leaves)))
    if bad is not None:
      raise NonFiniteStateError(f"the state to checkpoint at step {step} holds NaN/Inf in {bad}")
    meta = {"format": FORMAT_VERSION, "paths": paths,
            "shapes": [list(np.shape(x)) for x in leaves], "digests": _digests(arrays),
            "step": int(step), "time": time.time()}
    # The previous write must have committed before its files can be digested (orbax would
    # wait for it here anyway); the digests are then taken in the background.
    self._manager.wait_until_finished()
    self._seal_committed(background=True)
    self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(arrays), meta=ocp.args.JsonSave(meta)), force=True)
    self._unsealed.append(step)
    self._last_save_step = step
    if not self._async:
      self._seal_committed(background=False)
    return True

  def _seal_committed(self, background: bool) -> None:
    """Digests the files of every committed, unsealed checkpoint."""
    steps, self._unsealed = self._unsealed, []
    for step in steps:
      step_dir = os.path.join(self.directory, str(step))
      if background:
        self._sealing.append(self._sealer.submit(seal, step_dir))
      else:
        seal(step_dir)

  def wait(self) -> None:
    """Blocks until any background write has been committed and its files digested."""
    if self._manager is not None:
      self._manager.wait_until_finished()
      self._seal_committed(background=False)
    for future in self._sealing:
      future.result()
    self._sealing = []

  def close(self) -> None:
    """Waits for pending writes and digests and releases orbax resources."""
    if self._manager is not None:
      self.wait()
      self._manager.close()
      self._manager = None
    self._sealer.shutdown(wait=True)
