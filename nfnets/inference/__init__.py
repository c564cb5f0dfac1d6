"""Using a trained model: classify images, fold weight standardisation, export for serving.

  loading.py     a model + params from DeepMind's file, our npz or a run's workdir
  classifier.py  Classifier: the evaluator's preprocessing, batching, top-k with class names
  folding.py     fold_weight_standardization: WS convs -> plain conv kernels (inference)
  export.py      jax.export StableHLO artifacts and a TensorFlow SavedModel (jax2tf)
  imagenet_classes.tsv   the 1000 ImageNet-2012 class names (data)

Command lines: `python -m nfnets.predict`, `python -m nfnets.export`, `python -m nfnets.plot`.
"""
