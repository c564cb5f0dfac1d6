"""NF-ResNet-50 with Adaptive Gradient Clipping at large batch on ImageNet-2012.

The paper's AGC ablation (Brock et al. 2021, Fig. 2 and Sec. 4): an NF-ResNet-50 (no
BatchNorm) reaches the accuracy of a BN-ResNet-50 at batch sizes up to 4096 only with AGC.

Command:

  python experiment.py --config=configs/nf_resnet50_agc.py --workdir=workdirs/nf_resnet50_agc \\
      --config.data.data_dir=DATA_DIR

Recipe: global batch 4096, 90 epochs, SGD-Nesterov 0.9 with AGC lambda 0.01 (try 0.02-0.04
at batch <= 1024), lr 0.1 x 4096/256 with 5 warm-up epochs and cosine decay, weight decay 5e-5,
label smoothing 0.1, train 224 px with inception crop + flip, test 224 px (crop_resize);
no MixUp/CutMix/RandAugment, stochastic depth 0.1, dropout 0.25, float32.
Expected: ~76-77% top-1 (the BN-ResNet-50 level of the paper's Fig. 2 at this batch size;
read from a plot, not a table). Time: ~12 h on 32 TPUv3 cores (estimate, not measured).
"""

import ml_collections

from configs import common


def get_config() -> ml_collections.ConfigDict:
  """Returns the NF-ResNet-50 + AGC config."""
  config = common.get_base_config()
  config.model.name = "NF_ResNet"
  config.model.kwargs = ml_collections.ConfigDict(dict(
      variant="ResNet50", width=4.0, alpha=0.2, stochdepth_rate=0.1, drop_rate=0.25,
      activation="relu"))
  config.data.image_size = 224
  config.data.eval_image_size = 224
  config.data.eval_preproc = "crop_resize"
  config.data.randaugment = ""
  config.data.mixup_alpha = 0.0
  config.data.cutmix = False
  config.train.batch_size = 4096
  config.train.num_epochs = 90.0
  config.train.bfloat16 = False
  config.optimizer.weight_decay = 5e-5
  config.optimizer.agc.clipping = 0.01
  return config
