"""TensorFlow (for tf.data and TFDS), imported without the lines it prints and without Keras.

On CPUs with AVX-512 VNNI/BF16, TensorFlow 2.21 logs "oneDNN custom operations are on ..."
twice while it loads, through absl before absl's logging is set up, whatever
TF_CPP_MIN_LOG_LEVEL says: on every command's console, and on a machine-dependent subset of
them. It also imports Keras (and through it matplotlib) whenever Keras is installed, which it
is as TensorFlow's own dependency: 1.4 s of loading and more of exiting, in every command that
reads data, for a library the input pipeline never uses. Import TensorFlow from here, before
anything that imports it (TFDS), so that those lines go nowhere and Keras stays unloaded:

  from nfnets.quiet_tensorflow import tf

or, before importing TFDS alone, `quiet_tensorflow.load()`. A failed import still raises as
usual; only what the loading itself writes to the standard error stream is dropped. Keras
stays importable afterwards (`tf.keras` loads it on first use).
"""

import contextlib
import os
import sys
from typing import Iterator


@contextlib.contextmanager
def _stderr_dropped() -> Iterator[None]:
  """File descriptor 2 points at /dev/null (the runtime writes there, not to sys.stderr)."""
  sys.stderr.flush()
  saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
  try:
    os.dup2(devnull, 2)
    yield
  finally:
    os.dup2(saved, 2)
    os.close(saved)
    os.close(devnull)


def load():
  """The tensorflow module, imported quietly if it is not yet."""
  if "tensorflow" in sys.modules:
    return sys.modules["tensorflow"]
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  keras_absent = "keras" not in sys.modules
  if keras_absent:
    # A None entry makes `import keras` fail and find_spec return None, which TensorFlow
    # takes as "Keras not installed" (it guards those imports); removed again below.
    sys.modules["keras"] = None
  try:
    with _stderr_dropped():
      import tensorflow  # pylint: disable=g-import-not-at-top
  finally:
    if keras_absent and sys.modules.get("keras", 0) is None:
      del sys.modules["keras"]
  return tensorflow


tf = load()
