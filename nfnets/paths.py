"""The one path layer: local paths and cloud storage (gs://) through `etils.epath`.

Every file the project writes or reads under a workdir (checkpoints, digests, the model
signature, config.json, metrics.jsonl, the compile cache, outputs of eval/predict/export) and
every data or weights path goes through here, so a workdir can be `gs://bucket/run` on a TPU pod
(whose workers share no disk) as well as a local directory. `etils.epath` is what orbax itself
uses; it reads gs:// through TensorFlow's filesystem or, with EPATH_USE_TF=false, through
fsspec/gcsfs.

Local paths are made absolute (so a config.json written from one directory is valid from
another); URLs (`scheme://...`) are kept as they are.
"""

from __future__ import annotations

import os
import uuid
from typing import Union

from etils import epath

PathLike = Union[str, os.PathLike, epath.Path]


def is_url(path: PathLike) -> bool:
  """True for `scheme://...` paths (gs://, s3://, ...), False for local ones."""
  return "://" in os.fspath(path)


def resolve(path: PathLike) -> epath.Path:
  """An epath.Path: local paths expanded (~) and absolute, URLs unchanged."""
  text = os.fspath(path)
  if is_url(text):
    return epath.Path(text)
  return epath.Path(os.path.abspath(os.path.expanduser(text)))


def absolute(path: PathLike) -> str:
  """`resolve` as a string: what config.json stores."""
  return os.fspath(resolve(path))


def local(path: PathLike) -> str:
  """The local filesystem path, refusing URLs (for APIs that only take local files)."""
  text = os.fspath(path)
  if is_url(text):
    raise ValueError(f"{text}: this needs a local path, not a URL.")
  return os.path.abspath(os.path.expanduser(text))


def user_cache_dir() -> str:
  """Where commands that only read keep their caches: $NFNETS_CACHE_DIR, else
  $XDG_CACHE_HOME/nfnets, else ~/.cache/nfnets."""
  base = os.environ.get("NFNETS_CACHE_DIR")
  if not base:
    base = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"),
                        "nfnets")
  return os.path.abspath(base)


def compilation_cache_dir() -> str:
  """JAX's persistent compilation cache of readers: $NFNETS_COMPILATION_CACHE, else
  <user_cache_dir>/jax (a second predict or eval of the same model then compiles nothing)."""
  explicit = os.environ.get("NFNETS_COMPILATION_CACHE")
  if explicit:
    return os.path.abspath(os.path.expanduser(explicit))
  return os.path.join(user_cache_dir(), "jax")


def write_text_atomic(path: PathLike, text: str) -> None:
  """Writes `path` so that a reader sees the old or the new content, never a partial one.

  Local disks: a temporary file in the same directory, fsynced, then renamed over `path`
  (atomic). Object stores: one object upload is atomic by itself.
  """
  target = resolve(path)
  if is_url(target):
    target.write_text(text)
    return
  tmp = target.parent / f".{target.name}.{uuid.uuid4().hex[:8]}.tmp"
  try:
    with open(tmp, "w", encoding="utf-8") as f:
      f.write(text)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, target)
  finally:
    if os.path.exists(tmp):
      os.unlink(tmp)
