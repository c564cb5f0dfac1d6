"""TensorFlow's load-time lines stay off the console; everything else still reaches it."""

import subprocess
import sys

from tests.command_helpers import REPO, environment


def _stderr_of(code: str) -> str:
  proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=environment(),
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr
  return proc.stderr


def test_importing_tensorflow_prints_nothing_and_the_console_works_after():
  # On CPUs with AVX-512 VNNI/BF16 a plain `import tensorflow` prints two oneDNN lines here.
  assert _stderr_of("from nfnets.quiet_tensorflow import tf; tf.constant(1)") == ""


def test_only_what_is_written_while_loading_is_dropped():
  code = ("import os, sys\n"
          "from nfnets import quiet_tensorflow as q\n"
          "with q._stderr_dropped():\n"
          "  os.write(2, b'runtime line\\n')\n"
          "print('after', file=sys.stderr)\n"
          "os.write(2, b'runtime after\\n')\n")
  assert _stderr_of(code) == "after\nruntime after\n"
