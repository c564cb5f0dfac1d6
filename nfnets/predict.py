"""Classify images with trained weights, from the command line.

  python -m nfnets.predict --weights=F0_haiku.npz photo.jpg more_photos/
  python -m nfnets.predict --weights=workdirs/finetune --json=predictions.json images/
  python -m nfnets.predict --weights=tiny.npz --config=configs/fake_data.py img.png

--weights is DeepMind's F*_haiku.npz, one of our npz files, or a run's workdir (its newest
checkpoint, EMA weights unless --noema). The model comes from the workdir or the npz; for
files that do not say, from --model/--variant, or --config (a configs/*.py file, loaded as
experiment.py loads it, `--config.data.eval_image_size=...` overrides included; its
config.model and config.data.eval_* are used).

Prints one line per image on stdout, `<file>: <p> <class> | ...` (the top --top classes), and
on stderr a `skipped <file>: <reason>` line for each file that cannot be used (not an image, a
FIFO or device, over NFNETS_MAX_IMAGE_PIXELS, unreadable), `progress:` lines while a folder is
worked through, and a final count. Folders are walked recursively for .jpg/.jpeg/.png/.bmp/.gif
files. Images are read, preprocessed and classified one batch at a time, so memory does not
grow with the number of images. Names are printed with control characters escaped. Exit
status: 0 when at least one image was classified, 1 when none was or on an error (one line),
2 for a mistake on the command line. The compiled network is kept in the compilation cache
(nfnets/inference/cache.py), so the next call on the same model starts in seconds.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from typing import Any, Optional

from absl import app
from absl import flags
from ml_collections import config_flags

from nfnets import files
from nfnets import cli
from nfnets.inference import inputs

_WEIGHTS = flags.DEFINE_string("weights", None, "F*_haiku.npz, our .npz, or a run's workdir.")
_MODEL = flags.DEFINE_string("model", None, "Model family (default: from the weights).")
_VARIANT = flags.DEFINE_string("variant", None, "Variant, e.g. F0 (default: from the weights).")
_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "A configs/*.py file describing the model (optionally ':arg'); override "
    "fields with --config.a.b=value.", lock_config=True)
_TOP = flags.DEFINE_integer("top", 5, "Classes to print per image.", lower_bound=1)
_BATCH = flags.DEFINE_integer("batch_size", 32, "Images per forward pass (and in memory).",
                              lower_bound=1)
_JSON = flags.DEFINE_string("json", None, "Also write the predictions to this JSON file.")
_EMA = flags.DEFINE_boolean("ema", True, "For a workdir: the EMA weights (else the raw ones).")
_FOLD = flags.DEFINE_boolean("fold", False, "Fold weight standardisation (plain convs).")

# Seconds between two progress lines.
PROGRESS_EVERY_S = 10.0


class JsonWriter:
  """Writes the predictions as they come, to a temporary file renamed into place at the end.

  The file is opened before any work, so an unwritable --json path fails at once; records are
  streamed, so memory does not grow with the number of images; a run that fails midway leaves
  no half-written JSON behind.
  """

  def __init__(self, path: str):
    self.path = inputs.check_output_file(path, f"--json={path}")
    directory = os.path.dirname(os.path.abspath(path))
    handle, self._tmp = tempfile.mkstemp(prefix=".predict-", suffix=".json.tmp", dir=directory)
    self._file = os.fdopen(handle, "w")
    self._count = 0

  def start(self, weights: str, image_size: int) -> None:
    head = json.dumps({"weights": weights, "image_size": image_size})
    self._file.write(head[:-1] + ', "predictions": [\n')

  def add(self, record: dict[str, Any]) -> None:
    self._file.write((",\n" if self._count else "") + json.dumps(record))
    self._count += 1

  def finish(self, skipped: list[dict[str, str]]) -> None:
    self._file.write('\n], "skipped": ' + json.dumps(skipped, indent=1) + "}\n")
    self._file.close()
    os.replace(self._tmp, self.path)

  def discard(self) -> None:
    self._file.close()
    if os.path.exists(self._tmp):
      os.unlink(self._tmp)


def _line(path: str, top: Sequence[Any]) -> str:
  """`<file>: <p> <name> (<synset>) | ...`, names escaped (they come from data set folders)."""
  shown = " | ".join(f"{s.probability:.3f} {files.printable(s.name)}"
                     + (f" ({s.synset})" if s.synset else "") for s in top)
  return f"{files.printable(path)}: {shown}"


def predict(paths: Iterable[str], json_writer: Optional[JsonWriter]) -> int:
  """Prints the top classes of every image (see the module docstring); returns how many."""
  from nfnets.inference import cache  # pylint: disable=g-import-not-at-top
  from nfnets.inference import classifier  # pylint: disable=g-import-not-at-top
  from nfnets.inference import loading  # pylint: disable=g-import-not-at-top
  cache.enable_compilation_cache()
  loaded = loading.load_described(_WEIGHTS.value, model=_MODEL.value, variant=_VARIANT.value,
                                  config=_CONFIG.value, ema=_EMA.value)
  clf = classifier.Classifier(loaded, batch_size=_BATCH.value, fold=_FOLD.value)
  del loaded  # The device holds the weights now; the host copy would double the memory.
  source = files.printable(clf.source)
  if json_writer:
    json_writer.start(clf.source, clf.image_size)
  folders = any(os.path.isdir(p) for p in paths)
  done, skipped, start, last = 0, [], time.monotonic(), None
  for prediction in clf.classify(inputs.iter_image_files(paths), k=_TOP.value):
    if prediction.error:
      print(f"skipped {prediction.error}", file=sys.stderr)
      skipped.append({"file": prediction.image, "reason": prediction.error})
      continue
    print(_line(prediction.image, prediction.top))
    done += 1
    if json_writer:
      json_writer.add({"file": prediction.image, "top": [
          {"index": s.index, "probability": s.probability, "name": s.name, "synset": s.synset}
          for s in prediction.top]})
    now = time.monotonic()
    if folders and done % clf.batch_size == 0 and (last is None
                                                  or now - last >= PROGRESS_EVERY_S):
      print(f"progress: {done} classified, {len(skipped)} skipped, "
            f"{done / (now - start):.1f} images/s", file=sys.stderr, flush=True)
      sys.stdout.flush()
      last = now
  print(f"{done} image(s) classified with {source}"
        + (f", {len(skipped)} skipped" if skipped else ""), file=sys.stderr)
  if json_writer:
    json_writer.finish(skipped)
  return done


def main(argv: list[str]) -> None:
  paths = argv[1:]
  if not paths:
    raise cli.UsageError("no image given: pass image files or folders, e.g. python -m "
                         "nfnets.predict --weights=F0_haiku.npz photo.jpg photos/")
  cli.release_freed_memory()
  # The paths the user gave are checked before the model is loaded and compiled.
  inputs.check_weights_path(_WEIGHTS.value)
  json_writer = JsonWriter(_JSON.value) if _JSON.value else None
  try:
    done = predict(paths, json_writer)
  finally:
    if json_writer:
      json_writer.discard()
  sys.exit(0 if done else 1)


if __name__ == "__main__":
  flags.mark_flags_as_required(["weights"])
  app.run(cli.one_line_errors(main), flags_parser=cli.parse_flags)
