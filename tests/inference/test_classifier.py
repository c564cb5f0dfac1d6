"""Tests for nfnets.inference (loading + Classifier) and the `python -m nfnets.predict` CLI."""

import dataclasses
import json
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest

from photos import photo
from inference_helpers import TINY, random_params
from nfnets import weights
from nfnets.inference import classifier, loading
from nfnets.weights.npz import ModelSpec

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  """Two real photos, a folder with one more and a corrupt file, and two weight files."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  root = tmp_path_factory.mktemp("predict")
  Image.fromarray(photo("grace_hopper")).save(root / "grace.jpg")
  Image.fromarray(photo("china")[:200, :300]).save(root / "china.png")
  (root / "more").mkdir()
  Image.fromarray(photo("flower")).save(root / "more" / "flower.jpg")
  (root / "more" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
  params = random_params("NFNet", num_classes=1000)
  # Our npz, with the model described inside.
  weights.save_params(root / "tiny.npz", params,
                      model=ModelSpec("NFNet", 1000, TINY["NFNet"], eval_image_size=32))
  # DeepMind's format: a pickle of the plain params tree (the model must be described).
  with open(root / "tiny_haiku.npz", "wb") as f:
    pickle.dump(params, f)
  return root


def _predict(*args, files_dir):
  cmd = [sys.executable, "-m", "nfnets.predict", *args]
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
  return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def test_python_api_matches_the_readme_snippet(files):
  clf = classifier.Classifier.from_weights(files / "tiny.npz")
  probs, names = clf.predict([str(files / "grace.jpg"), photo("flower")])
  assert probs.shape == (2, 1000) and np.allclose(probs.sum(-1), 1, atol=1e-5)
  # 1000 classes: ImageNet's names, in label order, with their synsets.
  synsets = [s for s, _ in classifier.imagenet_classes()]
  assert synsets[0] == "n01440764" and classifier.imagenet_classes()[0][1].startswith("tench")
  assert names == [clf.labels[i][1] for i in probs.argmax(-1)]
  (top,) = clf.top_k([str(files / "grace.jpg")], k=5)
  assert [s.index for s in top] == list(np.argsort(-probs[0])[:5])
  assert top[0].synset == synsets[top[0].index]
  with pytest.raises(ValueError, match="broken.jpg: cannot read it as an image"):
    clf.preprocess(str(files / "more" / "broken.jpg"))


def test_loading_infers_or_is_told_the_model(files):
  with pytest.raises(ValueError, match="match no NFNet variant; pass --variant"):
    loading.load_model(str(files / "tiny_haiku.npz"))  # A tiny tree is no F-variant.
  loaded = loading.load_model(str(files / "tiny_haiku.npz"), model="NFNet",
                              model_kwargs=TINY["NFNet"])
  assert loaded.spec.num_classes == 1000  # Read off the classifier.
  with pytest.raises(ValueError, match="does not fit NFNet"):
    loading.load_model(str(files / "tiny.npz"), variant="F0")
  with pytest.raises(ValueError, match="does not exist"):
    loading.load_model(str(files / "nope.npz"))


@pytest.mark.parametrize("weights_file,extra", [
    ("tiny.npz", []),  # Our npz says which model it is.
    ("tiny_haiku.npz", ["--config=configs/fake_data.py"]),  # A config describes the model.
])
def test_cli_prints_five_classes_per_image_and_skips_what_it_cannot_read(files, weights_file,
                                                                          extra):
  out_json = files / f"{weights_file}.json"
  proc = _predict(f"--weights={files / weights_file}", f"--json={out_json}", *extra,
                  str(files / "grace.jpg"), str(files / "china.png"), str(files / "more"),
                  files_dir=files)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  lines = [l for l in proc.stdout.splitlines() if l.strip()]
  assert len(lines) == 3  # grace, china, flower: one line each.
  assert all(line.count(" | ") == 4 for line in lines)  # Five classes.
  skipped = [l for l in proc.stderr.splitlines() if l.startswith("skipped ")]
  assert len(skipped) == 1 and "broken.jpg" in skipped[0]
  result = json.load(open(out_json))
  records = result["predictions"]
  # The same model and protocol in Python (the fake-data config evaluates at 32 px too).
  loaded = loading.load_model(str(files / weights_file), model="NFNet",
                              model_kwargs=TINY["NFNet"])
  loaded = dataclasses.replace(loaded, spec=dataclasses.replace(loaded.spec,
                                                                eval_image_size=32))
  clf = classifier.Classifier(loaded)
  assert result["image_size"] == 32
  for record in records:
    top = record["top"]
    assert len(top) == 5 and 0.0 < sum(t["probability"] for t in top) <= 1.0 + 1e-6
    probs, names = clf.predict([record["file"]])
    assert top[0]["index"] == int(probs.argmax()) and top[0]["name"] == names[0]
    assert top[0]["synset"].startswith("n")
    np.testing.assert_allclose(top[0]["probability"], probs.max(), rtol=1e-5)


def test_cli_classifies_with_a_run_workdir_and_keeps_the_console_clean(files):
  # The committed workdir of an earlier version (tests/fixtures): the model comes from its
  # config.json, the weights from its newest checkpoint (EMA).
  workdir = os.path.join(REPO, "tests", "fixtures", "legacy_workdir")
  proc = _predict(f"--weights={workdir}", str(files / "grace.jpg"), files_dir=files)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  lines = [l for l in proc.stdout.splitlines() if l.strip()]
  assert len(lines) == 1 and lines[0].count(" | ") == 4, lines
  assert "classified with " + workdir + " (step 6, EMA weights)" in proc.stderr
  # orbax reports every restore step at INFO through absl ("I1202 13:30:55 ... checkpoint_
  # manager.py ..."): seen on the console before, hidden now.
  noisy = [l for l in proc.stderr.splitlines() if ".py:" in l and l[:1] in "IW" and l[1:5].isdigit()]
  assert not noisy, noisy[:3]
