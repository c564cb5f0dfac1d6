"""Tests for nfnets.flops: MACs and parameter counts from shapes only."""

import haiku as hk
import jax
import pytest

from nfnets.analysis import flops
from nfnets.models import nfnet

# Paper Table 3 / README: "FLOPs" (= MACs, test resolution) and params.
_PAPER = {
    'F0': (12.38, 71.5), 'F1': (35.54, 132.6), 'F2': (62.59, 193.8),
    'F3': (114.76, 254.9), 'F4': (215.24, 316.1), 'F5': (289.76, 377.2),
    'F6': (377.28, 438.4),
}


@pytest.mark.parametrize('name', list(_PAPER))
def test_paper_flops_and_params_at_test_resolution(name):
  # model_cost traces with jax.eval_shape: nothing is run or allocated.
  cost = flops.model_cost(name)  # default image_size: the test resolution
  gmacs, mparams = _PAPER[name]
  assert round(cost['macs'] / 1e9, 2) == gmacs
  assert round(cost['params'] / 1e6, 1) == mparams
  n = sum(nfnet.VARIANTS[name].depth)
  # 4 stem + 4 per block + 4 shortcuts + final conv; 2 SE linears per block
  # plus the classifier.
  assert (cost['convs'], cost['linears']) == (4 + 4 * n + 4 + 1, 2 * n + 1)


def _analytic_nfnet_macs(variant, px, num_classes=1000, in_ch=3):
  """Independent walk of the official count_flops formula (divisible sizes)."""
  h = px
  macs, ch = 0, in_ch
  for out, stride in ((16, 2), (32, 1), (64, 1), (variant.width[0] // 2, 2)):
    h //= stride
    macs += h * h * out * 9 * ch
    ch = out
  for stage, depth in enumerate(variant.depth):
    out = variant.width[stage]
    gw = variant.group_width[stage]
    mid = int(out * variant.expansion[stage]) // gw * gw
    for b in range(depth):
      stride = 2 if (b == 0 and stage > 0) else 1
      macs += h * h * mid * ch  # conv0 at the input resolution
      h //= stride
      macs += 2 * h * h * mid * 9 * gw  # conv1 (strided) + conv1b, grouped
      macs += h * h * out * mid  # conv2
      hidden = int(out * 0.5)
      macs += 2 * out * hidden  # squeeze-excite linears
      if b == 0:
        macs += h * h * out * ch  # conv_shortcut after pooling
      ch = out
  macs += h * h * 2 * ch * ch  # final_conv
  return macs + 2 * ch * num_classes


def test_matches_analytic_walk_at_train_resolution():
  f0 = nfnet.VARIANTS['F0']
  macs = flops.count_macs('F0', 192)
  assert macs == _analytic_nfnet_macs(f0, 192)
  assert round(macs / 1e9, 2) == 6.98  # recomputed train-resolution value


def test_forward_function_and_registry_model():
  tiny = nfnet.NFNetVariant(width=(16, 32, 64, 64), depth=(1, 2, 1, 1),
                            group_width=8)
  want = _analytic_nfnet_macs(tiny, 32, num_classes=10)

  def forward(images, is_training=False):
    return nfnet.NFNet(10, variant=tiny)(images, is_training=is_training)

  assert flops.count_macs(forward, 32) == want
  assert flops.count_macs(hk.transform(forward), (32, 32)) == want
  models = pytest.importorskip('nfnets.models')
  fwd = models.make_forward('NFNet', 10, variant=tiny)
  assert flops.count_macs(fwd, 32) == want
  assert flops.count_macs('NFNet', 32, num_classes=10,
                          model_kwargs={'variant': tiny}) == want


def test_plain_haiku_layers_and_padding():
  def forward(x, is_training=False):
    del is_training
    y = hk.Conv2D(8, 3, stride=2, padding='VALID')(x)  # 7x7 -> 3x3
    y = hk.Conv2D(8, 3, feature_group_count=4)(y)  # 3x3, 2 in-ch per group
    return hk.Linear(5)(y.reshape(y.shape[0], -1))

  cost = flops.model_cost(forward, 7, channels=2)
  assert cost['macs'] == 3 * 3 * 8 * 9 * 2 + 3 * 3 * 8 * 9 * 2 + 72 * 5
  assert cost['params'] == (9 * 2 * 8 + 8) + (9 * 2 * 8 + 8) + (72 * 5 + 5)


def test_conv_macs_scale_with_pixels():
  # Convs scale with H * W; the squeeze-excite and classifier linears act on
  # pooled features and do not.
  f0 = nfnet.VARIANTS['F0']
  fixed = sum(2 * w * (w // 2) * d for w, d in zip(f0.width, f0.depth))
  fixed += 3072 * 1000
  small, large = flops.count_macs('F0', 64), flops.count_macs('F0', 128)
  assert small == _analytic_nfnet_macs(f0, 64)
  assert large - fixed == 4 * (small - fixed)


def test_bad_inputs():
  with pytest.raises(ValueError, match='image_size is required'):
    flops.count_macs(lambda x, is_training=False: hk.Linear(2)(x))
  with pytest.raises(ValueError, match=r'Unknown model .*F0'):
    flops.count_macs('F9', 32)
  with pytest.raises(ValueError, match=r'int or \(H, W\)'):
    flops.count_macs('F0', (32, 32, 3))
  with pytest.raises(ValueError, match='forward function'):
    flops.count_macs(42, 32)
  assert jax.device_count() == 8  # conftest's virtual devices are irrelevant
