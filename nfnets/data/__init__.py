"""Input pipeline: TFDS (array_record) and image-folder data, deterministic and resumable.

Importing this package imports TensorFlow and hides every GPU from it (the
pipeline runs on the host CPU; JAX owns the accelerators). `nfnets/__init__.py`
never imports it, so model code stays free of TensorFlow.
"""

from nfnets.data.pipeline import build_eval_iterator
from nfnets.data.pipeline import build_train_iterator
from nfnets.data.pipeline import dataset_info

__all__ = ["build_train_iterator", "build_eval_iterator", "dataset_info"]
