"""Tests for nfnets/train/step.py on 8 virtual CPU devices with a tiny Haiku model.

Compilations are the cost here, so one module-scoped train step (8 devices, label smoothing
0.1, always fed MixUp-style batches) serves the tests that need no other configuration. Every
test feeds a step batches of one structure (another structure would compile another program).
The stateful TinyNet (a BatchNorm-like running mean) runs per device batch; the stateless one
(with dropout) per example, keyed by each example's place in the global batch.
"""

import dataclasses

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from nfnets.train import agc
from nfnets.train import mesh as mesh_lib
from nfnets.train import optim
from nfnets.train import state as state_lib
from nfnets.train import step as step_lib
from nfnets.train.options import OptimizerOptions, TrainOptions

NUM_CLASSES = 10
IMAGE_SHAPE = (8, 8, 3)
GLOBAL_BATCH = 16
EMA_DECAY = 0.99
# 8-way pmean vs a 1-device mean differ only by float32 summation order.
RTOL, ATOL = 1e-5, 1e-6


class _TinyNet(hk.Module):
  """Conv + linear (+ optional dropout) with one float state, linear in the batch mean."""

  def __init__(self, dropout=0.0, stateful=True, name='TinyNet'):
    super().__init__(name=name)
    self.stateful = stateful
    # Numpy-drawn constant inits: jax.random.normal alone takes seconds to compile on CPU.
    rng = np.random.default_rng(0)
    conv_w = rng.normal(size=(3, 3, IMAGE_SHAPE[-1], 8)).astype(np.float32) / np.sqrt(27)
    linear_w = rng.normal(size=(8, NUM_CLASSES)).astype(np.float32) / np.sqrt(8)
    self.conv = hk.Conv2D(8, 3, stride=2, w_init=hk.initializers.Constant(conv_w), name='conv')
    self.linear = hk.Linear(NUM_CLASSES, w_init=hk.initializers.Constant(linear_w), name='linear')
    self.dropout = dropout

  def __call__(self, images, is_training):
    x = jax.nn.relu(self.conv(images))
    pool = jnp.mean(x, axis=(1, 2))
    if is_training and self.dropout:
      pool = hk.dropout(hk.next_rng_key(), self.dropout, pool)
    if self.stateful:
      running = hk.get_state('running_mean', [], dtype=images.dtype, init=jnp.zeros)
      if is_training:
        hk.set_state('running_mean', 0.9 * running + 0.1 * jnp.mean(images))
    return {'logits': self.linear(pool), 'pool': pool}


def _forward(dropout=0.0, stateful=True):
  return hk.transform_with_state(
      lambda images, is_training: _TinyNet(dropout, stateful)(images, is_training))


def _mesh(num_devices=8):
  return mesh_lib.make_mesh(jax.devices()[:num_devices])


def _step(forward=None, optimizer=None, num_devices=8, per_example=None, train=None, **kwargs):
  """A train step; the stateless forward runs per example unless told otherwise."""
  if per_example is None:
    per_example = forward is not None
  return step_lib.make_train_step(
      forward or FORWARD, optimizer or OPTIMIZER, SCHEDULE, train or TRAIN, NUM_CLASSES,
      ema_decay=EMA_DECAY, mesh=_mesh(num_devices), per_example_keys=per_example, **kwargs)


SCHEDULE = optax.linear_schedule(0.2, 0.1, 10)
FORWARD = _forward()
# A clip tight enough that some (not all) units are rescaled at every step, so the 8-device
# test can tell clipping of the mean gradient from clipping of per-device gradients.
OPTIMIZER = optax.chain(agc.adaptive_grad_clip(0.3), optax.sgd(SCHEDULE, momentum=0.9))
TRAIN = TrainOptions(label_smoothing=0.1, bfloat16=False)


def _batch(seed=0, mix=False, global_batch=GLOBAL_BATCH):
  """A host batch (numpy, the whole global batch: one process)."""
  rng = np.random.default_rng(seed)
  images = rng.normal(size=(global_batch,) + IMAGE_SHAPE).astype(np.float32)
  batch = {'images': images, 'labels': rng.integers(0, NUM_CLASSES, global_batch).astype(np.int32)}
  if mix:
    batch['mix_labels'] = rng.integers(0, NUM_CLASSES, global_batch).astype(np.int32)
    batch['mix_ratio'] = rng.uniform(size=global_batch).astype(np.float32)
  return batch


def _on(batch, num_devices=8):
  return mesh_lib.global_batch(batch, _mesh(num_devices))


def _put(ts, num_devices=8):
  return mesh_lib.replicate(jax.device_get(ts), _mesh(num_devices))


host = mesh_lib.host_copy


def _np_log_softmax(logits):
  logits = logits.astype(np.float64)
  shifted = logits - logits.max(-1, keepdims=True)
  return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def _assert_trees_close(a, b, rtol=RTOL, atol=ATOL):
  jax.tree.map(lambda x, y: np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol, atol),
               a, b)


@pytest.fixture(scope='module')
def ts0():
  return state_lib.init_train_state(FORWARD, OPTIMIZER, 0, IMAGE_SHAPE)


@pytest.fixture(scope='module')
def base_step():
  return _step()


def test_steps_reduce_loss_and_ema_follows_warmup(ts0, base_step):
  batch = _on(_batch(mix=True))
  ts = _put(ts0)
  # The state is replicated global arrays: no device axis anywhere.
  assert ts.params['TinyNet/~/linear']['w'].shape == (8, NUM_CLASSES)
  history = []
  for k in range(4):
    ts, metrics = base_step(ts, batch)
    metrics = host(metrics)
    history.append(metrics)
    np.testing.assert_allclose(metrics['learning_rate'], SCHEDULE(k), rtol=1e-6)
    if k == 0:
      # tf1_ema at index 0: decay = min(0.99, (1+0)/(10+0)) = 0.1 of the old value.
      p1, s1 = host((ts.params, ts.state))
      ema_p, ema_s = host((ts.ema_params, ts.ema_state))
      _assert_trees_close(ema_p, jax.tree.map(lambda a, b: 0.1 * a + 0.9 * b, ts0.params, p1))
      _assert_trees_close(ema_s, jax.tree.map(lambda a, b: 0.1 * a + 0.9 * b, ts0.state, s1))
      snapshot = jax.tree.map(np.copy, p1)
  assert int(host(ts.step)) == 4
  # host_copy hands back host copies: still intact after the state they came from was
  # donated to three more steps.
  assert all(isinstance(x, np.ndarray) for x in jax.tree.leaves(p1))
  _assert_trees_close(p1, snapshot, 0, 0)
  assert history[-1]['loss'] < history[0]['loss'] - 0.05, [float(m['loss']) for m in history]
  for m in history:
    assert m['finite'] == 1.0 and m['skipped'] == 0.0 and m['stop_requested'] == 0.0
    assert m['grad_norm'] > 0 and m['update_norm'] > 0 and m['param_norm'] > 0
    assert 0 < m['agc/units_clipped'] < m['agc/units_total']
    assert all(v.dtype == np.float32 for v in m.values())


def test_a_host_flag_is_every_hosts_decision(ts0, base_step):
  # One process here: its flag, set on its devices' rows, comes back reduced over all devices.
  ts = _put(ts0)
  flags = base_step.host_flags(stop_requested=True)
  assert flags.shape == (8, len(step_lib.HOST_FLAGS))
  _, metrics = base_step(ts, _on(_batch(mix=True)), flags)
  metrics = host(metrics)
  assert metrics['stop_requested'] == 1.0 and metrics['save_due'] == 0.0


def test_eight_devices_match_one_device_and_numpy_loss(ts0, base_step):
  one_step = _step(num_devices=1)
  ts8, ts1 = _put(ts0), _put(ts0, 1)
  for seed in (1, 2):
    ts8, m8 = base_step(ts8, _on(_batch(seed, mix=True)))
    ts1, m1 = one_step(ts1, _on(_batch(seed, mix=True), 1))
    m8, m1 = host(m8), host(m1)
    np.testing.assert_allclose(m8['loss'], m1['loss'], RTOL, ATOL)
    # AGC rescaled some units: had it clipped each device's gradient before the mean, the
    # 8-device update would differ from the 1-device one below.
    assert m8['agc/units_clipped'] > 0
    np.testing.assert_array_equal(m8['agc/units_clipped'], m1['agc/units_clipped'])
    if seed == 1:
      first_metrics = m8
  _assert_trees_close(host(ts8), host(ts1))

  # The first step's loss is the mixed, smoothed cross-entropy at the initial params.
  flat = _batch(1, mix=True)
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
  eval_step = step_lib.make_eval_step(FORWARD, NUM_CLASSES, mesh=_mesh())
  batch = _batch(seed=4)
  mask = np.ones(GLOBAL_BATCH, np.float32)
  mask[-5:] = 0.0
  batch['mask'] = mask
  # NaN padding images: they must not leak into the sums.
  batch['images'][-5:] = np.nan
  params, state = _put((ts0.params, ts0.state))
  sums = host(eval_step(params, state, _on(batch)))
  valid = mask > 0
  outputs, _ = FORWARD.apply(ts0.params, ts0.state, None, batch['images'][valid],
                             is_training=False)
  log_p = _np_log_softmax(np.asarray(outputs['logits']))
  labels = batch['labels'][valid]
  order = np.argsort(-log_p, axis=-1)
  assert sums['count'] == 11.0
  assert sums['top_1_correct'] == np.sum(order[:, 0] == labels)
  assert sums['top_5_correct'] == np.sum(np.any(order[:, :5] == labels[:, None], axis=-1))
  # No label smoothing in eval.
  np.testing.assert_allclose(sums['loss_sum'], -np.sum(log_p[np.arange(11), labels]), rtol=1e-5)


def test_sam_ascends_on_exactly_the_first_fifth_of_the_device_batch(ts0):
  # The paper's setting: 20 % of each device's batch, rho 0.05. One device, 10 examples, so
  # the ascent uses examples 0 and 1 only.
  train = TrainOptions(label_smoothing=0.0, bfloat16=False, sam_rho=0.05, sam_fraction=0.2)
  sgd = optax.sgd(0.1)
  sam_step = step_lib.make_train_step(FORWARD, sgd, lambda _: 0.1, train, NUM_CLASSES,
                                      ema_decay=EMA_DECAY, mesh=_mesh(1),
                                      per_example_keys=False)
  ts = state_lib.init_train_state(FORWARD, sgd, 0, IMAGE_SHAPE)
  flat = _batch(seed=6, global_batch=10)
  new, metrics = sam_step(_put(ts, 1), _on(flat, 1))
  onehot = jax.nn.one_hot(flat['labels'], NUM_CLASSES)

  def loss(params, images, targets):
    out, _ = FORWARD.apply(params, ts.state, None, images, is_training=True)
    return jnp.mean(optax.losses.softmax_cross_entropy(out['logits'], targets))

  ascent = jax.grad(loss)(ts.params, flat['images'][:2], onehot[:2])
  scale = 0.05 / optax.tree.norm(ascent)
  perturbed = jax.tree.map(lambda p, g: p + scale * g, ts.params, ascent)
  descent = jax.grad(loss)(perturbed, flat['images'], onehot)
  want = jax.tree.map(lambda p, g: p - 0.1 * g, ts.params, descent)
  _assert_trees_close(host(new.params), want, rtol=2e-5, atol=1e-6)
  # The reported loss is the descent loss at the perturbed parameters.
  np.testing.assert_allclose(host(metrics)['loss'], loss(perturbed, flat['images'], onehot),
                             rtol=1e-5)
  # An ascent on examples 2 and 3 instead would have moved the parameters elsewhere.
  other = jax.grad(loss)(ts.params, flat['images'][2:4], onehot[2:4])
  assert optax.tree.norm(jax.tree.map(lambda a, b: a - b, ascent, other)) > 1e-3


def test_skipped_step_changes_nothing_and_logs_the_applied_learning_rate():
  optimizer, schedule = optim.build_optimizer(OptimizerOptions(), batch_size=GLOBAL_BATCH,
                                              steps_per_epoch=10, total_steps=100)
  ts0 = state_lib.init_train_state(FORWARD, optimizer, 1, IMAGE_SHAPE)
  bf16_step = step_lib.make_train_step(
      FORWARD, optimizer, schedule,
      TrainOptions(label_smoothing=0.1, bfloat16=True, skip_nonfinite=True), NUM_CLASSES,
      ema_decay=0.9, mesh=_mesh(), per_example_keys=False)
  batch = _batch(seed=7)
  ts, metrics = bf16_step(_put(ts0), _on(batch))
  metrics = host(metrics)
  assert metrics['finite'] == 1.0 and metrics['skipped'] == 0.0
  assert 'agc/fraction_clipped' in metrics
  after_one = host(ts)
  floats = jax.tree.leaves((after_one.params, after_one.state, after_one.ema_params,
                            after_one.ema_state))
  floats += [x for x in jax.tree.leaves(after_one.opt_state) if np.issubdtype(x.dtype, np.floating)]
  assert all(x.dtype == np.float32 for x in floats)
  # The bf16 forward at step 0 agrees with float32 to bf16 precision.
  outputs, _ = FORWARD.apply(ts0.params, ts0.state, None, batch['images'], is_training=True)
  y = np.eye(NUM_CLASSES)[batch['labels']] * 0.9 + 0.1 / NUM_CLASSES
  f32_loss = np.mean(-np.sum(y * _np_log_softmax(np.asarray(outputs['logits'])), axis=-1))
  np.testing.assert_allclose(metrics['loss'], f32_loss, rtol=2e-2)

  # A NaN on one device: everything is kept, only the step counter (data position) moves.
  bad = {k: v.copy() for k, v in batch.items()}
  bad['images'][11, 2, 3, 0] = np.nan
  ts, metrics = bf16_step(ts, _on(bad))
  metrics = host(metrics)
  assert metrics['finite'] == 0.0 and metrics['skipped'] == 1.0
  kept = host(ts)
  assert int(kept.step) == 2
  for name in ('params', 'state', 'opt_state', 'ema_params', 'ema_state'):
    _assert_trees_close(getattr(kept, name), getattr(after_one, name), 0, 0)

  # The next good step is the second update: it logs and uses schedule(1), not schedule(2),
  # and its EMA index is 1.
  ts, metrics = bf16_step(ts, _on(batch))
  metrics = host(metrics)
  assert schedule(1) != schedule(2)
  np.testing.assert_allclose(metrics['learning_rate'], schedule(1), rtol=1e-6)
  third = host(ts)
  assert int(state_lib.applied_updates(third.opt_state, third.step)) == 2
  decay = float(optim.ema_decay_at(1, 0.9))
  _assert_trees_close(third.ema_params, jax.tree.map(lambda e, p: decay * e + (1 - decay) * p,
                                                     after_one.ema_params, third.params))


def test_dropout_masks_follow_the_example_not_the_device():
  # Per-example keys: the same global batch on 8, 2 or 1 devices draws the same dropout mask
  # for every example, so the updates agree to float32 reduction order; keyed by device
  # instead, they would not.
  forward = _forward(dropout=0.5, stateful=False)
  sgd = optax.sgd(0.5)
  ts0 = state_lib.init_train_state(forward, sgd, 0, IMAGE_SHAPE)
  batch = _batch(seed=8)
  results = {}
  for devices in (8, 2, 1):
    train_step = _step(forward, sgd, num_devices=devices)
    ts, _ = train_step(_put(ts0, devices), _on(batch, devices))
    results[devices] = host(ts.params)
  # Two micro-batches draw the masks of one pass too.
  accumulated = _step(forward, sgd, num_devices=1, accum_steps=2)
  ts, _ = accumulated(_put(ts0, 1), _on(batch, 1))
  results['1 x 2 micro-batches'] = host(ts.params)
  for devices in (2, 1, '1 x 2 micro-batches'):
    _assert_trees_close(results[devices], results[8], rtol=1e-5, atol=1e-6)
  by_device = _step(forward, sgd, num_devices=2, per_example=False)
  ts, _ = by_device(_put(ts0, 2), _on(batch, 2))
  moved = jax.tree.map(lambda a, b: np.max(np.abs(a - b)), host(ts.params), results[8])
  assert max(jax.tree.leaves(moved)) > 1e-3
  # Another step draws other masks: the keys fold in the step.
  again = _step(forward, sgd, num_devices=1)
  ts1 = _put(ts0._replace(step=jnp.int32(1)), 1)
  ts1, _ = again(ts1, _on(batch, 1))
  moved = jax.tree.map(lambda a, b: np.max(np.abs(a - b)), host(ts1.params), results[1])
  assert max(jax.tree.leaves(moved)) > 1e-3


def test_accumulation_equals_one_pass_and_needs_less_memory(ts0):
  batches = [_batch(seed, mix=True, global_batch=32) for seed in range(3)]
  results, memory = {}, {}
  for k in (1, 2, 4):
    train_step = _step(num_devices=2, accum_steps=k)
    ts = _put(ts0, 2)
    # One program: the compiled step's own memory analysis, then that program runs.
    compiled = train_step.lower(ts, _on(batches[0], 2)).compile()
    memory[k] = compiled.memory_analysis().temp_size_in_bytes
    history = []
    flags = train_step.host_flags()
    for batch in batches:
      ts, m = compiled(ts, _on(batch, 2), flags)
      history.append(host(m))
    results[k] = (host(ts), history)
  for k in (2, 4):
    # Float32 round-off: the micro-batch means are summed in another order. The model state
    # (TinyNet's BatchNorm-like running mean) is updated once per micro-batch by design, so
    # it is the one thing that differs.
    got, want = results[k][0], results[1][0]
    for name in ('step', 'params', 'opt_state', 'ema_params', 'rng'):
      _assert_trees_close(getattr(got, name), getattr(want, name), rtol=2e-5, atol=2e-6)
    assert not np.allclose(got.state['TinyNet']['running_mean'],
                           want.state['TinyNet']['running_mean'])
    for got, want in zip(results[k][1], results[1][1]):
      _assert_trees_close(got, want, rtol=2e-5, atol=2e-6)
  assert memory[1] > memory[2] > memory[4], memory


def test_accumulation_steps_are_chosen_or_refused():
  assert step_lib.grad_accum_steps(TrainOptions(), 64) == 1
  assert step_lib.grad_accum_steps(TrainOptions(grad_accum_steps=4), 64) == 4
  assert step_lib.grad_accum_steps(TrainOptions(device_batch_limit=3), 8) == 4
  assert step_lib.grad_accum_steps(TrainOptions(device_batch_limit=512), 256) == 1
  with pytest.raises(ValueError, match=r'does not split into train.grad_accum_steps=3 .*e.g. 2'):
    step_lib.grad_accum_steps(TrainOptions(grad_accum_steps=3), 8)
  with pytest.raises(ValueError, match='not both'):
    TrainOptions(grad_accum_steps=2, device_batch_limit=8)


def test_stopping_or_skipping_at_the_debug_nan_step_is_one_program(ts0):
  # Whether a non-finite step stops the run or is skipped is the loop's decision, so trying
  # both behaviours end to end compiles (and caches) the train step once.
  ts, batch = _put(ts0), _on(_batch())
  texts = [_step(train=dataclasses.replace(TRAIN, debug_nan_step=2, skip_nonfinite=skip))
           .lower(ts, batch).as_text() for skip in (False, True)]
  assert texts[0] == texts[1]
