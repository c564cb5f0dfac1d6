"""Crash-proof training checkpoints over orbax: periodic, atomic, resumable, guarded.

What a checkpoint holds: the whole host-local (unreplicated) `TrainState` -- params, Haiku
state, optimizer state, EMA copies, step and rng. The data position needs no extra field: the
input pipeline is keyed by step (batch k depends only on (seed, k, host)), so the restored step
*is* the data position.

Guarantees:
  * Atomic writes: orbax writes into a temporary directory and renames it when complete, so a
    crash mid-write never leaves a half checkpoint that looks finished.
  * Keep the last K, save every N steps and/or every M seconds.
  * A small JSON *model signature* (model name, kwargs, param shapes) is stored next to the
    checkpoints; resuming a workdir whose signature differs is refused with a clear error
    instead of silently re-initialising or loading mismatched weights.
  * A truncated or corrupt latest checkpoint is reported by name and the previous good one is
    used instead.
  * `StopFlag` turns SIGTERM/SIGINT into a flag checked once per step, so the loop can save
    and exit 0 (pre-emptible machines send SIGTERM).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import time
from typing import Any, Mapping, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp

SIGNATURE_FILE = "model_signature.json"


class SignatureMismatchError(ValueError):
  """The workdir holds checkpoints of a different model than the one configured."""


class StoppedByHostZeroError(ValueError):
  """Host 0 refused to start (bad workdir, unreadable checkpoints, nothing to evaluate)."""


# Room for host 0's one-line error when it is sent to the other hosts (longer is cut).
_MESSAGE_BYTES = 1024


def raise_together(error: Optional[Exception]) -> None:
  """Raises on every process when host 0 failed a start-up check; returns when it did not.

  Only host 0 reads the workdir, so only host 0 can find it unusable. If it raised alone, the
  other hosts would wait in their next collective until a cluster timeout, with no message.
  Every process calls this at the same point; host 0 passes what it caught (or None), the
  others pass None and receive host 0's message, so every log names the cause.

  Args:
    error: the exception host 0 caught, or None.

  Raises:
    `error` itself on host 0, `StoppedByHostZeroError` with host 0's message elsewhere.
  """
  if jax.process_count() == 1:
    if error is not None:
      raise error
    return
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  text = f"{type(error).__name__}: {error}".encode()[:_MESSAGE_BYTES] if error else b""
  message = np.zeros(_MESSAGE_BYTES, np.uint8)
  message[:len(text)] = np.frombuffer(text, np.uint8)
  message = np.asarray(multihost_utils.broadcast_one_to_all(message))  # Host 0's copy wins.
  if error is not None:
    raise error
  received = bytes(message).rstrip(b"\0").decode(errors="replace")
  if received:
    raise StoppedByHostZeroError(f"Host 0 stopped the run: {received}")


def _leaf_paths(tree: Any) -> list[str]:
  return [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def _jsonable(value: Any) -> Any:
  """Converts config values (tuples, ConfigDicts, dataclasses) to plain JSON types."""
  if hasattr(value, "to_dict"):
    value = value.to_dict()
  if isinstance(value, Mapping):
    return {str(k): _jsonable(v) for k, v in sorted(value.items())}
  if isinstance(value, (list, tuple)):
    return [_jsonable(v) for v in value]
  if hasattr(value, "__dataclass_fields__"):
    return {k: _jsonable(getattr(value, k)) for k in sorted(value.__dataclass_fields__)}
  if isinstance(value, (np.generic,)):
    return value.item()
  if value is None or isinstance(value, (bool, int, float, str)):
    return value
  return repr(value)


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
  return {"model": model_name, "kwargs": _jsonable(model_kwargs), "param_shapes": shapes}


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


class StopFlag:
  """Records SIGTERM/SIGINT instead of dying, so the loop can checkpoint and exit cleanly.

  Use as a context manager; the previous handlers are restored on exit. A second SIGINT
  while the flag is already set falls through to the default handler (a stuck run can still
  be killed with two Ctrl-C).
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

  def __enter__(self) -> "StopFlag":
    for sig in (signal.SIGTERM, signal.SIGINT):
      try:
        self._previous[sig] = signal.signal(sig, self._handle)
      except ValueError:  # Not the main thread (e.g. under some test runners): no handlers.
        pass
    return self

  def __exit__(self, *exc: Any) -> None:
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)


class Checkpointer:
  """Periodic, atomic, resumable checkpoints of a host-local `TrainState`.

  Only the writer process (host 0) creates files; other hosts get `restore` results by
  broadcast from host 0, so the workdir need not be shared storage for restoring.

  Args:
    directory: where checkpoints live (created on host 0), e.g. '<workdir>/checkpoints'.
    every_steps: save when this many steps passed since the last save (0 disables).
    every_seconds: save when this many seconds passed since the last save (0 disables).
    keep: how many most recent checkpoints to keep (>= 1).
    is_writer: whether this process writes (True on host 0 only).
    async_save: write in a background thread (orbax async); `close()` waits for it.
  """

  def __init__(self, directory: str, *, every_steps: int = 1000, every_seconds: float = 600.0,
               keep: int = 3, is_writer: bool = True, async_save: bool = True) -> None:
    if keep < 1:
      raise ValueError(f"checkpoint.keep must be >= 1, got {keep}; set --config.checkpoint.keep=3.")
    if every_steps < 0 or every_seconds < 0:
      raise ValueError("checkpoint.every_steps/every_seconds must be >= 0 (0 disables).")
    self.directory = os.path.abspath(directory)
    self.every_steps = int(every_steps)
    self.every_seconds = float(every_seconds)
    self.is_writer = is_writer
    self._last_save_step: Optional[int] = None
    self._last_save_time = time.monotonic()
    self._manager: Optional[ocp.CheckpointManager] = None
    # (path, reason) of checkpoints skipped by the last restore, newest first.
    self.unreadable: list[tuple[str, str]] = []
    if is_writer:
      options = ocp.CheckpointManagerOptions(
          # create=False: orbax refuses to create the root when active_processes is set.
          max_to_keep=keep, create=False, enable_async_checkpointing=async_save,
          # Only host 0 takes part: other hosts never call into orbax, so no barriers.
          multiprocessing_options=ocp.options.MultiprocessingOptions(
              primary_host=jax.process_index(), active_processes={jax.process_index()}),
          cleanup_tmp_directories=True)
      os.makedirs(self.directory, exist_ok=True)
      self._manager = ocp.CheckpointManager(self.directory, options=options,
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
      with open(path) as f:
        old = json.load(f)
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
        out = self._manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target)))
      except Exception as e:  # pylint: disable=broad-except
        # Any failure to read (truncated file, missing shard, bad metadata) means this
        # checkpoint is unusable; the previous one was written completely before it.
        self._note_unreadable(name, e)
        continue
      arrays = out["state"]
      state = jax.tree_util.tree_unflatten(treedef, [np.asarray(arrays[k]) for k in sorted(arrays)])
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

  def _note_unreadable(self, name: str, error: Exception) -> None:
    first = str(error).splitlines()[0][:200] if str(error) else ""
    reason = f"{type(error).__name__}: {first}"
    self.unreadable.append((name, reason))
    logging.warning("Checkpoint %s is unreadable (%s); falling back to the previous one.",
                    name, reason)

  def _set_aside_newer(self, step: int) -> None:
    """Moves unreadable checkpoints newer than `step` out of the way, kept for inspection.

    The resumed run will write those step numbers again, which orbax refuses while a
    directory of that name exists.
    """
    aside = os.path.join(os.path.dirname(self.directory), "unreadable_checkpoints")
    for name, _ in self.unreadable:
      if int(os.path.basename(name)) > step and os.path.exists(name):
        os.makedirs(aside, exist_ok=True)
        os.replace(name, os.path.join(aside, f"{os.path.basename(name)}.{int(time.time())}"))
    if self.unreadable:
      self._manager.reload()

  # --------------------------------------------------------------------- save
  def should_save(self, step: int) -> bool:
    """Whether the step/time interval since the last save has elapsed."""
    if self._last_save_step is not None and step <= self._last_save_step:
      return False
    last = self._last_save_step or 0
    if self.every_steps and step - last >= self.every_steps:
      return True
    return bool(self.every_seconds) and time.monotonic() - self._last_save_time >= self.every_seconds

  def save(self, step: int, state: Any) -> bool:
    """Writes `state` as checkpoint `step` (no-op on non-writers or if already saved).

    Args:
      step: the training step the state has completed (also the data position).
      state: host-local TrainState; it is copied to host memory before returning, so the
        caller may donate the device buffers to the next step at once.

    Returns:
      True if a save was started.
    """
    self._last_save_time = time.monotonic()
    if self._manager is None or step == self._last_save_step:
      return False
    leaves = jax.device_get(jax.tree_util.tree_leaves(state))
    arrays = {f"{i:05d}": np.asarray(x) for i, x in enumerate(leaves)}
    meta = {"paths": _leaf_paths(state), "shapes": [list(np.shape(x)) for x in leaves],
            "step": int(step), "time": time.time()}
    self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(arrays), meta=ocp.args.JsonSave(meta)), force=True)
    self._last_save_step = step
    return True

  def maybe_save(self, step: int, state: Any) -> bool:
    """Saves when `should_save(step)`; returns whether it did."""
    return self.save(step, state) if self.should_save(step) else False

  def wait(self) -> None:
    """Blocks until any background write has been committed."""
    if self._manager is not None:
      self._manager.wait_until_finished()

  def close(self) -> None:
    """Waits for pending writes and releases orbax resources."""
    if self._manager is not None:
      self._manager.wait_until_finished()
      self._manager.close()
      self._manager = None
