"""Tests for nfnets.nfnet: structure, parameter tree, shapes, train/eval paths."""

import functools
import math

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nfnets.models import nfnet
from nfnets.models.nfnet import NFNet, NFNetVariant

TINY = NFNetVariant(width=(16, 32, 64, 64), depth=(1, 1, 1, 1), group_width=8,
                    train_imsize=32, test_imsize=32, drop_rate=0.2)


def _zeros_creator(next_creator, shape, dtype, init, context):
  del init, context
  return next_creator(shape, dtype, jnp.zeros)


def _trace(variant, px=64, batch=2, channels=3, num_classes=1000, **kwargs):
  """Parameter and output shapes from ONE eval_shape of init (nothing runs).

  Haiku's init runs the forward pass, so the outputs are captured from it;
  zero initialisers make the trace cheaper (only shapes are needed).
  """
  captured = {}

  def forward(x):
    with hk.custom_creator(_zeros_creator):
      captured['out'] = NFNet(num_classes, variant=variant, **kwargs)(
          x, is_training=False)

  def init_and_outputs(rng, x):
    params = hk.transform(forward).init(rng, x)
    return params, captured.pop('out')

  return jax.eval_shape(init_and_outputs, jax.random.PRNGKey(0),
                        jax.ShapeDtypeStruct((batch, px, px, channels),
                                             jnp.float32))


@functools.lru_cache(maxsize=None)
def _trace_variant(name):
  """Cached: F0's trace serves both the shape and the parameter-tree tests."""
  return _trace(name, px=64, batch=2)


def _f0_params():
  return _trace_variant('F0')[0]


def _num_params(params):
  return sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params))


def test_variant_table():
  expected = {  # name: (depth multiple, train, test, RA, dropout), Table 1
      'F0': (1, 192, 256, '405', 0.2), 'F1': (2, 224, 320, '410', 0.3),
      'F2': (3, 256, 352, '410', 0.4), 'F3': (4, 320, 416, '415', 0.4),
      'F4': (5, 384, 512, '415', 0.5), 'F5': (6, 416, 544, '415', 0.5),
      'F6': (7, 448, 576, '415', 0.5), 'F7': (8, 480, 608, '415', 0.5)}
  assert list(NFNet.VARIANTS) == [
      f'F{i}{s}' for i in range(8) for s in ('', '+')]
  for name, (n, train, test, ra, drop) in expected.items():
    for suffix, width in (('', (256, 512, 1536, 1536)),
                          ('+', (384, 768, 2048, 2048))):
      v = NFNet.VARIANTS[name + suffix]
      assert v.width == width and v.depth == (n, 2 * n, 6 * n, 3 * n)
      assert (v.train_imsize, v.test_imsize, v.ra_level, v.drop_rate) == (
          train, test, ra, drop)
      assert v.group_width == (128,) * 4 and v.expansion == (0.5,) * 4


@pytest.mark.parametrize('name', list(nfnet.VARIANTS))
def test_every_variant_shapes(name):
  v = nfnet.VARIANTS[name]
  params, out = _trace_variant(name)
  w = v.width
  assert out['stem'].shape == (2, 16, 16, w[0] // 2)
  assert out['stage_0'].shape == (2, 16, 16, w[0])
  assert out['stage_1'].shape == (2, 8, 8, w[1])
  assert out['stage_2'].shape == (2, 4, 4, w[2])
  assert out['stage_3'].shape == (2, 2, 2, w[3])
  assert out['pool'].shape == (2, 2 * w[3])
  assert out['logits'].shape == (2, 1000)
  # Leaves: WS convs (4 stem + 4 per block + 4 shortcuts + final) x 3, SE
  # 2 linears x 2 and skip_gain per block, classifier w and b.
  n = sum(v.depth)
  assert len(jax.tree.leaves(params)) == 3 * (4 + 4 * n + 4 + 1) + 5 * n + 2
  assert len(params) == 4 + 7 * n + 4 + 2  # module paths


def _expected_f0_tree():
  """The official F0 parameter tree (reference facts, section 8.4)."""
  def conv(kh, cin, cout):
    return {'w': (kh, kh, cin, cout), 'gain': (cout,), 'bias': (cout,)}
  tree = {
      'NFNet/~/stem_conv0': conv(3, 3, 16),
      'NFNet/~/stem_conv1': conv(3, 16, 32),
      'NFNet/~/stem_conv2': conv(3, 32, 64),
      'NFNet/~/stem_conv3': conv(3, 64, 128),
      'NFNet/~/final_conv': conv(1, 1536, 3072),
      'NFNet/~/linear': {'w': (3072, 1000), 'b': (1000,)},
  }
  stages = [(256, 128), (512, 256), (1536, 768), (1536, 768)]  # (out, mid)
  depths = [1, 2, 6, 3]
  k, in_ch = 0, 128
  for (out, mid), depth in zip(stages, depths):
    for b in range(depth):
      p = 'NFNet/~/nf_block' + (f'_{k}' if k else '')
      if b == 0:
        tree[f'{p}/~/conv_shortcut'] = conv(1, in_ch, out)
      tree[f'{p}/~/conv0'] = conv(1, in_ch, mid)
      tree[f'{p}/~/conv1'] = conv(3, 128, mid)  # grouped: 128 per group
      tree[f'{p}/~/conv1b'] = conv(3, 128, mid)
      tree[f'{p}/~/conv2'] = conv(1, mid, out)
      tree[f'{p}/~/squeeze_excite/~/linear'] = {'w': (out, out // 2),
                                                'b': (out // 2,)}
      tree[f'{p}/~/squeeze_excite/~/linear_1'] = {'w': (out // 2, out),
                                                  'b': (out,)}
      tree[p] = {'skip_gain': ()}
      k, in_ch = k + 1, out
  return tree


def test_f0_parameter_tree_is_official():
  got = jax.tree.map(lambda p: tuple(p.shape), _f0_params())
  got = {m: dict(p) for m, p in got.items()}
  assert got == _expected_f0_tree()
  assert len(jax.tree.leaves(_f0_params())) == 233
  assert _num_params(_f0_params()) == 71_489_284


def _build(**kwargs):
  """Constructs an NFNet (without calling it) to inspect its blocks."""
  box = {}

  def make():
    box['net'] = NFNet(1000, **kwargs)

  hk.transform(make).init(None)
  return box['net']


def test_betas_stochdepth_rates_and_shortcuts():
  net = _build(variant='F0', stochdepth_rate=0.25)
  betas = [b.beta for b in net.blocks]
  official = [1.0, 0.980581, 0.980581, 0.96225, 0.980581, 0.96225, 0.944911,
              0.928477, 0.912871, 0.898027, 0.980581, 0.96225]
  np.testing.assert_allclose(betas, official, atol=1e-6)
  # Independent closed form: a stage's first block (projection shortcut)
  # restarts the variance at 1, and every block since then added alpha^2, so
  # block i sees Var = 1 + (i - last first-of-stage block before i) alpha^2.
  firsts = [0, 1, 3, 9]
  want = [1.0] + [1.0 / math.sqrt(1.0 + (i - max(f for f in firsts if f < i))
                                  * 0.2**2) for i in range(1, 12)]
  np.testing.assert_allclose(betas, want, rtol=1e-12)
  rates = [b.stoch_depth.drop_rate if b.use_stochdepth else 0.0
           for b in net.blocks]
  np.testing.assert_allclose(rates, [0.25 * i / 12 for i in range(12)])
  assert [b.stride for b in net.blocks] == [1, 2, 1, 2, 1, 1, 1, 1, 1, 2, 1, 1]
  assert [b.use_projection for b in net.blocks] == [
      True, True, False, True, False, False, False, False, False, True, False,
      False]
  assert [b.groups for b in net.blocks[::4]] == [1, 6, 6]


def _numpy_params(shapes, seed=0, skip_gain=0.7):
  """Random parameters built in numpy from eval_shape'd shapes.

  Cheaper than jitting init (compiling the random initialisers costs tens of
  seconds on this CPU). WS convs standardise `w`, so its scale is irrelevant.
  """
  rng = np.random.RandomState(seed)
  out = {}
  for module, leaves in shapes.items():
    out[module] = {}
    for name, s in leaves.items():
      if name == 'skip_gain':
        value = np.full(s.shape, skip_gain)  # 0 (init) switches branches off
      elif name == 'gain':
        value = 1.0 + 0.1 * rng.randn(*s.shape)
      elif name in ('bias', 'b'):
        value = 0.1 * rng.randn(*s.shape)
      else:
        value = rng.randn(*s.shape) / math.sqrt(np.prod(s.shape[:-1]))
      out[module][name] = jnp.asarray(value, s.dtype)
  return out


@functools.lru_cache(maxsize=None)
def _tiny():
  fwd = hk.transform(
      lambda x, is_training: NFNet(10, variant=TINY, stochdepth_rate=0.5)(
          x, is_training=is_training, return_metrics=True))
  x = jnp.asarray(np.random.RandomState(0).randn(4, 32, 32, 3), jnp.float32)
  shapes = jax.eval_shape(lambda r, x: fwd.init(r, x, True),
                          jax.random.PRNGKey(0), x)
  return fwd, shapes, x


@functools.lru_cache(maxsize=None)
def _tiny_train_step():
  fwd, _, x = _tiny()
  labels = jnp.arange(4) % 10

  def loss_fn(p, rng):
    out = fwd.apply(p, rng, x, True)
    logp = jax.nn.log_softmax(out['logits'])
    return -jnp.mean(logp[jnp.arange(4), labels]), out

  return jax.jit(jax.value_and_grad(loss_fn, has_aux=True))


def test_tiny_forward_backward():
  _, shapes, _ = _tiny()
  step = _tiny_train_step()
  params = _numpy_params(shapes)
  (loss, out), grads = step(params, jax.random.PRNGKey(1))
  assert np.isfinite(float(loss))
  assert out['logits'].shape == (4, 10) and out['pool'].shape == (4, 128)
  assert {f'res_avg_var_{i}' for i in range(4)} <= set(out)
  assert {f'avg_var_{i}' for i in range(5)} <= set(out)
  assert {f'avg_sq_mean_{i}' for i in range(5)} <= set(out)
  assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))
  for module in ('NFNet/~/stem_conv0', 'NFNet/~/nf_block_3/~/conv1b',
                 'NFNet/~/linear'):
    assert float(jnp.abs(grads[module]['w']).sum()) > 0.0, module
  # Training is stochastic (dropout and stochastic depth use the rng).
  (_, out2), _ = step(params, jax.random.PRNGKey(2))
  assert not np.allclose(out['logits'], out2['logits'])


def test_zero_skip_gain_switches_branches_off():
  # SkipInit: with skip_gain = 0 (its init) each block is its shortcut, so the
  # branch weights get exactly zero gradient while skip_gain itself learns.
  _, shapes, _ = _tiny()
  params = _numpy_params(shapes, skip_gain=0.0)
  _, grads = _tiny_train_step()(params, jax.random.PRNGKey(1))
  for k in ('', '_1', '_2', '_3'):
    block = f'NFNet/~/nf_block{k}'
    assert float(jnp.abs(grads[block + '/~/conv0']['w']).max()) == 0.0
    assert float(jnp.abs(grads[block]['skip_gain'])) > 0.0
    # The projection shortcut is still on the gradient path.
    assert float(jnp.abs(grads[block + '/~/conv_shortcut']['w']).max()) > 0.0


def test_eval_is_deterministic_and_ignores_rng():
  fwd, shapes, x = _tiny()
  params = _numpy_params(shapes)
  apply = jax.jit(fwd.apply, static_argnums=3)
  a = apply(params, jax.random.PRNGKey(1), x, False)
  b = apply(params, jax.random.PRNGKey(2), x, False)
  np.testing.assert_array_equal(a['logits'], b['logits'])
  assert np.all(np.isfinite(a['logits']))
  # Evaluation draws no randomness: apply works without any rng.
  out = jax.eval_shape(lambda p, x: fwd.apply(p, None, x, False), params, x)
  assert out['logits'].shape == (4, 10)
  with pytest.raises(ValueError, match='PRNGKey'):  # training needs one
    jax.eval_shape(lambda p, x: fwd.apply(p, None, x, True), params, x)


def test_options_and_dtypes():
  # Dict variant == dataclass variant; options change the tree as expected.
  a, _ = _trace(dict(width=[16, 32, 64, 64], depth=[1, 1, 1, 1],
                     group_width=8), px=32)
  b, out = _trace(TINY, px=32, use_two_convs=False, final_conv_mult=None,
                  final_conv_ch=40, width=2.0)
  assert set(a) == set(_trace(TINY, px=32)[0])
  assert 'NFNet/~/nf_block/~/conv1b' not in b
  assert out['pool'].shape == (2, 40)
  assert b['NFNet/~/nf_block/~/conv2']['w'].shape == (1, 1, 16, 32)
  # Grayscale input: the stem takes any channel count.
  gray, _ = _trace(TINY, px=32, channels=1)
  assert gray['NFNet/~/stem_conv0']['w'].shape == (3, 3, 1, 16)
  fwd = hk.transform(lambda x: NFNet(10, variant=TINY)(x, is_training=False))
  x = jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.bfloat16)
  params = jax.eval_shape(fwd.init, jax.random.PRNGKey(0), x)
  assert jax.eval_shape(fwd.apply, params, None, x)['logits'].dtype == (
      jnp.bfloat16)


def test_bad_inputs_have_clear_messages():
  with pytest.raises(ValueError, match=r"Unknown NFNet variant 'F9'.*'F0'"):
    _build(variant='F9')
  with pytest.raises(ValueError, match=r'Stage 0.*zero groups.*group_width'):
    _build(variant=NFNetVariant(width=(16, 32, 64, 64), depth=(1, 1, 1, 1),
                                group_width=16))
  with pytest.raises(ValueError, match=r'Stage 0.*raise `width`.*<= 51'):
    _build(variant='F0', width=0.4)  # 0.5 * int(256 * 0.4) = 51 < 128
  with pytest.raises(ValueError, match='unknown fields'):
    _build(variant=dict(width=(16,) * 4, depth=(1,) * 4, widht=3))
  with pytest.raises(ValueError, match='4 values'):
    NFNetVariant(width=(16, 32, 64), depth=(1, 1, 1))
  with pytest.raises(ValueError, match='Unknown activation'):
    _build(variant=TINY, activation='swish')
  with pytest.raises(ValueError, match='rank 4'):
    fwd = hk.transform(lambda x: NFNet(10, variant=TINY)(x))
    jax.eval_shape(fwd.init, jax.random.PRNGKey(0),
                   jax.ShapeDtypeStruct((32, 32, 3), jnp.float32))
