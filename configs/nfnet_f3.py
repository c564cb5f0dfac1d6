"""NFNet-F3 on ImageNet-2012 with the paper's recipe (Brock et al. 2021, Table 3).

Command (ImageNet prepared as TFDS 'imagenet2012' in DATA_DIR, see nfnets/data/prepare_imagenet.py):

  python experiment.py --config=configs/nfnet_f3.py --workdir=workdirs/nfnet_f3 \
      --config.data.data_dir=DATA_DIR

Recipe: global batch 4096, 360 epochs (112,602 steps), SGD-Nesterov 0.9 + AGC lambda 0.01 (head
unclipped), lr 0.1 x 4096/256 with 5 warm-up epochs and cosine decay, weight decay 2e-5, EMA
0.99999, label smoothing 0.1, MixUp 0.2 + CutMix + RandAugment '415', dropout 0.4,
stochastic depth 0.25, bfloat16 compute; trains at 320 px and tests at 416 px.
Expected: paper Table 3 top-1 85.7%, top-5 97.5% (EMA weights, test at the variant's
test resolution). Time: ~67 h on 32 TPUv3 cores, estimated as the paper's step latency
(532.2 ms at 32 images/core) x 4 (128 images/core) x 112,602 steps; not measured by us.
Multi-host: add --config.distributed=True (runs jax.distributed.initialize()).
One 8x80 GB GPU node (512 images/device): add --config.train.grad_accum_steps=16, or 8 with
--config.model.remat=block (`--mode=plan` on XLA:CPU, an upper bound: 41 / 70 GB per device
vs 532 GB at k=1; README "Paper scale").
"""

import ml_collections

from configs import common


def get_config() -> ml_collections.ConfigDict:
  """Returns the NFNet-F3 ImageNet config."""
  return common.nfnet_variant_config("F3")
