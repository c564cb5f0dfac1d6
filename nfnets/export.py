"""Export trained weights for serving, and fold weight standardisation.

  python -m nfnets.export --weights=F0_haiku.npz --out=exported/f0
  python -m nfnets.export --weights=workdirs/demo --out=exported/demo --formats=npz

--weights is DeepMind's file, our npz or a workdir (its newest checkpoint, EMA weights); the
model comes from the workdir or the npz, else --model/--variant or --config, as for
`nfnets.predict`. Writes a `jax.export` StableHLO artifact per input dtype, a TensorFlow
SavedModel and our npz (see nfnets/inference/export.py). `--formats=npz` is the one-command
way to turn a run's checkpoint into a params file.

In Python, `nfnets.export.fold_weight_standardization(params)` returns the params of the same
network with every weight-standardised conv as a plain conv kernel.
"""

from __future__ import annotations

import os
import sys

from absl import app
from absl import flags
from absl import logging as absl_logging

from nfnets.inference.folding import fold_weight_standardization

__all__ = ["fold_weight_standardization", "main"]

_WEIGHTS = flags.DEFINE_string("weights", None, "F*_haiku.npz, our .npz, or a workdir.")
_OUT = flags.DEFINE_string("out", None, "Directory to write into.")
_FORMATS = flags.DEFINE_list("formats", ["jax", "savedmodel", "npz"],
                             "Any of jax, savedmodel, npz.")
_MODEL = flags.DEFINE_string("model", None, "Model family (default: from the weights).")
_VARIANT = flags.DEFINE_string("variant", None, "Variant, e.g. F0 (default: from the weights).")
_CONFIG = flags.DEFINE_string("config", None, "A configs/*.py file describing the model.")
_EMA = flags.DEFINE_boolean("ema", True, "For a workdir: the EMA weights (else the raw ones).")


def main(argv: list[str]) -> None:
  # orbax logs every restore step at INFO through absl: noise on a command line's console.
  absl_logging.set_verbosity(absl_logging.WARNING)
  del argv
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  from nfnets.inference import export  # pylint: disable=g-import-not-at-top
  from nfnets.predict import load_described  # pylint: disable=g-import-not-at-top
  try:
    loaded = load_described(_WEIGHTS.value, model=_MODEL.value, variant=_VARIANT.value,
                            config=_CONFIG.value, ema=_EMA.value)
    for path in export.write_exports(loaded, _OUT.value, formats=_FORMATS.value):
      print(f"wrote {path}")
  except ValueError as e:
    if os.environ.get("NFNETS_DEBUG") == "1":
      raise
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
  flags.mark_flags_as_required(["weights", "out"])
  app.run(main)
