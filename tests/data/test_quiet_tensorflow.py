"""TensorFlow loads without Keras and without its console lines; all else reaches the console."""

import subprocess
import sys

from tests.command_helpers import REPO, environment


def _run(code: str) -> subprocess.CompletedProcess:
  proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=environment(),
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr
  return proc


def test_importing_tensorflow_prints_nothing_and_the_console_works_after():
  # On CPUs with AVX-512 VNNI/BF16 a plain `import tensorflow` prints two oneDNN lines here.
  # Only what is written while loading is dropped: Python's and the runtime's later lines
  # reach the console.
  code = ("import os, sys\n"
          "from nfnets import quiet_tensorflow as q\n"
          "q.tf.constant(1)\n"
          "with q._stderr_dropped():\n"
          "  os.write(2, b'runtime line\\n')\n"
          "print('after', file=sys.stderr)\n"
          "os.write(2, b'runtime after\\n')\n")
  assert _run(code).stderr == "after\nruntime after\n"


def test_keras_is_not_loaded_with_tensorflow_and_stays_importable():
  # TensorFlow imports Keras eagerly (and Keras matplotlib) when it can: 1.4 s of every
  # command that reads data, for a library the input pipeline never uses.
  code = ("import importlib.util, sys\n"
          "from nfnets.quiet_tensorflow import tf\n"
          "total = tf.data.Dataset.range(3).reduce(tf.constant(0, tf.int64), lambda a, b: a + b)\n"
          "print(total.numpy())\n"
          "print(sorted({'keras', 'matplotlib'} & set(sys.modules)))\n"
          "print(importlib.util.find_spec('keras') is not None)\n")
  stdout = _run(code).stdout
  assert stdout.split("\n") == ["3", "[]", "True", ""], stdout
