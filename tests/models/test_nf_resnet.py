"""Tests for the Normalizer-Free ResNets (nfnets/nf_resnet.py).

Three compilations in all (init, train step, eval step of one tiny net, compiled without
backend optimisation, which is what dominates CPU compile time); full-size checks are abstract
`jax.eval_shape` traces.
"""

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.models import model_helpers as mh
from nfnets.models.nf_resnet import NF_ResNet
from nfnets.models.resnet import ResNet
from nfnets.models.variants import RESNET_VARIANTS, ResNetVariant

TINY = ResNetVariant(depth=(2, 1, 1, 1))
count = mh.count


def abstract_build(module=NF_ResNet, **kwargs):
  return mh.abstract_build(module, **kwargs)


def closed_form_nf_resnet_params(depth, width=4, num_classes=1000, se_ratio=None):
  """Hand-written count: every WS conv has w + gain + bias, every block one skip_gain."""
  def ws_conv(k, cin, cout):
    return k * k * cin * cout + 2 * cout
  stem = int(16 * width)
  total = ws_conv(7, 3, stem)
  in_ch = stem
  for stage, blocks in enumerate(depth):
    out_ch = int((64 << stage) * width)
    mid = out_ch // 4
    for b in range(blocks):
      total += ws_conv(1, in_ch, mid) + ws_conv(3, mid, mid) + ws_conv(1, mid, out_ch) + 1
      if b == 0:
        total += ws_conv(1, in_ch, out_ch)
      if se_ratio is not None:
        hidden = int(out_ch * se_ratio)
        total += out_ch * hidden + hidden + hidden * out_ch + out_ch
      in_ch = out_ch
  return total + in_ch * num_classes + num_classes


def test_nf_resnet50_is_the_bn_resnet_without_bn_plus_gains_and_biases():
  nf_params, nf_state, _ = abstract_build(num_classes=1000)
  bn_params, _, _ = abstract_build(ResNet, num_classes=1000)
  assert count(nf_params) == closed_form_nf_resnet_params((3, 4, 6, 3)) == 25_557_048
  assert not nf_state  # normalizer-free: no moving statistics
  # Same conv kernels and classifier as the BN baseline ...
  bn_weights = [v for d in bn_params.values() for n, v in d.items() if n in ('w', 'b')]
  nf_weights = [v for d in nf_params.values() for n, v in d.items() if n in ('w', 'b')]
  assert sorted(v.shape for v in nf_weights) == sorted(v.shape for v in bn_weights)
  # ... plus a gain and a bias per WS-conv output channel and one skip_gain per block.
  ws_channels = sum(d['gain'].shape[-1] for d in nf_params.values() if 'gain' in d)
  assert count(nf_params) == count(bn_weights) + 2 * ws_channels + sum((3, 4, 6, 3))


@pytest.mark.parametrize('variant', sorted(RESNET_VARIANTS))
def test_every_variant_shapes_and_params(variant):
  params, _, shapes = abstract_build(num_classes=7, variant=variant)
  assert count(params) == closed_form_nf_resnet_params(RESNET_VARIANTS[variant].depth,
                                                       num_classes=7)
  assert shapes['logits'] == (2, 7)
  assert shapes['pool'] == (2, 2048)


def test_se_params_and_stem_kernel():
  params, _, _ = abstract_build(num_classes=10, use_se=True)
  assert count(params) == closed_form_nf_resnet_params((3, 4, 6, 3), num_classes=10,
                                                       se_ratio=0.25)
  assert params['NF_ResNet/~/initial_conv']['w'].shape == (7, 7, 3, 64)
  # Transition shortcuts are strided 1x1 convs (no avg-pool), one per stage.
  assert sum('conv_shortcut' in name for name in params) == 4


def test_defaults_and_bad_arguments():
  images = jnp.zeros((1, 32, 32, 3))
  init = lambda **kw: mh.transform(NF_ResNet, num_classes=3, **kw).init(
      jax.random.PRNGKey(0), images, True)
  for kwargs, match in [({'variant': 'ResNet18'}, 'ResNet50'),
                        ({'activation': 'swishy'}, 'relu'),
                        ({'drop_rate': 1.5}, 'drop_rate'),
                        ({'stochdepth_rate': -0.1}, 'stochdepth_rate')]:
    with pytest.raises(ValueError, match=match):
      init(variant=kwargs.pop('variant', TINY), width=0.25, **kwargs)
  # The official code had no NF-ResNet dropout value (drop_rate=None was a KeyError); the
  # default here is 0.25, written once, in the constructor.
  def drop_of(**kw):
    seen = []
    def f(x):
      model = NF_ResNet(num_classes=3, variant=TINY, width=0.25, **kw)
      seen.append(model.drop_rate)
      return model(x, is_training=False)
    jax.eval_shape(hk.transform(f).init, jax.random.PRNGKey(0), images)
    return seen[0]
  assert drop_of() == 0.25
  assert drop_of(drop_rate=0.0) == 0.0


@pytest.fixture(scope='module')
def tiny_run():
  """One tiny NF-ResNet with SE: init, train steps and evals at skip_gain 0 and 1."""
  return mh.nf_tiny_run(mh.transform(NF_ResNet, num_classes=5, variant=TINY, width=0.25,
                                     use_se=True, stochdepth_rate=0.5, drop_rate=0.5))


def test_init_values(tiny_run):
  params = tiny_run['params']
  assert not tiny_run['state']
  gains = [d['skip_gain'] for d in params.values() if 'skip_gain' in d]
  assert len(gains) == sum(TINY.depth) and all(float(g) == 0.0 for g in gains)
  fc_w = np.asarray(params['NF_ResNet/~/linear']['w'])
  assert 0.007 < fc_w.std() < 0.013  # N(0, 0.01)
  assert fc_w.shape == (128, 5)


def test_forward_backward(tiny_run):
  (loss, outputs), grads = tiny_run['train0'][0]
  assert np.isfinite(loss) and outputs['logits'].shape == (4, 5)
  assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))
  # With skip_gain 0 the branches are cut, but skip_gain itself and the shortcuts learn.
  assert all(float(d['skip_gain']) != 0.0 for d in grads.values() if 'skip_gain' in d)
  assert all(float(jnp.abs(d['w']).sum()) > 0 for n, d in grads.items() if 'conv_shortcut' in n)
  (_, _), grads1 = tiny_run['train1'][0]
  assert all(float(jnp.abs(d['w']).sum()) > 0 for n, d in grads1.items() if 'conv1' in n)


def test_skipinit_makes_plain_blocks_identities(tiny_run):
  outputs = tiny_run['eval0'][0]
  # Block 1 (second of stage 0) has no projection: with skip_gain 0 it returns its input.
  assert float(outputs['avg_var_2']) == float(outputs['avg_var_1'])
  assert float(outputs['res_avg_var_1']) > 0  # measured before the gain


def test_stochastic_depth_and_dropout_only_in_training(tiny_run):
  (_, a), _ = tiny_run['train1'][0]
  (_, b), _ = tiny_run['train1'][1]
  assert not np.allclose(a['pool'], b['pool'])  # stochastic depth acts before pooling
  (_, a0), _ = tiny_run['train0'][0]
  (_, b0), _ = tiny_run['train0'][1]
  np.testing.assert_allclose(a0['pool'], b0['pool'], rtol=1e-6)  # branches cut: no effect
  assert not np.allclose(a0['logits'], b0['logits'])  # ... but dropout still acts
  for name in ('eval0', 'eval1'):
    np.testing.assert_array_equal(tiny_run[name][0]['logits'], tiny_run[name][1]['logits'])


def test_signal_metrics_present_and_bounded(tiny_run):
  outputs = tiny_run['eval1'][0]
  n = sum(TINY.depth)
  for i in range(n + 1):
    assert 0.2 < float(outputs[f'avg_var_{i}']) < 5.0, i  # beta/alpha keep the scale O(1)
    assert f'avg_sq_mean_{i}' in outputs
  assert all(f'res_avg_var_{i}' in outputs for i in range(n))
