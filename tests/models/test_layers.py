"""Tests for nfnets.layers against independent numpy formulas."""

import math

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nfnets.models import blocks
from nfnets.models import layers


def _np_standardize(w, gain, eps=1e-4):
  """(w - mean) * gain / sqrt(max(N * var, eps)), stats over (H, W, I)."""
  fan_in = np.prod(w.shape[:-1])
  mean = w.mean(axis=(0, 1, 2), keepdims=True)
  var = ((w - mean)**2).mean(axis=(0, 1, 2), keepdims=True)
  return (w - mean) * gain / np.sqrt(np.maximum(fan_in * var, eps))


def _np_conv_same(x, w, stride, groups):
  """Grouped NHWC x HWIO convolution with TensorFlow/XLA 'SAME' padding."""
  b, h, wd, c = x.shape
  kh, kw, cin_g, cout = w.shape
  oh, ow = -(-h // stride), -(-wd // stride)
  pad_h = max((oh - 1) * stride + kh - h, 0)
  pad_w = max((ow - 1) * stride + kw - wd, 0)
  # XLA puts the smaller half of an odd padding before the input.
  xp = np.pad(x, ((0, 0), (pad_h // 2, pad_h - pad_h // 2),
                  (pad_w // 2, pad_w - pad_w // 2), (0, 0)))
  out = np.zeros((b, oh, ow, cout))
  cout_g = cout // groups
  for g in range(groups):
    xs = xp[..., g * cin_g:(g + 1) * cin_g]
    ws = w[..., g * cout_g:(g + 1) * cout_g]
    for i in range(oh):
      for j in range(ow):
        patch = xs[:, i * stride:i * stride + kh, j * stride:j * stride + kw]
        out[:, i, j, g * cout_g:(g + 1) * cout_g] = np.einsum(
            'bhwc,hwco->bo', patch, ws)
  return out


def _randomize(params, seed):
  """Replaces every leaf by N(0, 1) noise (gains/biases too, to test them)."""
  leaves, treedef = jax.tree.flatten(params)
  rng = np.random.RandomState(seed)
  return jax.tree.unflatten(treedef, [
      jnp.asarray(rng.randn(*l.shape), l.dtype) for l in leaves])


def test_wsconv_matches_numpy_grouped_strided():
  conv = hk.without_apply_rng(hk.transform(
      lambda x: layers.WSConv2D(6, 3, stride=2, feature_group_count=2,
                                name='conv')(x)))
  x = np.random.RandomState(0).randn(2, 7, 6, 4).astype(np.float32)
  params = jax.jit(conv.init)(jax.random.PRNGKey(0), x)
  assert jax.tree.map(jnp.shape, params) == {
      'conv': {'w': (3, 3, 2, 6), 'gain': (6,), 'bias': (6,)}}
  params = _randomize(params, 1)
  p = jax.tree.map(np.asarray, params['conv'])
  want = _np_conv_same(x.astype(np.float64),
                       _np_standardize(p['w'].astype(np.float64), p['gain']),
                       stride=2, groups=2) + p['bias']
  got = jax.jit(conv.apply)(params, x)
  assert got.shape == (2, 4, 3, 6)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_standardized_kernel_has_unit_norm_per_output():
  # With gain 1, each filter has zero mean and sum of squares 1, so a
  # unit-variance input gives a unit-variance output.
  w = jax.random.normal(jax.random.PRNGKey(0), (3, 3, 16, 8)) * 3.0 + 0.7
  w_hat = np.asarray(layers.standardize_weight(w, jnp.ones((8,))))
  np.testing.assert_allclose(w_hat.mean(axis=(0, 1, 2)), 0.0, atol=1e-6)
  np.testing.assert_allclose((w_hat**2).sum(axis=(0, 1, 2)), 1.0, rtol=1e-5)


def test_eps_is_a_floor_not_an_additive_term():
  # Filter 0 has N * var = 144 * 1e-8 < 1e-4 (floored); filter 1 is far above
  # the floor and must be untouched by eps (an additive eps would shrink it).
  rng = np.random.RandomState(0)
  w = np.stack([rng.randn(3, 3, 16) * 1e-4, rng.randn(3, 3, 16) * 1e-3],
               axis=-1).astype(np.float32)
  w_hat = np.asarray(layers.standardize_weight(jnp.asarray(w), jnp.ones((2,))))
  centred = w - w.mean(axis=(0, 1, 2), keepdims=True)
  np.testing.assert_allclose(w_hat[..., 0], centred[..., 0] / math.sqrt(1e-4),
                             rtol=1e-4)
  n_var = 144 * centred[..., 1].var()
  assert n_var > 1e-4
  np.testing.assert_allclose(w_hat[..., 1], centred[..., 1] / math.sqrt(n_var),
                             rtol=1e-4)


def test_wsconv_default_init_is_untruncated_fan_in_normal():
  init = hk.transform(lambda x: layers.WSConv2D(64, 3, name='c')(x)).init
  params = jax.jit(init)(jax.random.PRNGKey(0), jnp.zeros((1, 4, 4, 64)))['c']
  w = np.asarray(params['w'])
  std = 1.0 / math.sqrt(3 * 3 * 64)
  assert np.std(w) == pytest.approx(std, rel=0.02)
  # A truncated normal (Haiku's default) never exceeds 2 std.
  assert np.abs(w).max() > 3.0 * std
  np.testing.assert_array_equal(params['gain'], 1.0)
  np.testing.assert_array_equal(params['bias'], 0.0)


def test_wsconv_keeps_bfloat16_and_rejects_bad_inputs():
  fn = hk.transform(lambda x: layers.WSConv2D(8, 3, feature_group_count=2)(x))
  x = jax.ShapeDtypeStruct((2, 8, 8, 4), jnp.bfloat16)
  params = jax.eval_shape(fn.init, jax.random.PRNGKey(0), x)
  assert all(l.dtype == jnp.bfloat16 for l in jax.tree.leaves(params))
  assert jax.eval_shape(fn.apply, params, None, x).dtype == jnp.bfloat16
  with pytest.raises(ValueError, match='rank 4'):
    jax.eval_shape(fn.init, jax.random.PRNGKey(0),
                   jax.ShapeDtypeStruct((8, 8, 4), jnp.float32))
  with pytest.raises(ValueError, match='not divisible by feature_group_count'):
    jax.eval_shape(fn.init, jax.random.PRNGKey(0),
                   jax.ShapeDtypeStruct((1, 8, 8, 3), jnp.float32))


def test_squeeze_excite_matches_numpy_and_official_names():
  se = hk.without_apply_rng(hk.transform(
      lambda x: layers.SqueezeExcite(6, 6, se_ratio=0.5)(x)))
  x = np.random.RandomState(0).randn(3, 5, 4, 6).astype(np.float32)
  params = jax.jit(se.init)(jax.random.PRNGKey(0), x)
  assert jax.tree.map(jnp.shape, params) == {
      'squeeze_excite/~/linear': {'w': (6, 3), 'b': (3,)},
      'squeeze_excite/~/linear_1': {'w': (3, 6), 'b': (6,)}}
  params = _randomize(params, 2)
  p0 = jax.tree.map(np.asarray, params['squeeze_excite/~/linear'])
  p1 = jax.tree.map(np.asarray, params['squeeze_excite/~/linear_1'])
  h = np.maximum(x.mean(axis=(1, 2)) @ p0['w'] + p0['b'], 0.0)  # plain ReLU
  want = 1.0 / (1.0 + np.exp(-(h @ p1['w'] + p1['b'])))
  got = jax.jit(se.apply)(params, x)
  assert got.shape == (3, 1, 1, 6)
  np.testing.assert_allclose(got[:, 0, 0], want, rtol=1e-5, atol=1e-6)


def test_squeeze_excite_hidden_width_rules():
  def hidden(**kwargs):
    fn = hk.transform(lambda x: layers.SqueezeExcite(**kwargs)(x))
    p = jax.eval_shape(fn.init, jax.random.PRNGKey(0),
                       jax.ShapeDtypeStruct((1, 2, 2, kwargs['in_ch']),
                                            jnp.float32))
    return p['squeeze_excite/~/linear']['w'].shape[1]
  assert hidden(in_ch=10, out_ch=4, se_ratio=0.25) == 2  # int(2.5)
  assert hidden(in_ch=3, out_ch=4, se_ratio=0.1) == 1  # max(1, 0)
  assert hidden(in_ch=8, out_ch=4, hidden_ch=5) == 5


def test_stochdepth_identity_at_eval_and_per_example_mask():
  def fn(x, is_training, rate=0.3, scale=False):
    return layers.StochDepth(rate, scale_by_keep=scale)(x, is_training)

  sd = hk.transform(fn)
  x = jnp.asarray(np.random.RandomState(0).rand(4000, 2, 2, 3) + 1.0,
                  jnp.float32)
  # Evaluation: identity, and no rng needed at all.
  np.testing.assert_array_equal(sd.apply({}, None, x, False), x)
  out = np.asarray(sd.apply({}, jax.random.PRNGKey(1), x, True))
  kept = np.all(out == np.asarray(x), axis=(1, 2, 3))
  dropped = np.all(out == 0.0, axis=(1, 2, 3))
  # Every example is either untouched (no 1/keep rescale) or zeroed entirely.
  assert np.all(kept | dropped)
  # Drop fraction ~ 0.3 (binomial std over 4000 examples is 0.007).
  assert dropped.mean() == pytest.approx(0.3, abs=0.03)
  scaled = np.asarray(sd.apply({}, jax.random.PRNGKey(1), x, True, 0.3, True))
  np.testing.assert_allclose(scaled[kept], np.asarray(x)[kept] / 0.7,
                             rtol=1e-6)
  with pytest.raises(ValueError, match='drop_rate'):
    hk.transform(lambda: layers.StochDepth(1.0)).init(None)


def test_signal_metrics_matches_numpy():
  x = np.random.RandomState(0).randn(2, 3, 4, 5).astype(np.float32) + 0.5
  got = layers.signal_metrics(jnp.asarray(x), 7)
  assert set(got) == {'avg_sq_mean_7', 'avg_var_7'}
  flat = x.reshape(-1, 5).astype(np.float64)
  assert float(got['avg_sq_mean_7']) == pytest.approx(
      np.mean(flat.mean(axis=0)**2), rel=1e-5)
  assert float(got['avg_var_7']) == pytest.approx(
      np.mean(flat.var(axis=0)), rel=1e-5)


def test_apply_blocks_records_metrics_and_stage_outputs():
  calls = []

  def make_block(scale):
    def block(x, is_training):
      calls.append(is_training)
      return x * scale, jnp.asarray(scale ** 2)
    return block

  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 3, 3, 4)), jnp.float32)
  block_list = [make_block(s) for s in (2.0, 3.0, 0.5)]
  outputs = {}
  out = blocks.apply_blocks(block_list, x, False, outputs, return_metrics=True, stage_ends=(1, 2))
  np.testing.assert_allclose(out, x * 3.0, rtol=1e-6)
  assert calls == [False] * 3
  # Metric i + 1 is taken after block i; the input is metric 0.
  for i, scale in enumerate((1.0, 2.0, 6.0, 3.0)):
    np.testing.assert_allclose(outputs[f'avg_var_{i}'],
                               np.mean(np.var(np.asarray(x) * scale, axis=(0, 1, 2))), rtol=1e-5)
  assert [float(outputs[f'res_avg_var_{i}']) for i in range(3)] == [4.0, 9.0, 0.25]
  np.testing.assert_allclose(outputs['stage_0'], x * 6.0, rtol=1e-6)
  np.testing.assert_allclose(outputs['stage_1'], x * 3.0, rtol=1e-6)

  quiet = {}
  blocks.apply_blocks(block_list, x, True, quiet, return_metrics=False)
  assert quiet == {}


def test_merge_nf_residual_formula_metric_and_parameter_name():
  rng = np.random.default_rng(0)
  branch = jnp.asarray(rng.normal(size=(2, 3, 3, 4)), jnp.float32)
  shortcut = jnp.asarray(rng.normal(size=(2, 3, 3, 4)), jnp.float32)

  def f(b, s):
    return layers.merge_nf_residual(b, s, 0.2, False,
                                    skip_gain_init=hk.initializers.Constant(1.5))

  fwd = hk.transform(f)
  params = fwd.init(None, branch, shortcut)
  assert jax.tree.map(jnp.shape, params) == {'~': {'skip_gain': ()}}
  out, res_avg_var = fwd.apply(params, None, branch, shortcut)
  np.testing.assert_allclose(out, shortcut + 0.2 * 1.5 * branch, rtol=1e-6)
  np.testing.assert_allclose(res_avg_var, np.mean(np.var(np.asarray(branch), axis=(0, 1, 2))),
                             rtol=1e-6)
  # SkipInit: the zero-initialised gain makes the block the identity on its skip path.
  zero = hk.transform(lambda b, s: layers.merge_nf_residual(b, s, 0.2, False))
  out0, _ = zero.apply(zero.init(None, branch, shortcut), None, branch, shortcut)
  np.testing.assert_array_equal(out0, shortcut)
