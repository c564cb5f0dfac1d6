"""Fine-tune released NFNet weights on your own images (a folder of class sub-folders).

Layout: FOLDER/<class_name>/*.jpg (a held-out `data.folder_test_fraction` of each class is
used for evaluation), or FOLDER/train/<class>/... and FOLDER/test/<class>/... .

Command (--config.init.weights takes DeepMind's F*_haiku.npz, our npz, or a run's workdir):

  python experiment.py --config=configs/finetune_folder.py --workdir=workdirs/finetune \\
      --config.data.folder=FOLDER --config.init.weights=F0_haiku.npz

What it does: the architecture comes from the weights (an F3 file fine-tunes an F3; a workdir
its own model), with this file's dropout and stochastic depth; every parameter is loaded except
the classifier, re-initialised for the folder's classes (the number of classes is read from the
folder: data.num_classes=None); a grey model's input convolution is adapted to colour images
(and back). The train/test resolution is F0's 192/256 px unless overridden
(--config.data.image_size=..., --config.data.eval_image_size=...).
Small lr (0.01 per 256, peak 0.005 at batch 128), 10 epochs, AGC 0.01, EMA 0.999, light
augmentation (inception crop + flip), float32, train/test at the F0 192/256 px.
Expected: depends on your data; a few hundred images per class typically give well above the
from-scratch accuracy within the first epochs. Time: ~1 min per 1,000 images per epoch on one
modern GPU for F0 at 192 px (estimate, not measured by us).
"""

import ml_collections

from configs import common


def get_config() -> ml_collections.ConfigDict:
  """Returns the fine-tuning config (NFNet-F0 by default)."""
  config = common.nfnet_variant_config("F0")
  config.data.name = "folder"
  config.data.num_classes = None  # Whatever the folder holds.
  config.data.randaugment = ""
  config.data.mixup_alpha = 0.0
  config.data.cutmix = False
  config.model.kwargs.stochdepth_rate = 0.1
  config.model.kwargs.drop_rate = 0.2
  config.train.batch_size = 128
  config.train.num_epochs = 10.0
  config.train.label_smoothing = 0.1
  config.train.bfloat16 = False
  config.train.log_every_steps = 20
  config.optimizer.lr = 0.01
  config.optimizer.warmup_epochs = 1.0
  config.optimizer.ema_decay = 0.999
  config.eval.batch_size = 128
  config.eval.every_steps = 500
  config.checkpoint.every_steps = 500
  return config
