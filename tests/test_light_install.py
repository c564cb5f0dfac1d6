"""The core install: models, weights and inference need none of the training extras.

`pip install nfnets` (no extras) brings JAX, Haiku, optax, numpy, pillow, ml-collections and
etils; TensorFlow, TFDS, orbax, scipy, matplotlib and the demo data come with `[train]`. This
test runs `python -m nfnets.predict` with NFNet-F0 on a real photograph in a process where
every one of those heavier packages (and pandas, scikit-learn, torch) fails to import.
"""

import os
import shutil
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np

from nfnets import weights
from nfnets.models import registry
from tests.command_helpers import FAST_XLA_FLAGS
from tests.photos import photo_path

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BLOCKED = ("tensorflow", "tensorflow_datasets", "tensorboard", "orbax", "scipy", "matplotlib",
           "mlxtend", "pandas", "sklearn", "torch", "timm", "gcsfs")

_RUNNER = textwrap.dedent("""
    import importlib.abc, runpy, sys
    BLOCKED = {blocked!r}

    class Blocker(importlib.abc.MetaPathFinder):
      def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
          raise ImportError(f"{{name}} is not installed (blocked by the test)")
        return None

    sys.meta_path.insert(0, Blocker())
    sys.argv = ["nfnets.predict"] + sys.argv[1:]
    runpy.run_module("nfnets.predict", run_name="__main__", alter_sys=True)
""")


def test_predict_with_f0_needs_no_training_extras(tmp_path):
  forward = registry.make_forward("NFNet", 1000, variant="F0")
  shapes, _ = jax.eval_shape(lambda: forward.init(jax.random.PRNGKey(0),
                                                  jnp.zeros((1, 32, 32, 3)), is_training=True))
  rng = np.random.default_rng(0)
  params = {m: {n: (rng.standard_normal(s.shape) * 0.05).astype(np.float32)
                for n, s in leaves.items()} for m, leaves in shapes.items()}
  path = tmp_path / "f0.npz"
  weights.save_params(path, params, weights.ModelSpec(name="NFNet", num_classes=1000,
                                                      kwargs={"variant": "F0"}))
  image = tmp_path / "grace_hopper.jpg"
  shutil.copy(photo_path("grace_hopper"), image)
  runner = tmp_path / "run_blocked.py"
  runner.write_text(_RUNNER.format(blocked=BLOCKED))
  env = dict(os.environ, NFNETS_COMPILATION_CACHE=str(tmp_path / "cache"),
             JAX_PLATFORMS="cpu", XLA_FLAGS=" ".join(FAST_XLA_FLAGS))
  proc = subprocess.run([sys.executable, str(runner), f"--weights={path}", "--top=3",
                         str(image)], cwd=REPO, env=env, capture_output=True, text=True,
                        timeout=600)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  line = proc.stdout.strip().splitlines()[-1]
  # Three ImageNet classes with their probabilities, from an F0 at its 256 px test size.
  assert line.startswith(f"{image}: ") and line.count(" | ") == 2, line
  assert "1 image(s) classified" in proc.stderr
