"""Shared defaults of every experiment config (not a runnable config itself).

Each `configs/<name>.py` starts from `get_base_config()` and overrides what its recipe needs.
The returned ConfigDict is locked by `experiment.py` (config_flags lock_config=True), so every
key a run may want to override must exist here, with a value of the right type: a misspelt
`--config.train.batchsize=8` or a mistyped `--config.train.batch_size=eight` fails at once.

Sections:
  model       name (a key of nfnets.models.MODELS) and constructor kwargs.
  optimizer   nfnets.optim.default_config(): the paper's SGD + AGC + cosine + EMA recipe.
  data        what nfnets.data reads: data set, splits, sizes, augmentation.
  train       global batch, length, loss and precision switches, logging cadence.
  eval        eval batch and cadence.
  checkpoint  cadence and retention of nfnets.checkpoints.Checkpointer.
  init        start from released / saved weights instead of random init.
"""

import ml_collections

from nfnets import optim

# ImageNet-2012 train set size: the official code derives steps from it.
IMAGENET_TRAIN_EXAMPLES = 1281167


def get_base_config() -> ml_collections.ConfigDict:
  """The defaults: an NFNet-F0 on ImageNet with the paper's recipe, unlocked for editing."""
  config = ml_collections.ConfigDict()
  config.seed = 0

  config.model = ml_collections.ConfigDict()
  config.model.name = "NFNet"
  # A ConfigDict so the variant may be a name or a dict of NFNetVariant fields.
  config.model.kwargs = ml_collections.ConfigDict(dict(
      variant="F0", width=1.0, se_ratio=0.5, alpha=0.2, stochdepth_rate=0.25, drop_rate=0.2,
      activation="gelu", final_conv_mult=2, use_two_convs=True))

  config.optimizer = optim.default_config()
  config.optimizer.unlock()

  config.data = ml_collections.ConfigDict()
  config.data.name = "imagenet2012"  # 'imagenet2012' | 'mnist5k' | 'folder' | 'fake' | TFDS name.
  # Optional strings/ints are typed FieldReferences so overrides still type-check.
  config.data.data_dir = ml_collections.FieldReference(None, field_type=str)  # TFDS data dir.
  config.data.folder = ""  # Root of class sub-folders when name='folder'.
  config.data.folder_test_fraction = 0.1  # Held-out share when the folder has no test/ split.
  config.data.train_split = "train"
  config.data.eval_split = "test"  # Alias of ImageNet's labelled 'validation' split.
  config.data.image_size = 192  # Train resolution (the variant's train_imsize).
  config.data.eval_image_size = 256  # Test resolution (the variant's test_imsize).
  config.data.train_preproc = "inception_crop"  # | 'random_crop_pad4' | 'resize_only'.
  config.data.eval_preproc = "resize_crop_32"  # | 'crop_resize' | 'resize_only'.
  config.data.random_flip = True
  config.data.randaugment = "405"  # '' disables; 'LMM' = L layers, magnitude MM.
  config.data.mixup_alpha = 0.2  # 0 disables MixUp.
  config.data.cutmix = True
  # None: take the data set's class count (checked against the data set when set).
  config.data.num_classes = ml_collections.FieldReference(1000, field_type=int)
  config.data.seed = 0
  # Only for name='fake' (synthetic, learnable class prototypes + noise).
  config.data.fake_channels = 3
  config.data.fake_num_train = 1024
  config.data.fake_num_eval = 256

  config.train = ml_collections.ConfigDict()
  config.train.batch_size = 4096  # Global, over all hosts and devices.
  config.train.num_epochs = 360.0
  config.train.num_steps = 0  # > 0 overrides num_epochs.
  config.train.label_smoothing = 0.1
  config.train.bfloat16 = True
  config.train.sam_rho = 0.0  # > 0: SAM ascent on sam_fraction of each device batch.
  config.train.sam_fraction = 0.2
  config.train.skip_nonfinite = False  # True: skip NaN/Inf steps (counted) instead of stopping.
  config.train.log_every_steps = 100
  # > 0: the batch of this step (1-based) is replaced by NaNs, to test the non-finite
  # handling end to end (stop with a named error, or skip with skip_nonfinite=True).
  config.train.debug_nan_step = 0

  config.eval = ml_collections.ConfigDict()
  config.eval.batch_size = 400  # Global; 50 per device on 8 devices as the official code.
  config.eval.every_steps = 5000  # 0: evaluate only at the end.
  config.eval.max_batches = 0  # > 0: cap for quick periodic evals (final eval is full).

  config.checkpoint = ml_collections.ConfigDict()
  config.checkpoint.every_steps = 5000
  config.checkpoint.every_seconds = 600.0  # Bounds the work lost to a pre-emption.
  config.checkpoint.keep = 3

  config.init = ml_collections.ConfigDict()
  config.init.official_weights = ""  # DeepMind F*_haiku.npz (restricted unpickler).
  config.init.params_path = ""  # Our safe npz from nfnets.weights.save_params.
  config.init.drop_head = False  # Fine-tuning on new classes: keep a fresh classifier.
  # Top-level classifier only: 'NFNet/~/linear', not the SE blocks' nested '.../linear'.
  config.init.head_pattern = r"^[^/]+/~/linear$"

  config.distributed = False  # True (or NFNETS_DISTRIBUTED=1): jax.distributed.initialize().
  config.compilation_cache_dir = ""  # '' -> $NFNETS_COMPILATION_CACHE or <workdir>/jax_cache.
  config.tensorboard = True
  return config


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
  from nfnets.nfnet import NFNet  # pylint: disable=g-import-not-at-top
  if variant not in NFNet.VARIANTS:
    raise ValueError(f"Unknown NFNet variant {variant!r}; use one of {sorted(NFNet.VARIANTS)}.")
  v = NFNet.VARIANTS[variant]
  config = get_base_config()
  config.model.kwargs.variant = variant
  config.model.kwargs.drop_rate = v.drop_rate
  config.data.image_size = v.train_imsize
  config.data.eval_image_size = v.test_imsize
  config.data.randaugment = v.ra_level
  # experiment.py derives steps as the official code: (1281167 * 360) // 4096 = 112602,
  # and re-derives them if --config.train.batch_size is overridden.
  return config
