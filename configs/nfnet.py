"""NFNet-F0 ... F7 on ImageNet-2012 with the paper's recipe (Brock et al. 2021, Table 3).

Command (the variant after the colon; ImageNet prepared as TFDS 'imagenet2012' in DATA_DIR,
see docs/data.md):

  python experiment.py --config=configs/nfnet.py:F0 --workdir=workdirs/nfnet_f0 \\
      --config.data.data_dir=DATA_DIR

Recipe, every variant: global batch 4096, 360 epochs (112,602 steps), SGD-Nesterov 0.9 + AGC
lambda 0.01 (classifier unclipped), lr 0.1 x 4096/256 with 5 warm-up epochs and cosine decay,
weight decay 2e-5, EMA 0.99999, label smoothing 0.1, MixUp 0.2 + CutMix, stochastic depth
0.25, bfloat16 compute. Per variant (the official table; top-1/top-5 and the TPUv3 step time
at 32 images per core are the paper's Table 3, EMA weights at the test resolution):

  variant  train/test px  RandAugment  dropout  paper top-1 / top-5   TPUv3 step
  F0       192 / 256      405          0.2      83.6 / 96.8           73.3 ms
  F1       224 / 320      410          0.3      84.7 / 97.1           158.5 ms
  F2       256 / 352      410          0.4      85.1 / 97.3           295.8 ms
  F3       320 / 416      415          0.4      85.7 / 97.5           532.2 ms
  F4       384 / 512      415          0.5      85.9 / 97.6           1033.3 ms
  F5       416 / 544      415          0.5      86.0 / 97.6           1398.5 ms
  F6       448 / 576      415          0.5      86.5 / 97.9 (SAM)     2774.1 ms
  F7       480 / 608      415          0.5      (not in the paper)    -

F0+ ... F7+ (the wider variants) work too. Cost: nothing here was trained on ImageNet by us.
On one 8-GPU node (512 images per device), F0 runs as it is; larger variants need gradient
accumulation and perhaps rematerialisation: `--mode=plan --config.plan.num_devices=8` prints
the --config.train.grad_accum_steps / --config.model.remat that fit (docs/scale.md). F6's
paper result used SAM (--config.train.sam_rho). Pods and clusters: docs/scale.md.
"""

import ml_collections

from configs import common


def get_config(variant: str = "F0") -> ml_collections.ConfigDict:
  """Returns the ImageNet config of NFNet-<variant> (F0 when no variant is given)."""
  return common.nfnet_variant_config(variant)
