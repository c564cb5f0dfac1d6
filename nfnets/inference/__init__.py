"""Using a trained model: classify images, fold weight standardisation, export for serving.

No TensorFlow here (only `export.py`'s SavedModel writer loads it, when asked for one):

  loading.py     a model + params from DeepMind's file, our npz or a run's workdir; an
                 experiment config (configs/*.py, read as experiment.py reads it) may describe it
  classifier.py  Classifier: preprocessing, padded batches, top-k with class names; `classify`
                 streams any number of images one batch at a time
  preprocess.py  the evaluator's eval protocols in numpy + PIL (nfnets.data.preprocessing's
                 twin: the same arithmetic, differences measured and documented there)
  inputs.py      weights, image and output paths checked before anything heavy; folder walking
  cache.py       the persistent compilation cache (NFNETS_COMPILATION_CACHE, ~/.cache/nfnets/jax)
  folding.py     fold_weight_standardization: WS convs -> plain conv kernels (inference)
  export.py      jax.export StableHLO artifacts and a TensorFlow SavedModel (jax2tf)
  cli.py         what the command lines share: flag parsing and one-line errors
  imagenet_classes.tsv   the 1000 ImageNet-2012 class names (data)

Command lines over it: `python -m nfnets.predict`, `python -m nfnets.export`.
"""
