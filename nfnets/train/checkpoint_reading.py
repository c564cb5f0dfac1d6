"""Reading checkpoints: one step verified and restored, and the read-only reader of a run.

`load_step` reads one `<workdir>/checkpoints/<step>/`: the seal (every file), the format the
directory requires (its model signature's record, never the checkpoint's own claim), the step
(state, meta item and directory name must agree), the layout, the arrays and their digests. It
serves both the training run resuming (`checkpoints.Checkpointer`, the whole state as global
arrays) and readers (`read_weights`: params and model state alone, as numpy, no optimizer).
Checkpoints of formats 1 and 2 (arrays under index keys) restore too.

Readers never write, move or delete anything, so they run beside a training run (a checkpoint
written or deleted meanwhile is skipped) and on a read-only copy.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from nfnets import paths
from nfnets.train import integrity
from nfnets.train.integrity import SignatureMismatchError


def step_dirs(directory: paths.PathLike) -> list[tuple[int, epath.Path]]:
  """(step, path) of the committed checkpoints in `directory`, ascending.

  On local disks orbax writes into a temporary name and renames it (so a digit name is
  finished); on object storage, where there is no rename, a step directory is finished only
  once its commit marker exists, and one being written (or cut off by a kill) is not listed.
  """
  root = paths.resolve(directory)
  if not root.exists():
    return []
  out = [(int(p.name), p) for p in root.iterdir() if p.name.isdigit() and p.is_dir()]
  if paths.is_url(root):
    out = [(step, p) for step, p in out if ocp.utils.is_checkpoint_finalized(p)]
  return sorted(out)


class UnreadableError(ValueError):
  """This checkpoint cannot be used (its reason is the message); an older one may be."""


# ----------------------------------------------------------------------------- one step
@dataclasses.dataclass(frozen=True)
class Rules:
  """What the directory requires of a step: format 3, or the legacy formats' own claim."""
  legacy_steps: frozenset[int]
  strict: bool  # The directory was created with (or upgraded to) format 3.

  @classmethod
  def of(cls, signature: Optional[dict]) -> "Rules":
    signature = signature or {}
    strict = signature.get("checkpoint_format", 0) >= integrity.FORMAT_VERSION
    legacy = signature.get("legacy_steps", [])
    return cls(frozenset(int(s) for s in legacy if isinstance(s, int)), strict)

  def legacy_allowed(self, step: int) -> bool:
    return not self.strict or step in self.legacy_steps


def _read_meta(step_dir: epath.Path) -> dict:
  try:
    meta = json.loads((step_dir / "meta" / "metadata").read_text())
  except (OSError, ValueError, RecursionError, UnicodeDecodeError) as e:
    raise UnreadableError(f"its meta item is unreadable ({type(e).__name__})") from None
  if not isinstance(meta, dict):
    raise UnreadableError("its meta item is not a JSON object")
  return meta


def _legacy_paths(target: dict) -> dict[str, str]:
  """{leaf path: the path formats 1 and 2 listed} for `target`'s leaves.

  Those formats saved the TrainState NamedTuple, whose leaves jax names ".params['m']['w']":
  the field as an attribute, the rest as jax's key string.
  """
  out = {}
  for path, _ in jax.tree_util.tree_flatten_with_path(target)[0]:
    field = integrity.key_name(path[0])
    out[integrity.leaf_path(path)] = f".{field}{jax.tree_util.keystr(path[1:])}"
  return out


def _restore_args(target: dict, on_device: bool) -> Any:
  """Global arrays where the target leaf carries a sharding (and `on_device`), else numpy."""
  def args(x):
    sharding = getattr(x, "sharding", None)
    if on_device and isinstance(sharding, jax.sharding.Sharding):
      return ocp.ArrayRestoreArgs(sharding=sharding, global_shape=x.shape, dtype=x.dtype)
    return ocp.RestoreArgs(restore_type=np.ndarray, dtype=np.dtype(x.dtype))
  return jax.tree.map(args, target)


def host_array(x: Any) -> np.ndarray:
  """A numpy copy of a (replicated global or host) array."""
  return np.asarray(x.addressable_data(0)) if isinstance(x, jax.Array) else np.asarray(x)


def load_step(step_dir: epath.Path, step: int, target: dict, rules: Rules, *,
              partial: bool, on_device: bool, verify: bool = True) -> dict:
  """Reads and verifies one checkpoint into `target`'s structure.

  Args:
    step_dir: the checkpoint directory.
    step: its step (the directory name).
    target: {leaf path: ShapeDtypeStruct} of what to read, as a nested dict of TrainState
      field names (e.g. {'params': ..., 'step': ...}).
    rules: what the directory requires.
    partial: only the fields in `target` (readers); else the whole state (resuming).
    on_device: restore as global arrays with the target's shardings (else numpy).
    verify: check the seal and the array digests (False on processes other than 0, which
      share process 0's verdict through `agree`).

  Returns:
    The restored nested dict.

  Raises:
    UnreadableError: the checkpoint fails a check (the reason names it).
    SignatureMismatchError: a sealed checkpoint holds another layout.
  """
  try:
    sealed = integrity.verify_files(step_dir) if verify else False
  except (ValueError, OSError) as e:
    raise UnreadableError(str(e)) from None
  meta = _read_meta(step_dir)
  fmt = meta.get("format", 1)
  if not isinstance(fmt, int) or (fmt != integrity.FORMAT_VERSION and not (
      rules.legacy_allowed(step) and fmt in (1, 2))):
    raise UnreadableError(f"its meta item declares format {fmt!r}, which this directory does "
                          f"not allow for step {step}")
  if meta.get("step") != step:
    raise UnreadableError(f"its meta item says step {meta.get('step')!r}, its directory name "
                          f"{step}")
  wanted = integrity.leaves_by_path(target)
  if fmt == integrity.FORMAT_VERSION:
    restored, arrays = _restore_named(step_dir, meta, target, wanted, partial, on_device, sealed)
  else:
    restored, arrays = _restore_indexed(step_dir, meta, target, wanted, fmt, sealed)
  if verify and fmt >= 2:
    try:
      integrity.check_digests(meta.get("digests"), arrays)
    except ValueError as e:
      raise UnreadableError(str(e)) from None
  own_step = int(host_array(restored["step"])) if "step" in restored else step
  if own_step != step:
    raise UnreadableError(f"its state is at step {own_step}, its directory name says {step}")
  return restored


def _layout_error(step_dir: epath.Path, detail: str, sealed: bool) -> Exception:
  if not sealed:  # The meta item may be what is damaged: fall back rather than refuse.
    return UnreadableError(f"its layout does not match ({detail})")
  return SignatureMismatchError(
      f"Checkpoint {step_dir} holds a different train-state layout than this run builds "
      f"({detail}: optimizer or model changed); use a fresh --workdir or restore the original "
      "config.")


def _restore_named(step_dir, meta, target, wanted, partial, on_device, sealed):
  saved = meta.get("digests")
  shapes = meta.get("shapes")
  if not isinstance(saved, dict) or not isinstance(shapes, dict):
    raise UnreadableError("its meta item has no digests")
  missing = sorted(set(wanted) - set(saved))
  extra = [] if partial else sorted(set(saved) - set(wanted))
  if missing or extra:
    raise _layout_error(step_dir, f"missing {missing[:2]}, unexpected {extra[:2]}", sealed)
  for path, x in wanted.items():
    if list(shapes.get(path, [])) != list(x.shape):
      raise _layout_error(step_dir, f"{path} has shape {shapes.get(path)}, expected "
                          f"{list(x.shape)}", sealed)
  try:
    restored = ocp.PyTreeCheckpointer().restore(
        step_dir / "state", args=ocp.args.PyTreeRestore(
            item=target, restore_args=_restore_args(target, on_device), partial_restore=partial))
  except Exception as e:  # pylint: disable=broad-except  (any read failure: truncated, missing)
    raise UnreadableError(f"{type(e).__name__}: {_first_line(e)}") from None
  arrays = {p: host_array(x) for p, x in integrity.leaves_by_path(restored).items()}
  return restored, arrays


def _restore_indexed(step_dir, meta, target, wanted, fmt, sealed):
  """Formats 1 and 2: arrays under '00000', ... with the leaf paths listed in the meta item."""
  listed = meta.get("paths")
  if not isinstance(listed, list):
    raise UnreadableError("its meta item has no leaf paths")
  index = {p: i for i, p in enumerate(listed)}
  keys = {}
  legacy_paths = _legacy_paths(target)
  for path in wanted:
    legacy = legacy_paths[path]
    if legacy not in index:
      raise _layout_error(step_dir, f"missing {path}", sealed)
    keys[path] = f"{index[legacy]:05d}"
  item = {keys[p]: np.zeros(x.shape, x.dtype) for p, x in wanted.items()}
  try:
    out = ocp.PyTreeCheckpointer().restore(step_dir / "state", args=ocp.args.PyTreeRestore(
        item=item, restore_args=_restore_args(item, False), partial_restore=True))
  except Exception as e:  # pylint: disable=broad-except
    raise UnreadableError(f"{type(e).__name__}: {_first_line(e)}") from None
  arrays = {p: np.asarray(out[keys[p]]) for p in wanted}
  if fmt >= 2:  # Digests are keyed by index in format 2.
    meta["digests"] = {p: (meta.get("digests") or {}).get(keys[p]) for p in wanted}
  leaves, treedef = jax.tree_util.tree_flatten(target)
  del leaves
  restored = jax.tree_util.tree_unflatten(treedef, [arrays[p] for p in wanted])
  return restored, arrays


def _first_line(error: BaseException) -> str:
  text = str(error).strip().splitlines()
  return text[0][:200] if text else ""


# ------------------------------------------------------------------------------ readers
@dataclasses.dataclass(frozen=True)
class Weights:
  """A run's weights as a reader gets them (numpy).

  Attributes:
    params: Haiku params (the EMA copy when asked for).
    state: Haiku state.
    step: the checkpoint's step.
    path: the checkpoint directory read.
    skipped: (path, reason) of newer checkpoints that were unreadable.
  """
  params: dict
  state: dict
  step: int
  path: str
  skipped: tuple[tuple[str, str], ...] = ()


def read_weights(checkpoint_dir: paths.PathLike, shapes: dict, *, ema: bool = True) -> Weights:
  """The params and model state of the newest verified checkpoint; builds no optimizer.

  Read-only: nothing in the directory is written, moved or deleted, so this runs beside a
  training run (a checkpoint being written or deleted meanwhile is skipped) and on a read-only
  copy. Unreadable checkpoints are skipped and reported in `Weights.skipped`.

  Args:
    checkpoint_dir: `<workdir>/checkpoints`.
    shapes: {'params': tree, 'state': tree} of ShapeDtypeStructs: what the model expects.
    ema: the EMA copies (what the paper evaluates) or the raw ones.

  Raises:
    ValueError: there is no checkpoint, or none is readable (naming the newest's reason).
    SignatureMismatchError: a sealed checkpoint holds another model.
  """
  root = paths.resolve(checkpoint_dir)
  rules = Rules.of(integrity.read_signature(root))
  fields = ("ema_params", "ema_state") if ema else ("params", "state")
  target = {fields[0]: shapes["params"], fields[1]: shapes["state"],
            "step": jax.ShapeDtypeStruct((), np.int32)}
  target = {k: v for k, v in target.items() if jax.tree.leaves(v) or k == "step"}
  skipped = []
  found = step_dirs(root)
  for step, step_dir in reversed(found):
    try:
      out = load_step(step_dir, step, target, rules, partial=True, on_device=False)
    except (UnreadableError, FileNotFoundError) as e:
      skipped.append((os.fspath(step_dir), str(e)))
      continue
    return Weights(out.get(fields[0], {}), out.get(fields[1], {}), step, os.fspath(step_dir),
                   tuple(skipped))
  if not found:
    raise ValueError(f"{root} holds no checkpoint yet; train first or pass a weights file.")
  raise ValueError(f"No readable checkpoint in {root} (newest {skipped[0][0]}: "
                   f"{skipped[0][1]}).")
