"""Tests for the model registry (nfnets/models.py).

Everything here is an abstract `jax.eval_shape` trace: the families' own test modules run
real forward/backward passes, so this module compiles nothing.
"""

import math

import haiku as hk
import jax
import jax.numpy as jnp
import ml_collections
import pytest

from nfnets.models import registry as models
from nfnets.models.nf_regnet import NFRegNetVariant
from nfnets.models.nfnet import NFNetVariant
from nfnets.models.variants import ResNetVariant

# Tiny constructor kwargs per family, with `variant` as a plain dict as a config gives it.
TINY_KWARGS = {
    'NFNet': {'variant': {'width': [16, 32, 64, 64], 'depth': [1, 1, 1, 1],
                          'group_width': 8}},
    'NF_ResNet': {'variant': {'depth': [1, 1, 1, 1]}, 'width': 0.25},
    'NF_RegNet': {'variant': {'width': [16, 24, 32, 64], 'depth': [1, 1, 1, 1]}, 'width': 1.0},
    'ResNet': {'variant': {'depth': [1, 1, 1, 1]}, 'width': 0.25},
}
IMAGES = jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32)


def abstract_run(forward, is_training, return_metrics=False):
  """(params, state, outputs, new_state) shapes of init + apply, with nothing compiled."""
  def run(rng, images):
    # Always init in training mode: hk.BatchNorm has no moving averages to read before that.
    params, state = forward.init(rng, images, True)
    if return_metrics:
      outputs, new_state = forward.apply(params, state, rng, images, is_training,
                                         return_metrics=True)
    else:
      outputs, new_state = forward.apply(params, state, rng, images, is_training)
    return params, state, outputs, new_state
  return jax.eval_shape(run, jax.random.PRNGKey(0), IMAGES)


def test_registry_names():
  assert set(models.MODELS) == {'NFNet', 'NF_ResNet', 'NF_RegNet', 'ResNet'}
  assert set(models.VARIANT_TYPES) == set(models.MODELS)
  for name, cls in models.MODELS.items():
    assert issubclass(cls, hk.Module)
    assert cls.VARIANTS, name  # every family carries its variant table


@pytest.mark.parametrize('name', sorted(TINY_KWARGS))
def test_make_forward_contract(name):
  forward = models.make_forward(name, 6, **TINY_KWARGS[name])
  assert isinstance(forward, hk.TransformedWithState)
  params, state, outputs, new_state = abstract_run(forward, is_training=True)
  assert outputs['logits'].shape == (2, 6)
  assert outputs['pool'].ndim == 2 and outputs['pool'].shape[0] == 2
  assert not any(k.startswith('avg_var') for k in outputs)
  # Only the BN baseline carries state, and apply returns it with the same structure.
  assert bool(state) == (name == 'ResNet')
  assert jax.tree.structure(state) == jax.tree.structure(new_state)
  assert sum(math.prod(x.shape) for x in jax.tree.leaves(params)) > 0


@pytest.mark.parametrize('name', sorted(TINY_KWARGS))
def test_return_metrics_passthrough(name):
  forward = models.make_forward(name, 3, **TINY_KWARGS[name])
  _, _, outputs, _ = abstract_run(forward, is_training=False, return_metrics=True)
  # Four single-block stages: stem (0) and blocks 1..4; residual variances 0..3.
  for i in range(5):
    assert {f'avg_sq_mean_{i}', f'avg_var_{i}'} <= set(outputs), (name, i)
  for i in range(4):
    assert f'res_avg_var_{i}' in outputs
    assert outputs[f'res_avg_var_{i}'].shape == ()


def test_mapping_variants_become_dataclasses():
  expected = {'NFNet': NFNetVariant, 'NF_ResNet': ResNetVariant,
              'NF_RegNet': NFRegNetVariant, 'ResNet': ResNetVariant}
  for name, kwargs in TINY_KWARGS.items():
    resolved = models.resolve_kwargs(name, kwargs)
    assert isinstance(resolved['variant'], expected[name])
    assert resolved['variant'].depth == (1, 1, 1, 1)
    assert kwargs['variant']['depth'] == [1, 1, 1, 1]  # the caller's dict is not mutated
  # ml_collections ConfigDicts (what configs/*.py return) work the same way.
  config = ml_collections.ConfigDict({'variant': TINY_KWARGS['NFNet']['variant']})
  assert isinstance(models.resolve_kwargs('NFNet', config)['variant'], NFNetVariant)
  # Names resolve to the family's table entry (one resolver for names and mappings).
  assert models.resolve_kwargs('NFNet', {'variant': 'F1'}) == {
      'variant': models.MODELS['NFNet'].VARIANTS['F1']}


def test_create_model_inside_transform():
  def f(images):
    model = models.create_model('NF_ResNet', 4, **TINY_KWARGS['NF_ResNet'])
    assert isinstance(model, models.MODELS['NF_ResNet'])
    return model(images, is_training=False)['logits']
  params = jax.eval_shape(hk.transform(f).init, jax.random.PRNGKey(0), IMAGES)
  assert params['NF_ResNet/~/linear']['w'].shape == (128, 4)


def test_errors_name_the_fix():
  with pytest.raises(ValueError, match=r"'NFNet', 'NF_RegNet', 'NF_ResNet', 'ResNet'"):
    models.make_forward('EfficientNet', 10)
  with pytest.raises(ValueError, match='NFNet'):
    models.create_model('nfnet', 10)
  with pytest.raises(ValueError, match='F0'):
    models.make_forward('NFNet', 10, variant='F9')
  with pytest.raises(ValueError, match='ResNet50'):
    models.make_forward('ResNet', 10, variant='ResNet18')
  with pytest.raises(ValueError, match='depth'):
    models.make_forward('NF_ResNet', 10, variant={'depht': [1, 1, 1, 1]})
  with pytest.raises(ValueError, match='num_classes'):
    models.resolve_kwargs('NFNet', {'num_classes': 5})
  with pytest.raises(ValueError, match='num_classes'):
    models.make_forward('NFNet', 0)
