"""Tests for nfnets.inference (loading, inputs, Classifier) and predict with a config or workdir.

The command's handling of files, folders and mistakes is in test_predict.py.
"""

import dataclasses
import json
import os
import pickle

import numpy as np
import pytest

from tests.command_helpers import REPO, run
from tests.photos import photo
from tests.inference.inference_helpers import TINY, random_params
from nfnets import weights
from nfnets.inference import classifier, inputs, loading
from nfnets.weights.npz import ModelSpec


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


def test_python_api_matches_the_readme_snippet(files):
  clf = classifier.Classifier.from_weights(files / "tiny.npz", batch_size=4)
  probs, names = clf.predict([str(files / "grace.jpg"), photo("flower")])
  assert probs.shape == (2, 1000) and np.allclose(probs.sum(-1), 1, atol=1e-5)
  # 1000 classes: ImageNet's names, in label order, with their synsets.
  synsets = [s for s, _ in classifier.imagenet_classes()]
  assert synsets[0] == "n01440764" and classifier.imagenet_classes()[0][1].startswith("tench")
  assert names == [clf.labels[i][1] for i in probs.argmax(-1)]
  (top,) = clf.top_k([str(files / "grace.jpg")], k=5)
  assert [s.index for s in top] == list(np.argsort(-probs[0])[:5])
  assert top[0].synset == synsets[top[0].index]
  with pytest.raises(ValueError, match="broken.jpg: not a readable image"):
    clf.preprocess(str(files / "more" / "broken.jpg"))
  with pytest.raises(ValueError, match="nope.jpg: does not exist"):
    clf.preprocess(str(files / "nope.jpg"))


def test_a_padded_batch_gives_each_image_its_own_logits(files):
  """Batches are padded to a power of two: one image alone, or among others, same logits."""
  clf = classifier.Classifier.from_weights(files / "tiny.npz", batch_size=4)
  images = [str(files / "grace.jpg"), str(files / "china.png"), str(files / "more/flower.jpg")]
  together = clf.logits(images)  # One batch of 3, padded to 4.
  alone = np.concatenate([clf.logits([im]) for im in images])  # Batches of 1, unpadded.
  np.testing.assert_allclose(together, alone, rtol=1e-4, atol=1e-5)
  assert [clf._bucket(n) for n in (1, 2, 3, 4)] == [1, 2, 4, 4]  # pylint: disable=protected-access
  assert classifier.Classifier.from_weights(files / "tiny.npz", batch_size=6)._bucket(5) == 6  # pylint: disable=protected-access
  with pytest.raises(ValueError, match="batch_size must be at least 1"):
    classifier.Classifier.from_weights(files / "tiny.npz", batch_size=0)


def test_classify_streams_and_reports_each_unreadable_image(files):
  clf = classifier.Classifier.from_weights(files / "tiny.npz", batch_size=2)
  consumed = []

  def images():  # A generator: classify must not need the whole list.
    for path in inputs.iter_image_files([files / "grace.jpg", files / "more",
                                         files / "missing.png"]):
      consumed.append(path)
      yield path

  stream = clf.classify(images(), k=3)
  first = next(stream)
  # The first batch (grace + broken, which is skipped at once) ran before the rest was read.
  assert first.error and "broken.jpg: not a readable image" in first.error
  assert len(consumed) == 2
  rest = list(stream)
  assert [os.path.basename(p.image) for p in rest] == ["grace.jpg", "flower.jpg", "missing.png"]
  assert [p.error is None for p in rest] == [True, True, False]
  assert all(len(p.top) == 3 for p in rest if not p.error)
  want = clf.top_k([str(files / "more" / "flower.jpg")], k=3)[0]
  assert [s.index for s in rest[1].top] == [s.index for s in want]


def test_iter_image_files_walks_sorted_and_lazily(tmp_path):
  for name in ("b/2.png", "b/1.JPG", "a.jpeg", ".hidden.jpg", "notes.txt", ".git/x.png",
               "c/d/e.gif"):
    (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / name).write_bytes(b"")
  found = [os.path.relpath(p, tmp_path) for p in inputs.iter_image_files([tmp_path])]
  assert found == ["a.jpeg", "b/1.JPG", "b/2.png", "c/d/e.gif"]
  # Named files are kept whatever their name (a missing one too: the reader reports it).
  assert list(inputs.iter_image_files([tmp_path / "notes.txt", "gone.png"])) == [
      str(tmp_path / "notes.txt"), "gone.png"]


def test_image_extensions_are_the_training_folders():
  from nfnets.data import folder  # pylint: disable=g-import-not-at-top  (TensorFlow)
  assert inputs.IMAGE_EXTENSIONS is folder.IMAGE_EXTENSIONS


def test_loading_infers_or_is_told_the_model(files, tmp_path):
  with pytest.raises(ValueError, match="match no NFNet variant; pass --variant"):
    loading.load_model(str(files / "tiny_haiku.npz"))  # A tiny tree is no F-variant.
  loaded = loading.load_model(str(files / "tiny_haiku.npz"), model="NFNet",
                              model_kwargs=TINY["NFNet"])
  assert loaded.spec.num_classes == 1000  # Read off the classifier.
  with pytest.raises(ValueError, match="does not fit NFNet"):
    loading.load_model(str(files / "tiny.npz"), variant="F0")
  with pytest.raises(ValueError, match="does not exist"):
    loading.load_model(str(files / "nope.npz"))
  with pytest.raises(ValueError, match="is not a run's workdir"):
    loading.load_model(str(tmp_path))
  # int32 weights would run as garbage: refused, by name.
  params = random_params("NFNet", num_classes=1000)
  params["NFNet/~/linear"]["w"] = params["NFNet/~/linear"]["w"].astype(np.int32)
  with open(tmp_path / "int_haiku.npz", "wb") as f:
    pickle.dump(params, f)
  with pytest.raises(ValueError, match=r"int_haiku.npz: NFNet/~/linear/w .*int32"):
    loading.load_model(str(tmp_path / "int_haiku.npz"), model="NFNet",
                       model_kwargs=TINY["NFNet"])


def test_load_described_reads_the_config_as_experiment_py_does(files):
  from nfnets.train.options import ExperimentOptions  # pylint: disable=g-import-not-at-top
  config = loading.read_config(os.path.join(REPO, "configs", "fake_data.py"))
  assert config.data.eval_image_size == 32
  with pytest.raises(AttributeError):  # Locked, as experiment.py's: a misspelt key fails.
    config.data.eval_imagesize = 64
  with config.unlocked():
    config.data.eval_image_size = 48
    config.data.eval_preproc = "resize_only"
  loaded = loading.load_described(str(files / "tiny_haiku.npz"), config=config)
  assert loaded.spec.kwargs == dict(ExperimentOptions.from_config(config).model.kwargs)
  assert (loaded.spec.eval_image_size, loaded.spec.eval_preproc) == (48, "resize_only")
  with pytest.raises(ValueError, match="no such file"):
    loading.read_config("configs/nope.py")


def test_cli_with_a_config_and_an_override(files):
  # DeepMind's format says nothing about the model: the config does, and an override on the
  # command line changes its evaluation protocol, as with experiment.py.
  out_json = files / "config.json"
  proc = run(["-m", "nfnets.predict", f"--weights={files / 'tiny_haiku.npz'}",
              f"--json={out_json}", "--config=configs/fake_data.py",
              "--config.data.eval_preproc=resize_only", str(files / "grace.jpg"),
              str(files / "china.png")])
  assert proc.returncode == 0, proc.stderr
  lines = proc.lines()
  assert len(lines) == 2 and all(line.count(" | ") == 4 for line in lines)
  result = json.loads(out_json.read_text())
  assert result["image_size"] == 32 and result["skipped"] == []
  loaded = loading.load_model(str(files / "tiny_haiku.npz"), model="NFNet",
                              model_kwargs=TINY["NFNet"])
  clf = classifier.Classifier(dataclasses.replace(loaded, spec=dataclasses.replace(
      loaded.spec, eval_image_size=32, eval_preproc="resize_only")))
  paper = classifier.Classifier(dataclasses.replace(loaded, spec=dataclasses.replace(
      loaded.spec, eval_image_size=32, eval_preproc="resize_crop_32")))
  for record in result["predictions"]:
    probs, names = clf.predict([record["file"]])
    assert record["top"][0]["index"] == int(probs.argmax())
    assert record["top"][0]["name"] == names[0] and record["top"][0]["synset"].startswith("n")
    np.testing.assert_allclose(record["top"][0]["probability"], probs.max(), rtol=1e-5)
    # The override took effect: the paper's protocol gives other probabilities.
    assert abs(paper.predict([record["file"]])[0].max() - probs.max()) > 1e-6


def test_cli_classifies_with_a_run_workdir_and_keeps_the_console_clean(files):
  # The committed workdir of an earlier version (tests/fixtures): the model comes from its
  # config.json, the weights from its newest checkpoint (EMA).
  workdir = os.path.join(REPO, "tests", "fixtures", "legacy_workdir")
  proc = run(["-m", "nfnets.predict", f"--weights={workdir}", str(files / "grace.jpg")])
  assert proc.returncode == 0, proc.stdout + proc.stderr
  lines = proc.lines()
  assert len(lines) == 1 and lines[0].count(" | ") == 4, lines
  assert "classified with " + workdir + " (step 6, EMA weights)" in proc.stderr
  # orbax reports every restore step at INFO through absl ("I1202 13:30:55 ... checkpoint_
  # manager.py ..."): not on the console.
  noisy = [l for l in proc.stderr.splitlines() if ".py:" in l and l[:1] in "IW" and l[1:5].isdigit()]
  assert not noisy, noisy[:3]
