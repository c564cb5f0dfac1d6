"""Tests of scan_blocks: a stage's repeated blocks run as one lax.scan, with nothing else changed.

What must hold with scan_blocks on: the parameter tree (init, save_params/load_params) is the
per-block one; the forward pass -- logits, features, signal metrics, with the stochastic-depth
masks and dropout of training -- and the gradients are the unscanned ones; remat composes
with it. Equality is up to float32 rounding: XLA fuses the reductions around a while loop, and
compiles the convolutions of its body, with other kernels than in straight-line code, so a
value may differ in its last bits (most outputs here are bitwise equal; gradients differ by
less than 3e-6 of each parameter's largest gradient). A wrong beta, keep probability or
random key changes values by orders of magnitude more.

Cost: one small NFNet and one small NF-RegNet, each compiled once per setting at 16 px, at
XLA:CPU's lowest backend optimisation level.
"""

import functools

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import common
from nfnets.models import blocks
from nfnets.models import registry
from nfnets.models.nf_regnet import NFRegNetVariant
from nfnets.weights import npz
from tests.models.model_helpers import FAST_COMPILE

# Stage 1 has 3 blocks: a transition, then a run of two identical blocks that is scanned.
# High stochastic-depth rates, so that the scanned blocks do drop branches.
NFNET_KWARGS = dict(common.small_nfnet_kwargs(depth=(1, 3, 1, 1), stochdepth_rate=0.9,
                                              drop_rate=0.3))
NFREGNET_KWARGS = dict(variant=NFRegNetVariant(width=(16, 24, 32, 32), depth=(1, 3, 1, 1)),
                       width=1.0, stochdepth_rate=0.9, drop_rate=0.3)
MODELS = {'NFNet': NFNET_KWARGS, 'NF_RegNet': NFREGNET_KWARGS}
# |scanned - unscanned| <= tolerance * max |unscanned|, per output or parameter gradient.
FORWARD_TOL = {np.dtype(np.float32): 1e-5, np.dtype(jnp.bfloat16): 1e-2}
GRAD_TOL = 2e-5
IMAGE_SIZE = 16


def _images():
  return jax.random.normal(jax.random.PRNGKey(0), (2, IMAGE_SIZE, IMAGE_SIZE, 3))


@functools.lru_cache(maxsize=None)
def _params(name):
  """Init once per family; every skip_gain and the classifier set non-zero, so that every
  residual branch reaches the logits (NF-RegNet's classifier starts at zero)."""
  forward = registry.make_forward(name, 10, **MODELS[name])
  params, state = jax.jit(lambda r, x: forward.init(r, x, is_training=True),
                          compiler_options=FAST_COMPILE)(jax.random.PRNGKey(1), _images())
  gains = iter(np.linspace(0.5, 1.5, 64))
  classifier = np.random.default_rng(0).normal(size=params[f'{name}/~/linear']['w'].shape)

  def nonzero(module, param, value):
    if param == 'skip_gain':
      return jnp.full_like(value, next(gains))
    if module == f'{name}/~/linear' and param == 'w':
      return jnp.asarray(0.1 * classifier, value.dtype)
    return value
  return hk.data_structures.map(nonzero, params), state


@functools.lru_cache(maxsize=None)
def _run(name, scan_blocks, remat='none', evaluate=True):
  """(train outputs, grads, eval outputs, bf16 eval outputs) from one compiled program.

  The evaluations are {} unless `evaluate`; bfloat16 (where beta and the keep probability
  are rounded to bf16 as the unscanned blocks round their Python floats) only for NFNet.
  """
  forward = registry.make_forward(name, 10, scan_blocks=scan_blocks, remat=remat,
                                  **MODELS[name])
  params, state = _params(name)
  images = _images()

  def loss(p):
    outputs, _ = forward.apply(p, state, jax.random.PRNGKey(3), images, True,
                               return_metrics=True)
    return jnp.sum(outputs['logits'] ** 2), outputs

  def everything(p):
    (_, train), grads = jax.value_and_grad(loss, has_aux=True)(p)
    f32 = bf16 = {}
    if evaluate:
      f32 = forward.apply(p, state, None, images, False, return_metrics=True)[0]
    if evaluate and name == 'NFNet':
      half = lambda t: jax.tree.map(lambda v: v.astype(jnp.bfloat16), t)
      bf16 = forward.apply(half(p), state, None, half(images), False)[0]
    return train, grads, f32, bf16

  return jax.device_get(jax.jit(everything, compiler_options=FAST_COMPILE)(params))


def _assert_close(got, want, tol, what):
  want = np.asarray(want, np.float32)
  np.testing.assert_allclose(np.asarray(got, np.float32), want, rtol=0,
                             atol=tol * float(np.max(np.abs(want))), err_msg=what)


def _assert_same_outputs(got, want):
  assert sorted(got) == sorted(want)
  for key in want:
    _assert_close(got[key], want[key], FORWARD_TOL[np.dtype(want[key].dtype)], key)


def _assert_close_grads(got, want):
  assert jax.tree.structure(got) == jax.tree.structure(want)
  flat_want = jax.tree_util.tree_flatten_with_path(want)[0]
  for (path, w), g in zip(flat_want, jax.tree.leaves(got)):
    _assert_close(g, w, GRAD_TOL, jax.tree_util.keystr(path))
  # The kernels do get gradients (a block whose branch stochastic depth dropped for the whole
  # batch gets none), so the comparison is not vacuous.
  assert any(np.any(g != 0) for g in jax.tree.leaves(want) if g.ndim == 4)


@pytest.mark.parametrize('name', sorted(MODELS))
def test_scanned_model_computes_the_unscanned_values(name):
  train, grads, evaluate, bf16 = _run(name, False)
  s_train, s_grads, s_evaluate, s_bf16 = _run(name, True)
  _assert_same_outputs(s_train, train)
  _assert_same_outputs(s_evaluate, evaluate)
  _assert_same_outputs(s_bf16, bf16)
  _assert_close_grads(s_grads, grads)
  # The random parts were exercised: training differs from evaluation before the head's
  # dropout, by stochastic depth alone.
  assert not np.allclose(train['avg_var_4'], evaluate['avg_var_4'])


def test_scan_composes_with_remat():
  train, grads, _, _ = _run('NFNet', False)
  r_train, r_grads, _, _ = _run('NFNet', True, 'block', evaluate=False)
  _assert_same_outputs(r_train, train)
  _assert_close_grads(r_grads, grads)


def test_stochastic_depth_masks_are_the_unscanned_ones():
  # 64 examples at 8 px: each scanned block draws 64 masks, so a block run with another
  # block's keep probability or random key would show (2 examples rarely do).
  images = jax.random.normal(jax.random.PRNGKey(5), (64, 8, 8, 3))
  params, state = _params('NFNet')
  outputs = []
  for scan in (False, True):
    forward = registry.make_forward('NFNet', 10, scan_blocks=scan, **NFNET_KWARGS)
    outputs.append(jax.device_get(jax.jit(
        lambda p, f=forward: f.apply(p, state, jax.random.PRNGKey(6), images, True,
                                     return_metrics=True)[0],
        compiler_options=FAST_COMPILE)(params)))
  _assert_same_outputs(outputs[1], outputs[0])


@pytest.mark.parametrize('name', sorted(MODELS))
def test_parameter_tree_is_the_per_block_one(name):
  images = jax.ShapeDtypeStruct((2, IMAGE_SIZE, IMAGE_SIZE, 3), jnp.float32)
  trees = [jax.eval_shape(functools.partial(
      registry.make_forward(name, 10, scan_blocks=scan, **MODELS[name]).init,
      is_training=True), jax.random.PRNGKey(1), images) for scan in (False, True)]
  assert jax.tree.structure(trees[0]) == jax.tree.structure(trees[1])
  assert jax.tree.map(lambda v: (v.shape, v.dtype), trees[0]) == jax.tree.map(
      lambda v: (v.shape, v.dtype), trees[1])
  # One entry per block, as the official checkpoints have them.
  block_names = {m.split('/')[2] for m in trees[1][0] if '_block' in m}
  assert len(block_names) == 6


def test_init_values_do_not_depend_on_scan_blocks():
  forward = registry.make_forward('NFNet', 10, scan_blocks=True, **NFNET_KWARGS)
  params, _ = jax.jit(lambda r, x: forward.init(r, x, is_training=True),
                      compiler_options=FAST_COMPILE)(jax.random.PRNGKey(1), _images())
  want = jax.device_get(_params('NFNet')[0])
  for module, bundle in want.items():
    for param, value in bundle.items():
      if param != 'skip_gain' and module != 'NFNet/~/linear':  # _params sets these
        np.testing.assert_array_equal(params[module][param], value, err_msg=module)


def test_save_load_round_trip_runs_scanned(tmp_path):
  params, _ = _params('NFNet')
  path = tmp_path / 'params.npz'
  npz.save_params(path, jax.device_get(params))
  loaded = npz.load_params(path)
  assert jax.tree.structure(hk.data_structures.to_mutable_dict(loaded)) == jax.tree.structure(
      hk.data_structures.to_mutable_dict(params))
  jax.tree.map(np.testing.assert_array_equal, hk.data_structures.to_mutable_dict(loaded),
               hk.data_structures.to_mutable_dict(jax.device_get(params)))


def _scan_lengths(name, **kwargs):
  """Trip counts of the scans in the traced apply (abstract: nothing is compiled)."""
  forward = registry.make_forward(name, 1000, scan_blocks=True, **kwargs)
  images = jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32)
  params, state = jax.eval_shape(functools.partial(forward.init, is_training=True),
                                 jax.random.PRNGKey(0), images)
  jaxpr = jax.make_jaxpr(lambda p, x: forward.apply(p, state, jax.random.PRNGKey(0), x,
                                                    True))(params, images)
  return [eqn.params['length'] for eqn in jaxpr.eqns if eqn.primitive.name == 'scan']


@pytest.mark.parametrize('name,variant,lengths', [
    # Stages of 1, 2, 6, 3 blocks: after the transitions, runs of 1 (left alone), 5 and 2.
    ('NFNet', 'F0', [5, 2]),
    ('NF_ResNet', 'ResNet50', [2, 3, 5, 2]),  # 3, 4, 6, 3
    ('NF_RegNet', 'B0', [2, 5, 5]),  # 1, 3, 6, 6
])
def test_the_repeated_blocks_of_each_stage_are_scanned(name, variant, lengths):
  assert _scan_lengths(name, variant=variant) == lengths


def test_blocks_that_are_not_nf_blocks_are_never_scanned():
  def make_block(scale):
    return lambda x, is_training: (x * scale, jnp.asarray(scale))

  def forward(x):
    outputs = {}
    return blocks.apply_blocks([make_block(s) for s in (2.0, 3.0, 0.5)], x, False, outputs,
                               return_metrics=True, scan_blocks=True), outputs

  out, outputs = hk.transform(forward).apply({}, None, jnp.ones((1, 2, 2, 1)))
  np.testing.assert_allclose(out, 3.0)
  assert float(outputs['res_avg_var_2']) == 0.5
