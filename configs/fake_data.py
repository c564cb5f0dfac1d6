"""Synthetic data, for smoke tests and throughput benchmarks without any data set.

Command (a tiny NFNet, 20 steps, a few seconds per step on a laptop CPU):

  python experiment.py --config=configs/fake_data.py --workdir=/tmp/nfnets_fake

Benchmark a paper variant at its training resolution (':F0' picks it), e.g. on a GPU:

  python experiment.py --config=configs/fake_data.py:F0 --workdir=/tmp/f0_bench --mode=train \\
      --config.train.batch_size=256 --config.train.num_steps=100 --config.train.bfloat16=True

Expected: the loss falls within a few dozen steps (each class is a fixed random prototype
image plus Gaussian noise, so labels are learnable); accuracy numbers mean nothing here.
Progress lines report images/s per device, and the first-step (compile) time separately.
"""

import ml_collections

from configs import common


def get_config(variant: str = "") -> ml_collections.ConfigDict:
  """Returns a config on data.name='fake'.

  Args:
    variant: '' for a narrow NFNet (widths 16/32/64/64, one block per stage, 32 px), or a
      paper variant name ('F0'...) for that network at its training resolution.
  """
  config = common.get_base_config()
  config.model.kwargs = common.small_nfnet_kwargs()
  config.data.name = "fake"
  config.data.num_classes = 10
  config.data.image_size = 32
  config.data.eval_image_size = 32
  config.data.randaugment = ""
  config.data.mixup_alpha = 0.0
  config.data.cutmix = False
  config.train.batch_size = 64
  config.train.num_steps = 20
  config.train.bfloat16 = False
  config.train.log_every_steps = 5
  config.optimizer.warmup_epochs = 0.0
  config.eval.batch_size = 64
  config.eval.every_steps = 0
  config.checkpoint.every_steps = 10
  if variant:
    full = common.nfnet_variant_config(variant)
    config.model.kwargs = full.model.kwargs
    config.data.image_size = config.data.eval_image_size = full.data.image_size
  return config
