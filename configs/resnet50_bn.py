"""The BatchNorm ResNet-50 baseline (the official base config) on ImageNet-2012.

Command:

  python experiment.py --config=configs/resnet50_bn.py --workdir=workdirs/resnet50_bn \\
      --config.data.data_dir=DATA_DIR

Recipe: global batch 1024, 90 epochs, SGD-Nesterov 0.9 without AGC, lr 0.1 x 1024/256 with
5 warm-up epochs and cosine decay, weight decay 1e-4 (on weights only), label smoothing 0.1,
train 224 px (inception crop + flip), test 224 px with 'crop_resize', float32, no MixUp/
CutMix/RandAugment. BatchNorm uses each device's own batch statistics. The EMA
is still tracked (and reported as ema_*) but the official baseline used the raw weights.
Expected: ~76-77% top-1 (paper Table 3 lists 78.6% for its ResNet-50 with a stronger
recipe). Time: ~5 h on 32 TPUv3 cores (estimate from the 41.6 ms/step latency, not measured).
"""

import ml_collections

from configs import common


def get_config() -> ml_collections.ConfigDict:
  """Returns the BN ResNet-50 baseline config."""
  config = common.get_base_config()
  config.model.name = "ResNet"
  config.model.kwargs = ml_collections.ConfigDict(dict(
      variant="ResNet50", width=4.0, preactivation=False, activation="relu", drop_rate=0.0))
  config.optimizer.name = "sgd"
  config.optimizer.weight_decay = 1e-4
  config.data.image_size = 224
  config.data.eval_image_size = 224
  config.data.eval_preproc = "crop_resize"
  config.data.randaugment = ""
  config.data.mixup_alpha = 0.0
  config.data.cutmix = False
  config.train.batch_size = 1024
  config.train.num_epochs = 90.0
  config.train.bfloat16 = False
  return config
