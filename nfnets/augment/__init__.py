"""Training-time augmentation that runs on the accelerator, inside the jitted train step.

  mixing.py       MixUp and CutMix per example ('paper' and 'fast' pairing)
  randaugment.py  RandAugment's 16 ops in JAX (mirrors the TensorFlow reference op by op)
  batch.py        make_augment: uint8 device batch -> mixed, augmented, normalised input

Moving this work off the host is what lets the host CPUs keep up with the accelerators on the
paper's full augmentation recipe (see bench/input_pipeline.py). JAX only; no TensorFlow.
"""
