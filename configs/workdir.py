"""The config a run saved in its workdir, so a run can be come back to with nothing retyped.

Command (experiment.py uses this file by itself when --config is left out):

  python experiment.py --workdir=W --mode=eval
  python experiment.py --config=configs/workdir.py:W --workdir=W --config.data.eval_split=valid

`W/config.json` holds the resolved options of the run (every key, overrides included); keys
added to the project since it was written take their defaults. Overrides on the command line
apply on top, as with any config file.
"""

import os

import ml_collections

from nfnets.train import options
from nfnets.train import workdir as workdir_lib


def get_config(workdir: str = "") -> ml_collections.ConfigDict:
  """Returns the saved config of the run in `workdir`."""
  if not workdir:
    raise ValueError("configs/workdir.py needs the workdir: --config=configs/workdir.py:W "
                     "(or leave --config out and pass --workdir=W).")
  return options.to_config_dict(workdir_lib.saved_options(os.path.expanduser(workdir)))
