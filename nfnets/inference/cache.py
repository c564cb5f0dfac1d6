"""A persistent compilation cache for inference, so a second `predict` does not recompile.

Compiling F0's forward pass takes most of a cold one-image `predict` on a CPU; JAX's
persistent cache keeps the compiled executable on disk, keyed by the program (the network and
the input shape, not the weight values, which are arguments), the JAX version and the device.
A later process building the same network loads it instead of compiling.

Directory (`nfnets.paths.compilation_cache_dir`, shared with `--mode=eval` and `--mode=plan`),
first that is set: NFNETS_COMPILATION_CACHE, $NFNETS_CACHE_DIR/jax, $XDG_CACHE_HOME/nfnets/jax,
~/.cache/nfnets/jax. A cache configured already (JAX_COMPILATION_CACHE_DIR or jax.config) is left as it is. Entries
are a few MB per network and batch size; delete the directory to reclaim the space.
"""

from __future__ import annotations

import os
import sys
from typing import Optional


def enable_compilation_cache(directory: Optional[str] = None) -> Optional[str]:
  """Points JAX's persistent compilation cache at `directory` (default: the user's cache).

  Returns:
    The directory in use, or None when it cannot be created or written (a note is printed
    to stderr and programs are compiled as usual).
  """
  import jax  # pylint: disable=g-import-not-at-top
  configured = jax.config.jax_compilation_cache_dir
  if configured:
    return configured
  from nfnets import paths  # pylint: disable=g-import-not-at-top
  directory = os.path.abspath(os.path.expanduser(directory or paths.compilation_cache_dir()))
  try:
    os.makedirs(directory, exist_ok=True)
    writable = os.access(directory, os.W_OK | os.X_OK)
  except OSError:
    writable = False
  if not writable:
    print(f"note: compilation cache off: cannot write {directory} (set "
          "NFNETS_COMPILATION_CACHE to a writable directory)", file=sys.stderr)
    return None
  jax.config.update("jax_compilation_cache_dir", directory)
  # Every program here is a whole network's forward pass: always worth keeping.
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  return directory
