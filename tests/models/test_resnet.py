"""Tests for the BatchNorm ResNet baseline (nfnets/resnet.py).

Compilations are kept to three (init, train step, eval step of one tiny net); every
full-size check is an abstract `jax.eval_shape` trace.
"""

import functools

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.models import model_helpers as mh
from nfnets.models import resnet
from nfnets.models.resnet import ResNet
from nfnets.models.variants import ResNetVariant

TINY = ResNetVariant(depth=(2, 1, 1, 1))
FAST_COMPILE = mh.FAST_COMPILE
count = mh.count
abstract_build = functools.partial(mh.abstract_build, ResNet)


def closed_form_resnet_params(depth, width=4, num_classes=1000, preactivation=True):
  """Parameter count from the layer shapes written out by hand (He et al. 2016 bottlenecks).

  Convs have no bias; every BatchNorm has a scale and an offset (2 params per channel).
  """
  stem = int(16 * width)
  total = 7 * 7 * 3 * stem
  if not preactivation:
    total += 2 * stem  # v1 normalises the stem output.
  in_ch = stem
  for stage, blocks in enumerate(depth):
    out_ch = int((64 << stage) * width)
    mid = out_ch // 4
    for b in range(blocks):
      convs = in_ch * mid + 9 * mid * mid + mid * out_ch
      if preactivation:
        bns = 2 * in_ch + 2 * mid + 2 * mid  # bn0 on the block input; bn1, bn2 on the bottleneck
      else:
        bns = 2 * mid + 2 * mid + 2 * out_ch  # bn0, bn1 on the bottleneck, bn2 on the output
      if b == 0:
        convs += in_ch * out_ch  # projection shortcut
        if not preactivation:
          bns += 2 * out_ch  # its BN
      total += convs + bns
      in_ch = out_ch
  if preactivation:
    total += 2 * in_ch  # final BN before pooling
  return total + in_ch * num_classes + num_classes


def test_resnet50_v2_param_count():
  params, state, _ = abstract_build(num_classes=1000)
  assert count(params) == closed_form_resnet_params((3, 4, 6, 3)) == 25_549_352
  # The paper's (and Haiku's) "25.6M" for ResNet-50, within rounding.
  assert 25.5e6 < count(params) < 25.6e6
  # BN moving statistics are state, not params: one mean and one var average per BN channel.
  bn_channels = sum(d['scale'].shape[-1] for d in params.values() if 'scale' in d)
  averages = sum(d['average'].shape[-1] for d in state.values())
  assert averages == 2 * bn_channels > 0


def test_resnet50_v1_matches_the_classic_count():
  params, _, _ = abstract_build(num_classes=1000, preactivation=False)
  assert count(params) == closed_form_resnet_params((3, 4, 6, 3), preactivation=False)
  # 25,557,032: the well-known ResNet-50 v1 count (BN scale/offset, biased fc).
  assert count(params) == 25_557_032


@pytest.mark.parametrize('variant', sorted(resnet.RESNET_VARIANTS))
def test_every_variant_shapes_and_params(variant):
  params, _, shapes = abstract_build(num_classes=7, variant=variant)
  depth = resnet.RESNET_VARIANTS[variant].depth
  assert count(params) == closed_form_resnet_params(depth, num_classes=7)
  assert shapes['logits'] == (2, 7)
  assert shapes['pool'] == (2, 2048)


def test_unknown_variant_and_bad_arguments_raise():
  images = jnp.zeros((1, 32, 32, 3))
  for kwargs, match in [({'variant': 'ResNet51'}, 'ResNet50'),
                        ({'activation': 'swishy'}, 'relu'),
                        ({'drop_rate': 1.0}, 'drop_rate'),
                        ({'width': 0.01}, 'width')]:
    with pytest.raises(ValueError, match=match):
      mh.transform(ResNet, num_classes=3, **kwargs).init(jax.random.PRNGKey(0), images, True)
  with pytest.raises(ValueError, match='4 positive'):
    ResNetVariant(depth=(1, 1, 1))


@pytest.fixture(scope='module')
def tiny_run():
  """One tiny v2 net with SE and dropout: init, two train steps (two rngs), two evals."""
  forward = mh.transform(ResNet, num_classes=5, variant=TINY, width=0.25, use_se=True,
                         drop_rate=0.5, fc_init=hk.initializers.RandomNormal(0.5))
  rng = jax.random.PRNGKey(0)
  # Non-zero mean and non-unit scale so the BN statistics visibly move.
  images = jax.random.normal(rng, (4, 32, 32, 3)) * 2.0 + 1.0
  labels = jnp.arange(4) % 5
  params, state = jax.jit(lambda r, x: forward.init(r, x, True),
                          compiler_options=FAST_COMPILE)(rng, images)

  def loss_fn(p, s, r):
    outputs, new_state = forward.apply(p, s, r, images, True, return_metrics=True)
    logp = jax.nn.log_softmax(outputs['logits'])
    return -jnp.mean(logp[jnp.arange(4), labels]), (outputs, new_state)

  train = jax.jit(jax.value_and_grad(loss_fn, has_aux=True), compiler_options=FAST_COMPILE)
  evaluate = jax.jit(lambda p, s, r: forward.apply(p, s, r, images, False, return_metrics=True),
                     compiler_options=FAST_COMPILE)
  keys = [jax.random.PRNGKey(k) for k in (1, 2)]
  return {
      'params': params, 'state': state,
      'train': [train(params, state, k) for k in keys],
      'eval': [evaluate(params, state, k) for k in keys],
  }


def test_tiny_forward_backward_is_finite_and_reaches_every_conv(tiny_run):
  (loss, (outputs, _)), grads = tiny_run['train'][0]
  assert np.isfinite(loss)
  assert outputs['logits'].shape == (4, 5)
  assert any('squeeze_excite' in name for name in tiny_run['params'])
  assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))
  conv_grads = [g for name, d in grads.items() if 'conv' in name for g in d.values()]
  assert len(conv_grads) == 1 + 3 * sum(TINY.depth) + 4  # stem, 3 per block, 4 shortcuts
  assert all(float(jnp.abs(g).sum()) > 0 for g in conv_grads)


def test_bn_state_moves_in_training_only(tiny_run):
  state = tiny_run['state']
  (_, (_, new_state)), _ = tiny_run['train'][0]
  changed = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), state, new_state)
  assert any(jax.tree.leaves(changed))
  _, eval_state = tiny_run['eval'][0]
  same = jax.tree.map(lambda a, b: bool(jnp.all(a == b)), state, eval_state)
  assert all(jax.tree.leaves(same))


def test_dropout_acts_in_training_only(tiny_run):
  (_, (train_a, _)), _ = tiny_run['train'][0]
  (_, (train_b, _)), _ = tiny_run['train'][1]
  # Dropout sits after 'pool': pool agrees across rngs, the logits do not.
  np.testing.assert_allclose(train_a['pool'], train_b['pool'], rtol=1e-6)
  assert not np.allclose(train_a['logits'], train_b['logits'])
  (eval_a, _), (eval_b, _) = tiny_run['eval']
  np.testing.assert_array_equal(eval_a['logits'], eval_b['logits'])


def test_metrics_keys(tiny_run):
  outputs, _ = tiny_run['eval'][0]
  num_blocks = sum(TINY.depth)
  for i in range(num_blocks):
    assert {f'avg_sq_mean_{i + 1}', f'avg_var_{i + 1}', f'res_avg_var_{i}'} <= set(outputs)
    assert float(outputs[f'res_avg_var_{i}']) > 0
  assert {'avg_sq_mean_0', 'avg_var_0'} <= set(outputs)
  assert f'res_avg_var_{num_blocks}' not in outputs
