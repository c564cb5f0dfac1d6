"""NFNet-F7 on ImageNet-2012 with the paper's recipe (Brock et al. 2021, Table 3).

Command (ImageNet prepared as TFDS 'imagenet2012' in DATA_DIR, see nfnets/data/prepare_imagenet.py):

  python experiment.py --config=configs/nfnet_f7.py --workdir=workdirs/nfnet_f7 \
      --config.data.data_dir=DATA_DIR

Recipe: global batch 4096, 360 epochs (112,602 steps), SGD-Nesterov 0.9 + AGC lambda 0.01 (head
unclipped), lr 0.1 x 4096/256 with 5 warm-up epochs and cosine decay, weight decay 2e-5, EMA
0.99999, label smoothing 0.1, MixUp 0.2 + CutMix + RandAugment '415', dropout 0.5,
stochastic depth 0.25, bfloat16 compute; trains at 480 px and tests at 608 px.
Expected: not reported in the paper (no F7 row in Table 3); the largest variant of the official
table. Time: more than F6 (~2.8 s/step on 32 TPUv3 cores at 32 images/core); not measured by us.
Multi-host: add --config.distributed=True (runs jax.distributed.initialize()).
One 8-GPU node: first run `--mode=plan --config.plan.num_devices=8` (see the README's "Paper
scale" section) and add the --config.train.grad_accum_steps / --config.model.remat it picks.
"""

import ml_collections

from configs import common


def get_config() -> ml_collections.ConfigDict:
  """Returns the NFNet-F7 ImageNet config."""
  return common.nfnet_variant_config("F7")
