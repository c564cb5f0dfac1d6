"""What makes a checkpoint trustworthy: SHA-256 digests, the leaf paths, the model signature.

Two digests per checkpoint, both checked before a checkpoint is used (see checkpoints.py):
  * of every array, keyed by its leaf path ('params/NFNet/~/stem_conv0/w'), computed from the
    host copy before writing and stored in the checkpoint's meta item: it catches corruption on
    the way to the disk too;
  * of every file of the checkpoint (`nfnets_files.sha256.json`, "the seal"), read back once
    orbax has committed the step: it catches every flipped bit afterwards, also in bytes no
    value depends on, the meta item included.
orbax 0.12.8 offers neither: its zarr3 layout checksums (crc32c) only the shard index, never the
chunk data, and OCDBT files carry none.

What a checkpoint must satisfy is decided by the directory, never by the checkpoint's own
bytes: `model_signature.json` records the checkpoint format the directory was created with, so a
flipped bit in a checkpoint's meta item cannot downgrade its verification.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import os
from collections.abc import Mapping
from typing import Any, Optional

import jax
import numpy as np
from etils import epath

from nfnets import paths
from nfnets.train.options import to_plain

SIGNATURE_FILE = "model_signature.json"
FILE_DIGESTS = "nfnets_files.sha256.json"
# 3: the TrainState saved under its leaf paths, array digests keyed by path, every checkpoint
# sealed. 2: arrays under index keys ('00000', ...) with a side list of paths, array digests.
# 1: index keys, no digests. Directories whose signature records no format hold 1 or 2.
FORMAT_VERSION = 3


def key_name(key: Any) -> str:
  """One step of a pytree path as text: a dict key, a field name or a sequence index."""
  for attr in ("key", "name", "idx"):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def leaf_path(path: tuple) -> str:
  """'params/NFNet/~/stem_conv0/w' for the leaf at `path` of a TrainState (or any pytree)."""
  return "/".join(key_name(k) for k in path)


def leaves_by_path(tree: Any) -> dict[str, Any]:
  """{leaf path: leaf} of a pytree, in flattening order."""
  return {leaf_path(p): x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def digest(array: np.ndarray) -> str:
  """SHA-256 of an array's bytes, with its dtype and shape (so a reinterpretation differs)."""
  array = np.ascontiguousarray(array)
  h = hashlib.sha256(f"{array.dtype.str}{array.shape}".encode())
  h.update(memoryview(array).cast("B") if array.size else b"")
  return h.hexdigest()


def digests(arrays: Mapping[str, np.ndarray]) -> dict[str, str]:
  """{name: digest} of several arrays, hashed in parallel threads."""
  # hashlib releases the GIL on large buffers: threads hash several arrays at once.
  with concurrent.futures.ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
    return dict(zip(arrays, pool.map(digest, arrays.values())))


def check_digests(saved: Any, arrays: Mapping[str, np.ndarray]) -> None:
  """Raises ValueError unless `arrays` are exactly the bytes `saved` describes (by name)."""
  if not isinstance(saved, dict) or not set(arrays) <= set(saved):
    raise ValueError("its digest list does not cover its arrays")
  got = digests(arrays)
  bad = [k for k in arrays if got[k] != saved[k]]
  if bad:
    raise ValueError(f"digest mismatch in {len(bad)} array(s), first {bad[0]}: the data "
                     "changed on disk after it was written")


def _file_digest(path: epath.Path) -> str:
  h = hashlib.sha256()
  with path.open("rb") as f:
    for block in iter(lambda: f.read(1 << 24), b""):
      h.update(block)
  return h.hexdigest()


def checkpoint_files(step_dir: paths.PathLike) -> list[str]:
  """Every file of a committed checkpoint, relative to it, but the seal itself."""
  out = []

  # Relative names are built while descending: a walk over gs:// yields its directories
  # without the scheme, so cutting the root's prefix off them would give wrong names.
  def visit(directory: epath.Path, prefix: str) -> None:
    for path in directory.iterdir():
      rel = prefix + path.name
      if path.is_dir():
        visit(path, rel + "/")
      elif rel != FILE_DIGESTS:
        out.append(rel)

  visit(paths.resolve(step_dir), "")
  return sorted(out)


def is_sealed(step_dir: paths.PathLike) -> bool:
  return (paths.resolve(step_dir) / FILE_DIGESTS).exists()


def seal(step_dir: paths.PathLike) -> bool:
  """Writes the digest of every file of a committed checkpoint into it; False if it vanished."""
  root = paths.resolve(step_dir)
  try:
    if not root.exists():  # Never committed (a failed write), or dropped by keep=K.
      return False
    found = {rel: _file_digest(root / rel) for rel in checkpoint_files(root)}
    paths.write_text_atomic(root / FILE_DIGESTS, json.dumps(found, indent=0, sort_keys=True))
  except FileNotFoundError:  # Deleted meanwhile (keep=K dropped it): nothing to seal.
    return False
  return True


def verify_files(step_dir: paths.PathLike) -> bool:
  """Checks a sealed checkpoint's files against the seal; False when it is not sealed.

  Raises:
    ValueError: a file is missing, unexpected, or differs from its digest.
  """
  root = paths.resolve(step_dir)
  try:
    saved = json.loads((root / FILE_DIGESTS).read_text())
  except FileNotFoundError:
    return False
  except (OSError, ValueError) as e:
    raise ValueError(f"its seal {FILE_DIGESTS} is unreadable ({type(e).__name__})") from None
  if not isinstance(saved, dict):
    raise ValueError(f"its seal {FILE_DIGESTS} is not a digest list")
  files = checkpoint_files(root)
  if sorted(saved) != files:
    missing, extra = sorted(set(saved) - set(files)), sorted(set(files) - set(saved))
    raise ValueError(f"its files changed (missing {missing[:2]}, unexpected {extra[:2]})")
  for rel in files:
    if _file_digest(root / rel) != saved[rel]:
      raise ValueError(f"{rel} does not match its digest: the file changed on disk after the "
                       "checkpoint was written")
  return True


# ------------------------------------------------------------------------- model signature
class SignatureMismatchError(ValueError):
  """The workdir holds checkpoints of a different model than the one configured."""


def model_signature(model_name: str, model_kwargs: Any, params: Any,
                    data: Optional[Any] = None) -> dict:
  """The JSON-able identity of a model, of what its outputs mean, and of its checkpoints.

  Args:
    model_name: registry name, e.g. 'NFNet'.
    model_kwargs: constructor kwargs (dict or ConfigDict).
    params: a params tree (arrays or ShapeDtypeStructs) whose shapes identify the weights.
    data: the run's DatasetInfo: its class count, channels and class names are recorded, so
      a reader can tell when `dataset.json` no longer describes the checkpoints.

  Returns:
    A dict with keys 'model', 'kwargs', 'param_shapes' ({path: [dims...]}),
    'checkpoint_format' and (with `data`) 'data'.
  """
  shapes = {jax.tree_util.keystr(p): [int(d) for d in np.shape(x)]
            for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}
  signature = {"model": model_name, "kwargs": to_plain(model_kwargs), "param_shapes": shapes,
               "checkpoint_format": FORMAT_VERSION}
  if data is not None:
    names = getattr(data, "class_names", None)
    signature["data"] = {"num_classes": int(data.num_classes), "channels": int(data.channels),
                         "class_names": list(names) if names else None}
  return json.loads(json.dumps(signature))  # Normalise tuples -> lists, int keys -> str.


def signature_diff(old: dict, new: dict, limit: int = 3) -> str:
  """One-line summary of the first differences between two signatures (format aside)."""
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
  od, nd = old.get("data") or {}, new.get("data") or {}
  if od and nd:
    for k in sorted(set(od) | set(nd)):
      if od.get(k) != nd.get(k):
        shown = lambda v: (f"{len(v)} names starting {v[:2]}" if isinstance(v, list) else repr(v))
        diffs.append(f"data.{k} {shown(od.get(k))} -> {shown(nd.get(k))}")
  more = f" (+{len(diffs) - limit} more)" if len(diffs) > limit else ""
  return "; ".join(diffs[:limit]) + more


_IDENTITY = ("model", "kwargs", "param_shapes")


def same_model(old: dict, new: dict) -> bool:
  """Whether two signatures describe the same model and data (the format may differ).

  The data description is compared only when both record one (older signatures do not).
  """
  if any(old.get(k) != new.get(k) for k in _IDENTITY):
    return False
  return not (old.get("data") and new.get("data") and old["data"] != new["data"])


def read_signature(directory: paths.PathLike) -> Optional[dict]:
  """The checkpoint directory's signature, None when it has none.

  Raises:
    SignatureMismatchError: it exists but cannot be read (naming the file and what to do).
  """
  path = paths.resolve(directory) / SIGNATURE_FILE
  try:
    text = path.read_text()
  except FileNotFoundError:
    return None
  try:
    signature = json.loads(text)
    if not isinstance(signature, dict):
      raise ValueError("not a JSON object")
    return signature
  except (ValueError, RecursionError) as e:
    raise SignatureMismatchError(
        f"{path} is unreadable ({type(e).__name__}); restore it from a backup, or delete it "
        "to accept the checkpoints beside it as this model's.") from None
