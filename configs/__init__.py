"""Experiment configs: `python experiment.py --config=configs/<name>.py --workdir=DIR`."""
