"""What a user hands the inference tools, checked before any model is loaded.

Weights paths, the images to classify (files and folders, walked lazily) and output paths are
checked here with the standard library only, so a command line reports a wrong path at once,
not after importing JAX, loading weights and compiling a network. Every message names the path
and says what to do.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from typing import Union

from nfnets.files import IMAGE_EXTENSIONS

# The file a run's workdir is recognised by (`nfnets.train.workdir.CONFIG_FILE`).
WORKDIR_CONFIG = "config.json"


def check_weights_path(path: Union[str, os.PathLike]) -> str:
  """`path` if it can hold weights: an existing file, or a directory that is a run's workdir.

  Raises:
    ValueError: it does not exist, or is a directory without a run's config.json.
  """
  path = os.fspath(path)
  if "://" in path:  # Cloud storage: checked when it is read (nfnets.paths).
    return path
  if not os.path.exists(path):
    raise ValueError(f"{path} does not exist; pass a weights file (.npz) or a run's workdir.")
  if os.path.isdir(path) and not os.path.isfile(os.path.join(path, WORKDIR_CONFIG)):
    raise ValueError(f"{path} is not a run's workdir (it has no {WORKDIR_CONFIG}); pass the "
                     "--workdir of a training run, or a weights file (.npz).")
  return path


def check_output_file(path: Union[str, os.PathLike], what: str) -> str:
  """`path` if a file can be written there: its directory exists and is writable.

  Args:
    path: The file to write (it may exist; it will be replaced).
    what: How the user named it, e.g. '--json=preds.json', for messages.

  Raises:
    ValueError: naming `what` and the problem.
  """
  path = os.fspath(path)
  directory = os.path.dirname(os.path.abspath(path))
  if os.path.isdir(path):
    raise ValueError(f"{what}: {path} is a directory; name a file in it, e.g. "
                     f"{os.path.join(path, 'predictions.json')}.")
  if not os.path.isdir(directory):
    raise ValueError(f"{what}: the directory {directory} does not exist; create it first.")
  if not os.access(directory, os.W_OK | os.X_OK):
    raise ValueError(f"{what}: the directory {directory} is not writable; choose another.")
  return path


def check_output_dir(path: Union[str, os.PathLike], what: str) -> str:
  """`path` if it is a writable directory, or could be created as one (nothing is created).

  Raises:
    ValueError: naming `what` and the problem.
  """
  path = os.fspath(path)
  if os.path.exists(path) and not os.path.isdir(path):
    raise ValueError(f"{what}: {path} exists and is not a directory; name a new or existing "
                     "directory.")
  existing = os.path.abspath(path)
  while not os.path.exists(existing):  # The nearest ancestor that exists must be writable.
    existing = os.path.dirname(existing)
  if not os.path.isdir(existing):
    raise ValueError(f"{what}: {existing} is not a directory; name a new or existing "
                     "directory.")
  if not os.access(existing, os.W_OK | os.X_OK):
    raise ValueError(f"{what}: {existing} is not writable; choose another directory.")
  return path


def is_image_name(name: str) -> bool:
  return name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith(".")


def _walk(directory: str) -> Iterator[str]:
  """Image files under `directory`, sorted by name, files before sub-folders, lazily.

  Only one directory's listing is held at a time, so a folder of millions of images costs
  the memory of its largest directory listing. Hidden entries (names starting with '.') and
  symlinked directories (which can loop) are not followed. A directory that cannot be listed
  is yielded itself: reading it then fails with its own reason (e.g. permission denied).
  """
  try:
    with os.scandir(directory) as listing:
      entries = sorted(listing, key=lambda e: e.name)
  except OSError:
    yield directory
    return
  subdirs = []
  for entry in entries:
    if entry.name.startswith("."):
      continue
    if entry.is_dir(follow_symlinks=False):
      subdirs.append(entry.path)
    elif is_image_name(entry.name):
      # FIFOs, devices and symlinks to them are yielded too: reading refuses them by name,
      # rather than leaving them out without a word.
      yield entry.path
  for subdir in subdirs:
    yield from _walk(subdir)


def iter_image_files(paths: Iterable[Union[str, os.PathLike]]) -> Iterator[str]:
  """The files named (as given, whatever their extension), then the images under each folder.

  Folders are walked recursively and lazily (see `_walk`); a named path that does not exist
  is yielded as well, so the reader reports it with the others.
  """
  for path in map(os.fspath, paths):
    if os.path.isdir(path):
      yield from _walk(path)
    else:
      yield path


def check_config_path(path: str, what: str = "--config") -> str:
  """`path` ('file.py' or 'file.py:arg') if its file exists.

  Raises:
    ValueError: naming `what` and the missing file.
  """
  file = path.split(":", 1)[0]
  if not os.path.isfile(file):
    raise ValueError(f"{what}={path}: no such file {file!r}; use e.g. "
                     "--config=configs/fake_data.py")
  return path


def config_import_message(path: str, error: ImportError) -> str:
  """One line for a config file whose imports fail (typically: run outside the repository)."""
  name = getattr(error, "name", None) or str(error)
  if not str(name).startswith("configs"):  # A broken install, not a wrong directory.
    return f"--config={path}: {type(error).__name__}: {error}"
  return (f"--config={path}: cannot import {name!r}; the configs import each other as the "
          "`configs` package, so run from the repository root or add it to PYTHONPATH")
