"""Tests for nfnets.inference.export: both artifacts reload and give the library's logits."""

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from photos import photo
from inference_helpers import TINY, random_params
from nfnets import weights
from nfnets.inference import export, loading
from nfnets.inference.classifier import Classifier
from nfnets.weights.npz import ModelSpec

# float32 logits through a folded graph vs the unfolded library model: round-off only.
RTOL = 1e-5


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
  root = tmp_path_factory.mktemp("export")
  spec = ModelSpec("NFNet", 10, TINY["NFNet"], eval_image_size=32)
  weights.save_params(root / "tiny.npz", random_params("NFNet"), model=spec)
  loaded = loading.load_model(str(root / "tiny.npz"))
  written = export.write_exports(loaded, str(root / "out"))
  clf = Classifier(loaded)
  from PIL import Image  # pylint: disable=g-import-not-at-top
  pixels = np.stack([np.asarray(Image.fromarray(photo(n)).resize((32, 32), Image.BICUBIC))
                     for n in ("grace_hopper", "china", "flower")])
  from nfnets.data.normalization import normalize  # pylint: disable=g-import-not-at-top
  want = clf.logits_of(normalize(pixels.astype(np.float32), 3))
  return root / "out", written, pixels, want


def _close(got, want):
  assert got.shape == want.shape
  assert np.linalg.norm(got - want) / np.linalg.norm(want) <= RTOL, (got, want)


def test_writes_every_format(exported):
  out, written, _, _ = exported
  assert sorted(os.path.basename(p) for p in written) == [
      "export.json", "model_float32.jax_export", "model_uint8.jax_export", "params.npz",
      "saved_model"]
  params, spec = weights.read_npz(out / "params.npz")
  assert spec.name == "NFNet" and spec.eval_image_size == 32 and "gain" in params[
      "NFNet/~/stem_conv0"]  # The npz keeps the trainable (unfolded) parameters.


def test_jax_export_runs_with_plain_jax_and_any_batch(exported):
  out, _, pixels, want = exported
  # A fresh interpreter that never imports this project: only jax and numpy.
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
  env = dict(os.environ, PYTHONPATH="")
  proc = subprocess.run([sys.executable, "-c", script], cwd="/", env=env, capture_output=True,
                        text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr
  for dtype in ("uint8", "float32"):
    _close(np.load(out / f"logits_{dtype}.npy"), want)
    _close(np.load(out / f"logits_{dtype}_one.npy"), want[:1])  # Symbolic batch: 1 works too.


def test_savedmodel_takes_uint8_and_float_pixels(exported):
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  out, _, pixels, want = exported
  model = tf.saved_model.load(str(out / "saved_model"))
  uint8 = model.signatures["serving_default"](images=tf.constant(pixels))["logits"]
  floats = model.signatures["float_pixels"](images=tf.constant(pixels, tf.float32))["logits"]
  _close(uint8.numpy(), want)
  _close(floats.numpy(), want)
