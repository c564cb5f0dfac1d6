"""Tests for nfnets/training.py on 8 virtual CPU devices with a tiny Haiku model.

Compilations are the cost here (~10 s each on the shared 2-core CPU), so one module-scoped
train step (8 devices, label smoothing 0.1, always fed MixUp-style batches) is shared by
the tests that need no other configuration; the plain (unmixed) path is compiled by the
bf16 and diagnosis steps.
"""

import haiku as hk
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from nfnets import agc
from nfnets import optim
from nfnets import training

NUM_CLASSES = 10
IMAGE_SHAPE = (8, 8, 3)
GLOBAL_BATCH = 16
EMA_DECAY = 0.99
# 8-way pmean vs a 1-device mean differ only by float32 summation order.
RTOL, ATOL = 1e-5, 1e-6


class _TinyNet(hk.Module):
  """Conv + linear with one float state, linear in the batch mean so replicas can average it."""

  def __init__(self, name='TinyNet'):
    super().__init__(name=name)
    # Built in __init__, like the real models, so paths read 'TinyNet/~/linear/w'.
    # Numpy-drawn constant inits: jax.random.normal alone takes ~15 s to compile on this CPU.
    rng = np.random.default_rng(0)
    conv_w = rng.normal(size=(3, 3, IMAGE_SHAPE[-1], 8)).astype(np.float32) / np.sqrt(27)
    linear_w = rng.normal(size=(8, NUM_CLASSES)).astype(np.float32) / np.sqrt(8)
    self.conv = hk.Conv2D(8, 3, stride=2, w_init=hk.initializers.Constant(conv_w), name='conv')
    self.linear = hk.Linear(NUM_CLASSES, w_init=hk.initializers.Constant(linear_w), name='linear')

  def __call__(self, images, is_training):
    x = jax.nn.relu(self.conv(images))
    pool = jnp.mean(x, axis=(1, 2))
    running = hk.get_state('running_mean', [], dtype=images.dtype, init=jnp.zeros)
    if is_training:
      hk.set_state('running_mean', 0.9 * running + 0.1 * jnp.mean(images))
    return {'logits': self.linear(pool), 'pool': pool}


def _forward():
  return hk.transform_with_state(
      lambda images, is_training: _TinyNet(name='TinyNet')(images, is_training))


def _train_config(**overrides):
  config = ml_collections.ConfigDict(dict(label_smoothing=0.1, bfloat16=False, sam_rho=0.0,
                                          sam_fraction=0.2, skip_nonfinite=False))
  config.update(overrides)
  return config


SCHEDULE = optax.linear_schedule(0.2, 0.1, 10)
FORWARD = _forward()
# Loose AGC so a few steps visibly train; it is here to exercise the agc metrics.
OPTIMIZER = optax.chain(agc.adaptive_grad_clip(1.0), optax.sgd(SCHEDULE, momentum=0.9))


def _batch(num_devices=8, seed=0, mix=False):
  rng = np.random.default_rng(seed)
  images = rng.normal(size=(GLOBAL_BATCH,) + IMAGE_SHAPE).astype(np.float32)
  batch = {'images': images, 'labels': rng.integers(0, NUM_CLASSES, GLOBAL_BATCH).astype(np.int32)}
  if mix:
    batch['mix_labels'] = rng.integers(0, NUM_CLASSES, GLOBAL_BATCH).astype(np.int32)
    batch['mix_ratio'] = rng.uniform(size=GLOBAL_BATCH).astype(np.float32)
  return {k: v.reshape((num_devices, -1) + v.shape[1:]) for k, v in batch.items()}


def _flat(batch):
  return {k: v.reshape((-1,) + v.shape[2:]) for k, v in batch.items()}


def _np_log_softmax(logits):
  logits = logits.astype(np.float64)
  shifted = logits - logits.max(-1, keepdims=True)
  return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def _assert_trees_close(a, b, rtol=RTOL, atol=ATOL):
  jax.tree.map(lambda x, y: np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol, atol),
               a, b)


@pytest.fixture(scope='module')
def ts0():
  return training.init_train_state(FORWARD, OPTIMIZER, 0, IMAGE_SHAPE)


@pytest.fixture(scope='module')
def base_step():
  return training.make_train_step(FORWARD, OPTIMIZER, SCHEDULE, _train_config(), NUM_CLASSES,
                                  ema_decay=EMA_DECAY)


def test_init_and_replicate_round_trip(ts0):
  assert ts0.step.dtype == jnp.int32 and int(ts0.step) == 0
  assert ts0.rng.dtype == jnp.uint32
  replicated = training.replicate(ts0)
  assert replicated.params['TinyNet/~/conv']['w'].shape[0] == jax.local_device_count()
  _assert_trees_close(training.unreplicate(replicated), ts0, 0, 0)
  with pytest.raises(ValueError, match='image_shape'):
    training.init_train_state(FORWARD, OPTIMIZER, 0, (8, 3))


def test_steps_reduce_loss_and_ema_follows_warmup(ts0, base_step):
  batch = _batch(mix=True)
  ts = training.replicate(ts0)
  history = []
  for k in range(4):
    ts, metrics = base_step(ts, batch)
    metrics = training.unreplicate(metrics)
    history.append(metrics)
    np.testing.assert_allclose(metrics['learning_rate'], SCHEDULE(k), rtol=1e-6)
    if k == 0:
      # tf1_ema at index 0: decay = min(0.99, (1+0)/(10+0)) = 0.1 of the old value.
      p1, s1 = training.unreplicate((ts.params, ts.state))
      ema_p, ema_s = training.unreplicate((ts.ema_params, ts.ema_state))
      _assert_trees_close(ema_p, jax.tree.map(lambda a, b: 0.1 * a + 0.9 * b, ts0.params, p1))
      _assert_trees_close(ema_s, jax.tree.map(lambda a, b: 0.1 * a + 0.9 * b, ts0.state, s1))
      snapshot = jax.tree.map(np.copy, p1)
  assert int(training.unreplicate(ts.step)) == 4
  # unreplicate hands back host copies: still intact after the state they came from was
  # donated to three more steps.
  assert all(isinstance(x, np.ndarray) for x in jax.tree.leaves(p1))
  _assert_trees_close(p1, snapshot, 0, 0)
  assert history[-1]['loss'] < history[0]['loss'] - 0.05, [float(m['loss']) for m in history]
  for m in history:
    assert m['finite'] == 1.0 and m['skipped'] == 0.0
    assert m['grad_norm'] > 0 and m['update_norm'] > 0 and m['param_norm'] > 0
    assert 0.0 <= m['agc/fraction_clipped'] <= 1.0
    assert all(v.dtype == jnp.float32 for v in m.values())


def test_eight_devices_match_one_device_and_numpy_loss(ts0, base_step):
  one_step = training.make_train_step(FORWARD, OPTIMIZER, SCHEDULE, _train_config(), NUM_CLASSES,
                                      ema_decay=EMA_DECAY, devices=jax.devices()[:1])
  ts8, ts1 = training.replicate(ts0), training.replicate(ts0, jax.devices()[:1])
  for seed in (1, 2):
    ts8, m8 = base_step(ts8, _batch(8, seed, mix=True))
    ts1, m1 = one_step(ts1, _batch(1, seed, mix=True))
    np.testing.assert_allclose(m8['loss'][0], m1['loss'][0], RTOL, ATOL)
    if seed == 1:
      first_metrics = training.unreplicate(m8)
  assert ts1.params['TinyNet/~/linear']['w'].shape[0] == 1
  _assert_trees_close(training.unreplicate(ts8), training.unreplicate(ts1))

  # The first step's loss is the mixed, smoothed cross-entropy at the initial params.
  flat = _flat(_batch(8, 1, mix=True))
  outputs, _ = FORWARD.apply(ts0.params, ts0.state, None, flat['images'], is_training=True)
  log_p = _np_log_softmax(np.asarray(outputs['logits']))
  eye = np.eye(NUM_CLASSES)
  ratio = flat['mix_ratio'][:, None].astype(np.float64)
  y = ratio * eye[flat['labels']] + (1 - ratio) * eye[flat['mix_labels']]
  y = y * 0.9 + 0.1 / NUM_CLASSES
  np.testing.assert_allclose(first_metrics['loss'], np.mean(-np.sum(y * log_p, axis=-1)),
                             rtol=1e-5)
  # Accuracies are against the unmixed labels.
  order = np.argsort(-log_p, axis=-1)
  top1 = np.mean(order[:, 0] == flat['labels'])
  top5 = np.mean(np.any(order[:, :5] == flat['labels'][:, None], axis=-1))
  np.testing.assert_allclose(first_metrics['top_1_acc'], top1, atol=1e-6)
  np.testing.assert_allclose(first_metrics['top_5_acc'], top5, atol=1e-6)


def test_eval_counts_ignore_padding(ts0):
  eval_step = training.make_eval_step(FORWARD, NUM_CLASSES)
  batch = _batch(seed=4)
  mask = np.ones(GLOBAL_BATCH, np.float32)
  mask[-5:] = 0.0
  batch['mask'] = mask.reshape(8, -1)
  # NaN padding images: they must not leak into the sums.
  batch['images'].reshape((GLOBAL_BATCH, -1))[-5:] = np.nan
  params, state = training.replicate((ts0.params, ts0.state))
  sums = training.unreplicate(eval_step(params, state, batch))
  flat = _flat(batch)
  valid = mask > 0
  outputs, _ = FORWARD.apply(ts0.params, ts0.state, None, flat['images'][valid],
                             is_training=False)
  log_p = _np_log_softmax(np.asarray(outputs['logits']))
  labels = flat['labels'][valid]
  order = np.argsort(-log_p, axis=-1)
  assert sums['count'] == 11.0
  assert sums['top_1_correct'] == np.sum(order[:, 0] == labels)
  assert sums['top_5_correct'] == np.sum(np.any(order[:, :5] == labels[:, None], axis=-1))
  # No label smoothing in eval.
  np.testing.assert_allclose(sums['loss_sum'], -np.sum(log_p[np.arange(11), labels]), rtol=1e-5)


def test_sam_differs_from_plain_step(ts0, base_step):
  sam_step = training.make_train_step(FORWARD, OPTIMIZER, SCHEDULE,
                                      _train_config(sam_rho=0.05, sam_fraction=0.5),
                                      NUM_CLASSES, ema_decay=EMA_DECAY)
  batch = _batch(seed=6, mix=True)
  ts_sam, m_sam = sam_step(training.replicate(ts0), batch)
  ts_plain, m_plain = base_step(training.replicate(ts0), batch)
  assert m_sam['finite'][0] == 1.0
  p_sam, p_plain = training.unreplicate((ts_sam.params, ts_plain.params))
  diffs = jax.tree.leaves(jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), p_sam, p_plain))
  assert max(diffs) > 1e-5
  # The reported SAM loss is at the perturbed (ascended) params, so it is the larger one.
  assert m_sam['loss'][0] > m_plain['loss'][0]
  with pytest.raises(ValueError, match='sam_fraction'):
    training.make_train_step(FORWARD, OPTIMIZER, SCHEDULE, _train_config(sam_fraction=0.0),
                             NUM_CLASSES)


def test_nonfinite_step_is_reported_and_named(ts0, base_step):
  batch = _batch(seed=5, mix=True)
  batch['images'][3, 0, 0, 0, 0] = np.nan
  ts, metrics = base_step(training.replicate(ts0), batch)
  # skip_nonfinite=False: the update goes through; the caller is expected to raise.
  assert metrics['finite'][0] == 0.0 and metrics['skipped'][0] == 0.0
  assert training.first_nonfinite(training.unreplicate(ts.params)) is not None
  grad_step = training.make_grad_step(FORWARD, _train_config(), NUM_CLASSES)
  plain = {k: batch[k] for k in ('images', 'labels')}
  diagnosis = training.unreplicate(grad_step(training.replicate(ts0), plain))
  assert set(diagnosis) == {'loss', 'grads'}
  assert training.first_nonfinite(diagnosis) == 'loss'
  with pytest.raises(ValueError, match='mix_ratio'):
    grad_step(training.replicate(ts0), {**plain, 'mix_labels': batch['mix_labels']})


def test_first_nonfinite_names_the_path():
  tree = {'params': {'x': np.array([np.nan])},
          'grads': {'TinyNet/~/conv': {'w': np.ones(3), 'b': np.array([0.0, np.inf])}},
          'loss': np.float32(1.0)}
  assert training.first_nonfinite(tree) == 'grads/TinyNet/~/conv/b'
  assert training.first_nonfinite({'loss': 1.0, 'count': np.array([1, 2])}) is None
  assert training.first_nonfinite([np.ones(2), np.array([np.nan], jnp.bfloat16)]) == '1'


def test_bf16_skip_nonfinite_with_official_optimizer():
  optimizer, schedule = optim.build_optimizer(optim.default_config(), batch_size=GLOBAL_BATCH,
                                              steps_per_epoch=10, total_steps=100)
  ts0 = training.init_train_state(FORWARD, optimizer, 1, IMAGE_SHAPE)
  bf16_step = training.make_train_step(FORWARD, optimizer, schedule,
                                       _train_config(bfloat16=True, skip_nonfinite=True),
                                       NUM_CLASSES)
  batch = _batch(seed=7)
  ts, metrics = bf16_step(training.replicate(ts0), batch)
  metrics = training.unreplicate(metrics)
  assert metrics['finite'] == 1.0 and metrics['skipped'] == 0.0
  assert 'agc/fraction_clipped' in metrics
  after_one = jax.device_get(training.unreplicate(ts))
  floats = jax.tree.leaves((after_one.params, after_one.state, after_one.ema_params,
                            after_one.ema_state))
  floats += [x for x in jax.tree.leaves(after_one.opt_state) if np.issubdtype(x.dtype, np.floating)]
  assert all(x.dtype == np.float32 for x in floats)
  # The bf16 forward at step 0 agrees with float32 to bf16 precision.
  flat = _flat(batch)
  outputs, _ = FORWARD.apply(ts0.params, ts0.state, None, flat['images'], is_training=True)
  y = np.eye(NUM_CLASSES)[flat['labels']] * 0.9 + 0.1 / NUM_CLASSES
  f32_loss = np.mean(-np.sum(y * _np_log_softmax(np.asarray(outputs['logits'])), axis=-1))
  np.testing.assert_allclose(metrics['loss'], f32_loss, rtol=2e-2)

  # A NaN on one device: everything is kept, only the step counter moves.
  batch['images'][5, 1, 2, 3, 0] = np.nan
  ts, metrics = bf16_step(ts, batch)
  metrics = training.unreplicate(metrics)
  assert metrics['finite'] == 0.0 and metrics['skipped'] == 1.0
  kept = training.unreplicate(ts)
  assert int(kept.step) == 2
  for name in ('params', 'state', 'opt_state', 'ema_params', 'ema_state'):
    _assert_trees_close(getattr(kept, name), getattr(after_one, name), 0, 0)
