"""Shared defaults of every experiment config (not a runnable config itself).

Each `configs/<name>.py` starts from `get_base_config()` and overrides what its recipe needs.
The defaults are not written here: they are those of `nfnets.train.options.ExperimentOptions`
(the one place each default lives, with its documentation), turned into a ConfigDict. The
returned ConfigDict is locked by `experiment.py` (config_flags lock_config=True), so every key a
run may want to override exists, with a value of the right type: a misspelt
`--config.train.batchsize=8` or a mistyped `--config.train.batch_size=eight` fails at once.

Sections (see their dataclasses for every key):
  model       ModelOptions: name (a key of nfnets.models.MODELS), constructor kwargs, remat,
              scan_blocks.
  optimizer   OptimizerOptions: the paper's SGD + AGC + cosine + EMA recipe.
  data        DataOptions: data set, splits, sizes, augmentation.
  train       TrainOptions: global batch, length, loss, precision, accumulation, logging.
  eval        EvalOptions: eval batch and cadence.
  checkpoint  CheckpointOptions: cadence and retention.
  init        InitOptions: start from released / saved weights instead of random init.
  plan        PlanOptions: the target machine of --mode=plan.
  profile     ProfileOptions: a jax.profiler trace of a few steps.
"""

import ml_collections

from nfnets.models.nfnet import NFNet
from nfnets.train.options import to_config_dict


def get_base_config() -> ml_collections.ConfigDict:
  """The defaults: an NFNet-F0 on ImageNet with the paper's recipe, unlocked for editing."""
  return to_config_dict()


def small_nfnet_kwargs(width: tuple = (16, 32, 64, 64), depth: tuple = (1, 1, 1, 1),
                      group_width: int = 8, **overrides) -> ml_collections.ConfigDict:
  """Constructor kwargs of a narrow NFNet (the same NFNet module, an NFNetVariant dict).

  Args:
    width: stage widths.
    depth: blocks per stage.
    group_width: channels per group of the grouped 3x3 convs (<= half the stage width).
    **overrides: other NFNet kwargs (drop_rate, stochdepth_rate, activation ...).
  """
  kwargs = dict(variant=dict(width=tuple(width), depth=tuple(depth), group_width=group_width),
                width=1.0, se_ratio=0.5, alpha=0.2, stochdepth_rate=0.0, drop_rate=0.0,
                activation="gelu", final_conv_mult=2, use_two_convs=True)
  kwargs.update(overrides)
  return ml_collections.ConfigDict(kwargs)


def nfnet_variant_config(variant: str) -> ml_collections.ConfigDict:
  """The paper's ImageNet recipe for NFNet-<variant> (F0..F7, or F0+..F7+).

  Args:
    variant: a key of the official variant table.

  Returns:
    The full config (batch 4096, 360 epochs, AGC 0.01, EMA 0.99999, smoothing 0.1,
    MixUp 0.2 + CutMix + the variant's RandAugment, dropout, stochdepth 0.25, bf16).
  """
  if variant not in NFNet.VARIANTS:
    raise ValueError(f"Unknown NFNet variant {variant!r}; use one of {sorted(NFNet.VARIANTS)}.")
  v = NFNet.VARIANTS[variant]
  config = get_base_config()
  config.model.kwargs.variant = variant
  config.model.kwargs.drop_rate = v.drop_rate
  config.data.image_size = v.train_imsize
  config.data.eval_image_size = v.test_imsize
  config.data.randaugment = v.ra_level
  # The loop derives steps as the official code: (1281167 * 360) // 4096 = 112602, and
  # re-derives them if --config.train.batch_size is overridden.
  return config
