"""Classify images with trained weights, from the command line.

  python -m nfnets.predict --weights=F0_haiku.npz photo.jpg more_photos/
  python -m nfnets.predict --weights=workdirs/finetune --json=predictions.json images/
  python -m nfnets.predict --weights=tiny.npz --config=configs/fake_data.py img.png

--weights is DeepMind's F*_haiku.npz, one of our npz files, or a run's workdir (its newest
checkpoint, EMA weights unless --noema). The model comes from the workdir or the npz; for
files that do not say, from --model/--variant, or --config (a configs/*.py file, whose
config.model and config.data.eval_* are used). Every image gets its top-k classes with
probabilities and names; a file that cannot be read is reported on one line and skipped.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Optional, Sequence

from absl import app
from absl import flags
from absl import logging as absl_logging

_WEIGHTS = flags.DEFINE_string("weights", None, "F*_haiku.npz, our .npz, or a workdir.")
_MODEL = flags.DEFINE_string("model", None, "Model family (default: from the weights).")
_VARIANT = flags.DEFINE_string("variant", None, "Variant, e.g. F0 (default: from the weights).")
_CONFIG = flags.DEFINE_string("config", None, "A configs/*.py file describing the model.")
_TOP = flags.DEFINE_integer("top", 5, "Classes to print per image.")
_BATCH = flags.DEFINE_integer("batch_size", 32, "Images per forward pass.")
_JSON = flags.DEFINE_string("json", None, "Also write the predictions to this JSON file.")
_EMA = flags.DEFINE_boolean("ema", True, "For a workdir: the EMA weights (else the raw ones).")
_FOLD = flags.DEFINE_boolean("fold", False, "Fold weight standardisation (plain convs).")


def _classifier():
  from nfnets.inference import classifier  # pylint: disable=g-import-not-at-top
  loaded = load_described(_WEIGHTS.value, model=_MODEL.value, variant=_VARIANT.value,
                          config=_CONFIG.value, ema=_EMA.value)
  return classifier.Classifier(loaded, batch_size=_BATCH.value, fold=_FOLD.value)


def load_described(weights: str, *, model: Optional[str], variant: Optional[str],
                   config: Optional[str], ema: bool):
  """`loading.load_model`, told the model and eval protocol by a config file when given.

  The command lines' shared loading (`nfnets.predict`, `nfnets.export`). The class count is
  read off the weights' classifier, not the config's data set; the config's eval resolution
  and preprocessing replace the weights' own, as the run would have evaluated.
  """
  import dataclasses  # pylint: disable=g-import-not-at-top
  from nfnets.inference import loading  # pylint: disable=g-import-not-at-top
  described = {}
  if config:
    options = read_config(config)
    described = dict(model=options.model.name, model_kwargs=dict(options.model.kwargs))
  loaded = loading.load_model(weights, model=model or described.get("model"), variant=variant,
                              model_kwargs=described.get("model_kwargs"), ema=ema)
  if config:
    loaded = dataclasses.replace(loaded, spec=dataclasses.replace(
        loaded.spec, eval_image_size=options.data.eval_image_size,
        eval_preproc=options.data.eval_preproc))
  return loaded


def read_config(path: str):
  """ExperimentOptions of a configs/*.py file (optionally 'file.py:arg')."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  from nfnets.train.options import ExperimentOptions  # pylint: disable=g-import-not-at-top
  file, _, arg = path.partition(":")
  if not os.path.isfile(file):
    raise ValueError(f"--config={path}: no such file {file!r}.")
  spec = importlib.util.spec_from_file_location("nfnets_predict_config", file)
  module = importlib.util.module_from_spec(spec)
  repo = os.path.dirname(os.path.dirname(os.path.abspath(file)))
  if repo not in sys.path:  # configs/ import their shared defaults as `configs.common`.
    sys.path.insert(0, repo)
  spec.loader.exec_module(module)
  config = module.get_config(arg) if arg else module.get_config()
  return ExperimentOptions.from_config(config)


def predict(paths: Sequence[str]) -> list[dict]:
  """Prints the top classes of every image; returns them as JSON-able records."""
  from nfnets.inference import classifier as classifier_lib  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  clf = _classifier()
  files = classifier_lib.image_files(paths)
  if not files:
    raise ValueError("No image given: pass image files or folders of images.")
  good, batch, skipped = [], [], 0
  for path in files:
    try:
      batch.append(clf.preprocess(path))
      good.append(path)
    except ValueError as e:
      print(f"skipped {e}", file=sys.stderr)
      skipped += 1
  records = []
  if good:
    import jax  # pylint: disable=g-import-not-at-top
    probs = np.asarray(jax.nn.softmax(clf.logits_of(np.stack(batch)), axis=-1))
    for path, p in zip(good, probs):
      scores = clf.scores(p, _TOP.value)
      shown = " | ".join(f"{s.probability:.3f} {s.name}" + (f" ({s.synset})" if s.synset else "")
                         for s in scores)
      print(f"{path}: {shown}")
      records.append({"file": path, "top": [
          {"index": s.index, "probability": s.probability, "name": s.name, "synset": s.synset}
          for s in scores]})
  print(f"{len(good)} image(s) classified with {clf.source}"
        + (f", {skipped} skipped" if skipped else ""), file=sys.stderr)
  if _JSON.value:
    with open(_JSON.value, "w") as f:
      json.dump({"weights": clf.source, "image_size": clf.image_size,
                 "predictions": records}, f, indent=1)
  return records


def main(argv: list[str]) -> None:
  # orbax logs every restore step at INFO through absl: noise on a command line's console.
  absl_logging.set_verbosity(absl_logging.WARNING)
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  try:
    records = predict(argv[1:])
  except ValueError as e:
    if os.environ.get("NFNETS_DEBUG") == "1":
      raise
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
  sys.exit(0 if records else 1)


if __name__ == "__main__":
  flags.mark_flags_as_required(["weights"])
  app.run(main)
