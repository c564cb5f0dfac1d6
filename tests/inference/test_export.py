"""Tests for `python -m nfnets.export` and nfnets.inference.export.

Every artifact the command writes reloads and gives the library's logits; mistakes are one
line. The artifacts are checked in one test: writing them (TensorFlow, jax2tf) is the costly
part, and a module fixture would be rebuilt by each pytest-xdist worker that runs a test of it.
"""

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from tests.command_helpers import run
from tests.photos import photo
from tests.inference.inference_helpers import TINY, random_params
from nfnets import weights
from nfnets.inference import loading
from nfnets.inference.classifier import Classifier
from nfnets.weights.npz import ModelSpec

# float32 logits through a folded graph vs the unfolded library model: round-off only.
RTOL = 1e-5


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  root = tmp_path_factory.mktemp("export")
  spec = ModelSpec("NFNet", 10, TINY["NFNet"], eval_image_size=32)
  weights.save_params(root / "tiny.npz", random_params("NFNet"), model=spec)
  return root


def _close(got, want):
  assert got.shape == want.shape
  assert np.linalg.norm(got - want) / np.linalg.norm(want) <= RTOL, (got, want)


def test_the_command_writes_every_format_and_each_gives_the_librarys_logits(tiny):
  out = tiny / "out" / "nested"  # Created with its parents.
  proc = run(["-m", "nfnets.export", f"--weights={tiny / 'tiny.npz'}", f"--out={out}",
              "--formats=jax,savedmodel,npz"], timeout=600)
  assert proc.returncode == 0, proc.stderr
  assert not proc.stderr.strip(), proc.stderr  # A clean console: no TF or absl log lines.
  assert all(line.startswith("wrote ") for line in proc.lines())
  written = [line.removeprefix("wrote ") for line in proc.lines()]
  assert sorted(os.path.basename(p) for p in written) == [
      "export.json", "model_float32.jax_export", "model_uint8.jax_export", "params.npz",
      "saved_model"]

  # What the library computes on three real photographs, already at the model's 32 px.
  from PIL import Image  # pylint: disable=g-import-not-at-top
  from nfnets.data.normalization import normalize  # pylint: disable=g-import-not-at-top
  pixels = np.stack([np.asarray(Image.fromarray(photo(n)).resize((32, 32), Image.BICUBIC))
                     for n in ("grace_hopper", "china", "flower")])
  want = Classifier(loading.load_model(str(tiny / "tiny.npz"))).logits_of(
      normalize(pixels.astype(np.float32), 3))

  # npz: the trainable (unfolded) parameters with the model described.
  params, spec = weights.read_npz(out / "params.npz")
  assert spec.name == "NFNet" and spec.eval_image_size == 32
  assert "gain" in params["NFNet/~/stem_conv0"]

  # jax.export: a fresh interpreter that never imports this project (only jax and numpy),
  # any batch size (the batch dimension is symbolic), uint8 or float pixels.
  script = textwrap.dedent(f"""
      import sys, numpy as np, jax
      pixels = np.load({str(out / 'pixels.npy')!r})
      for dtype in ('uint8', 'float32'):
        with open({str(out)!r} + f'/model_{{dtype}}.jax_export', 'rb') as f:
          model = jax.export.deserialize(f.read())
        x = pixels.astype(dtype)
        np.save({str(out)!r} + f'/logits_{{dtype}}.npy', np.asarray(model.call(x)))
        np.save({str(out)!r} + f'/logits_{{dtype}}_one.npy', np.asarray(model.call(x[:1])))
      assert not any(m.startswith('nfnets') for m in sys.modules), 'imported the project'
  """)
  np.save(out / "pixels.npy", pixels)
  proc = subprocess.run([sys.executable, "-c", script], cwd="/", capture_output=True, text=True,
                        env=dict(os.environ, PYTHONPATH=""), timeout=300)
  assert proc.returncode == 0, proc.stderr
  for dtype in ("uint8", "float32"):
    _close(np.load(out / f"logits_{dtype}.npy"), want)
    _close(np.load(out / f"logits_{dtype}_one.npy"), want[:1])

  # SavedModel: uint8 pixels by default, float pixels by name.
  from nfnets.quiet_tensorflow import tf  # pylint: disable=g-import-not-at-top
  model = tf.saved_model.load(str(out / "saved_model"))
  uint8 = model.signatures["serving_default"](images=tf.constant(pixels))["logits"]
  floats = model.signatures["float_pixels"](images=tf.constant(pixels, tf.float32))["logits"]
  _close(uint8.numpy(), want)
  _close(floats.numpy(), want)


@pytest.mark.parametrize("args,code,message", [
    (["--out={root}/o"], 2, "--weights is required"),
    (["--weights={root}/tiny.npz", "--out={root}/o", "--formats=onnx"], 2,
     "unknown format(s) ['onnx']"),
    (["--weights={root}/tiny.npz", "--out={root}/tiny.npz"], 1, "is not a directory"),
    (["--weights={root}/nope.npz", "--out={root}/o"], 1, "nope.npz does not exist"),
    (["--weights={root}/tiny.npz", "--out={root}/o", "stray"], 2, "unexpected arguments"),
])
def test_every_mistake_is_one_line_and_writes_nothing(tiny, args, code, message):
  proc = run(["-m", "nfnets.export", *(a.format(root=tiny) for a in args)])
  assert proc.returncode == code, proc.stderr
  (line,) = proc.lines("stderr")
  assert line.startswith("error: ") and message in line, line
  assert not (tiny / "o").exists()
