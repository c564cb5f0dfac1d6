"""Export trained weights for serving, from the command line.

  python -m nfnets.export --weights=F0_haiku.npz --out=exported/f0
  python -m nfnets.export --weights=workdirs/demo --out=exported/demo --formats=npz

--weights is DeepMind's file, our npz or a workdir (its newest checkpoint, EMA weights unless
--noema); the model comes from the workdir or the npz, else --model/--variant or --config, as
for `nfnets.predict`. Writes into --out (created if missing) a `jax.export` StableHLO artifact
per input dtype (jax), a TensorFlow SavedModel (savedmodel) and our npz (npz), plus
export.json, and prints `wrote <path>` for each (see nfnets/inference/export.py).
`--formats=npz` is the one-command way to turn a run's checkpoint into a params file.
Mistakes are one line on stderr (exit status 2 for the command line, 1 otherwise).
"""

from __future__ import annotations

from absl import app
from absl import flags
from ml_collections import config_flags

from nfnets import files
from nfnets import cli
from nfnets.inference import inputs

_WEIGHTS = flags.DEFINE_string("weights", None, "F*_haiku.npz, our .npz, or a run's workdir.")
_OUT = flags.DEFINE_string("out", None, "Directory to write into (created if missing).")
_FORMATS = flags.DEFINE_list("formats", ["jax", "savedmodel", "npz"],
                             "Any of jax, savedmodel, npz.")
_MODEL = flags.DEFINE_string("model", None, "Model family (default: from the weights).")
_VARIANT = flags.DEFINE_string("variant", None, "Variant, e.g. F0 (default: from the weights).")
_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "A configs/*.py file describing the model (optionally ':arg'); override "
    "fields with --config.a.b=value.", lock_config=True)
_EMA = flags.DEFINE_boolean("ema", True, "For a workdir: the EMA weights (else the raw ones).")


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise cli.UsageError(f"unexpected arguments {argv[1:]}: everything is a flag, e.g. "
                         "--weights=F0_haiku.npz --out=exported/f0")
  # The paths are checked before JAX and TensorFlow load: a mistake is reported at once.
  inputs.check_weights_path(_WEIGHTS.value)
  inputs.check_output_dir(_OUT.value, f"--out={_OUT.value}")
  from nfnets.inference import export  # pylint: disable=g-import-not-at-top
  from nfnets.inference import loading  # pylint: disable=g-import-not-at-top
  unknown = sorted(set(_FORMATS.value) - set(export.FORMATS))
  if unknown or not _FORMATS.value:
    raise cli.UsageError(f"--formats={','.join(_FORMATS.value)}: unknown format(s) {unknown}; "
                         f"use some of {','.join(export.FORMATS)}")
  loaded = loading.load_described(_WEIGHTS.value, model=_MODEL.value, variant=_VARIANT.value,
                                  config=_CONFIG.value, ema=_EMA.value)
  for path in export.write_exports(loaded, _OUT.value, formats=_FORMATS.value):
    print(f"wrote {files.printable(path)}", flush=True)


if __name__ == "__main__":
  flags.mark_flags_as_required(["weights", "out"])
  app.run(cli.one_line_errors(main), flags_parser=cli.parse_flags)
