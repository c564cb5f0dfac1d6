"""Tests for the Normalizer-Free RegNets (nfnets/nf_regnet.py).

Three compilations (init, train step, eval step of one tiny net, without backend
optimisation); every B0-B8 check is an abstract `jax.eval_shape` trace.
"""

import functools

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.models import model_helpers as mh
from nfnets.models.nf_regnet import NF_REGNET_VARIANTS, NF_RegNet, NFRegNetVariant

# Widths 16..64 at multiplier 1: the first block (expansion 1) has 16 // 8 = 2 groups.
TINY = NFRegNetVariant(width=(16, 24, 32, 64), depth=(2, 1, 1, 1), drop_rate=0.5)
count = mh.count
abstract_build = functools.partial(mh.abstract_build, NF_RegNet, image_size=64)


def closed_form_nf_regnet_params(variant, width=0.75, expansion=2.25, group_size=8,
                                 se_ratio=0.5, num_classes=1000):
  """Hand-written count of an NF-RegNet from its variant row."""
  def ws_conv(k, cin, cout, groups=1):
    return k * k * (cin // groups) * cout + 2 * cout  # w + gain + bias
  widths = [int(w * width) for w in variant.width]
  ch = widths[0]
  total = ws_conv(3, 3, ch)
  first = True
  for out_ch, depth in zip(widths, variant.depth):
    for b in range(depth):
      groups = int(ch * (1.0 if first else expansion)) // group_size
      mid = groups * group_size
      hidden = max(1, int(mid * se_ratio))
      total += ws_conv(1, ch, mid) + ws_conv(3, mid, mid, groups) + ws_conv(1, mid, out_ch)
      total += mid * hidden + hidden + hidden * mid + mid  # SE on the expanded width
      total += 1  # skip_gain
      if b == 0:  # every stage starts strided, so its first block projects
        total += ws_conv(1, ch, out_ch)
      ch, first = out_ch, False
  head = int(1280 * ch // 440)
  return total + ws_conv(1, ch, head) + head * num_classes + num_classes


@pytest.mark.parametrize('variant', sorted(NF_REGNET_VARIANTS))
def test_every_variant_shapes_and_params(variant):
  params, state, shapes = abstract_build(num_classes=10, variant=variant)
  row = NF_REGNET_VARIANTS[variant]
  assert not state
  assert count(params) == closed_form_nf_regnet_params(row, num_classes=10)
  head = int(1280 * int(row.width[-1] * 0.75) // 440)
  assert shapes['pool'] == (2, head)
  assert shapes['logits'] == (2, 10)
  # The stem is a 3x3 stride-2 conv to width[0] * 0.75 channels.
  assert params['NF_RegNet/~/initial_conv']['w'].shape == (3, 3, 3, int(row.width[0] * 0.75))


def test_b0_structure():
  params, _, _ = abstract_build(num_classes=1000)
  assert count(params) == closed_form_nf_regnet_params(NF_REGNET_VARIANTS['B0'])
  # B0 at width 0.75: last stage 330 channels -> final conv int(1280 * 330 // 440) = 960.
  assert params['NF_RegNet/~/final_conv']['w'].shape == (1, 1, 330, 960)
  # The first block expands by 1: 36 channels -> 36 // 8 = 4 groups of 8 = 32.
  assert params['NF_RegNet/~/nf_reg_block/~/conv0']['w'].shape == (1, 1, 36, 32)
  # Later blocks expand the INPUT width by 2.25: 36 * 2.25 = 81 -> 10 groups = 80.
  assert params['NF_RegNet/~/nf_reg_block_1/~/conv0']['w'].shape == (1, 1, 36, 80)
  assert params['NF_RegNet/~/nf_reg_block_1/~/conv1']['w'].shape == (3, 3, 8, 80)
  # SE sits on the expanded width (80 -> 40 -> 80), between conv1 and conv2.
  assert params['NF_RegNet/~/nf_reg_block_1/~/squeeze_excite/~/linear']['w'].shape == (80, 40)
  assert sum('conv_shortcut' in name for name in params) == 4


def test_bad_arguments():
  images = jnp.zeros((1, 32, 32, 3))
  init = lambda **kw: mh.transform(NF_RegNet, num_classes=3, **kw).init(
      jax.random.PRNGKey(0), images, True)
  for kwargs, match in [({'variant': 'B9'}, 'B0'),
                        ({'variant': TINY, 'activation': 'swishy'}, 'silu'),
                        ({'variant': TINY, 'width': 0.25}, 'group_size'),
                        ({'variant': TINY, 'drop_rate': 1.0}, 'drop_rate')]:
    with pytest.raises(ValueError, match=match):
      init(**kwargs)
  with pytest.raises(ValueError, match='equal lengths'):
    NFRegNetVariant(width=(8, 16), depth=(1,))


def test_swish_is_an_alias_of_silu():
  # The official default 'swish' was a KeyError; here it builds the same network as 'silu'.
  a, _, _ = abstract_build(num_classes=3, variant=TINY, width=1.0, activation='swish')
  b, _, _ = abstract_build(num_classes=3, variant=TINY, width=1.0)
  assert jax.tree.structure(a) == jax.tree.structure(b)


@pytest.fixture(scope='module')
def tiny_run():
  """One tiny NF-RegNet: init, train steps and evals at skip_gain 0 and 1."""
  return mh.nf_tiny_run(mh.transform(NF_RegNet, num_classes=5, variant=TINY, width=1.0,
                                     stochdepth_rate=0.5,
                                     fc_init=hk.initializers.RandomNormal(0.1)))


def test_forward_backward(tiny_run):
  assert not tiny_run['state']
  (loss, outputs), grads = tiny_run['train1'][0]
  assert np.isfinite(loss) and outputs['logits'].shape == (4, 5)
  assert outputs['pool'].shape == (4, int(1280 * 64 // 440))
  assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))
  assert all(float(jnp.abs(d['w']).sum()) > 0 for n, d in grads.items() if 'conv' in n)
  # Default classifier init is zeros, as official; the fixture overrides it, skip_gain is 0.
  gains = [d['skip_gain'] for d in tiny_run['params'].values() if 'skip_gain' in d]
  assert len(gains) == sum(TINY.depth) and all(float(g) == 0.0 for g in gains)


def test_stochastic_depth_and_dropout_only_in_training(tiny_run):
  (_, a), _ = tiny_run['train1'][0]
  (_, b), _ = tiny_run['train1'][1]
  assert not np.allclose(a['pool'], b['pool'])  # stochastic depth acts before the head
  (_, a0), _ = tiny_run['train0'][0]
  (_, b0), _ = tiny_run['train0'][1]
  np.testing.assert_allclose(a0['pool'], b0['pool'], rtol=1e-6)  # branches cut
  assert not np.allclose(a0['logits'], b0['logits'])  # the variant's dropout 0.5 acts
  np.testing.assert_array_equal(tiny_run['eval1'][0]['logits'], tiny_run['eval1'][1]['logits'])


def test_signal_metrics(tiny_run):
  outputs = tiny_run['eval1'][0]
  n = sum(TINY.depth)
  for i in range(n + 1):
    assert {f'avg_sq_mean_{i}', f'avg_var_{i}'} <= set(outputs)
    # Only bounded above: avg-pool shortcuts divide the variance of spatially white noise
    # inputs by 4 per transition, so tiny random images legitimately fade.
    assert 0.0 < float(outputs[f'avg_var_{i}']) < 5.0, i
  assert all(float(outputs[f'res_avg_var_{i}']) > 0 for i in range(n))
