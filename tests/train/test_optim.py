"""Tests for nfnets.optim: config, schedule, optimizer chains and EMA.

References are independent: a NumPy transcription of the official SGD_AGC step and
WarmupCosineDecay schedule (nfnets-facts.md sections 3-4), and hand-written optax chains.
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from nfnets.train import agc, optim
from nfnets.train.options import AGCOptions, OPTIMIZER_NAMES, OptimizerOptions

CLASSIFIER = "NFNet/~/linear"
SE = "NFNet/~/nf_block/~/squeeze_excite/~/linear"
SHAPES = {
    "NFNet/~/stem_conv0": {"w": (3, 3, 3, 4), "gain": (4,), "bias": (4,)},
    SE: {"w": (4, 2), "b": (2,)},
    "NFNet/~/nf_block": {"skip_gain": ()},
    CLASSIFIER: {"w": (4, 3), "b": (3,)},
}
IMAGENET_STEPS_PER_EPOCH = 1281167 / 4096  # 312.79, so 5 epochs = 1563.9 steps.
IMAGENET_TOTAL_STEPS = 1281167 * 360 // 4096  # 112,602.


def make_tree(seed: int, scale: float = 1.0) -> dict:
  rng = np.random.default_rng(seed)
  return {m: {n: jnp.asarray(scale * rng.normal(size=s), jnp.float32) for n, s in leaves.items()}
          for m, leaves in SHAPES.items()}


def official_schedule(step, peak, warmup, total, start=0.0, end=0.0):
  """WarmupCosineDecay as in the official optim.py (float warm-up length)."""
  if step <= warmup:
    return (peak - start) * step / warmup + start
  return 0.5 * (peak - end) * (1 + math.cos(math.pi * (step - warmup) / (total - warmup))) + end


def np_unit_norm(x):
  if np.squeeze(x).ndim <= 1:
    return np.sqrt(np.sum(x * x))
  axes = (0,) if x.ndim == 2 else (0, 1, 2)
  return np.sqrt(np.sum(x * x, axis=axes, keepdims=True))


def official_sgd_agc_step(params, grads, bufs, lr, excluded, clip=0.01, eps=1e-3, wd=2e-5, m=0.9):
  """One official SGD_AGC step (float64): clip, add wd*p on 'w', Nesterov momentum."""
  new_params, new_bufs = {}, {}
  for mod in params:
    new_params[mod], new_bufs[mod] = {}, {}
    for name in params[mod]:
      p = np.asarray(params[mod][name], np.float64)
      g = np.asarray(grads[mod][name], np.float64)
      if f"{mod}/{name}" not in excluded:
        max_norm = np.maximum(np_unit_norm(p), eps) * clip
        g_norm = np_unit_norm(g)
        g = np.where(g_norm > max_norm, g * max_norm / np.maximum(g_norm, 1e-6), g)
      if name == "w":
        g = g + wd * p
      buf = m * bufs[mod][name] + g
      new_bufs[mod][name] = buf
      new_params[mod][name] = p - lr * (g + m * buf)
  return new_params, new_bufs


def test_default_options_hold_the_paper_values():
  c = OptimizerOptions()
  assert c.name == "sgd_agc" and c.lr == 0.1 and c.lr_scale_by_batch
  assert c.warmup_epochs == 5 and c.end_lr == 0.0 and c.momentum == 0.9 and c.nesterov
  assert c.weight_decay == 2e-5 and c.ema_decay == 0.99999
  assert c.agc.clipping == 0.01 and c.agc.eps == 1e-3
  assert tuple(c.agc.exclude) == (agc.CLASSIFIER_WEIGHT,) and not c.agc.with_adam
  assert c.b1 == 0.9 and c.b2 == 0.999
  with pytest.raises(dataclasses.FrozenInstanceError):  # Frozen: read once, never mutated.
    c.weight_decay = 0.1


def test_schedule_start_warmup_middle_end():
  c = OptimizerOptions()
  schedule = optim.make_schedule(c, batch_size=4096, steps_per_epoch=IMAGENET_STEPS_PER_EPOCH,
                                 total_steps=IMAGENET_TOTAL_STEPS)
  peak, warmup = 1.6, 1564  # round(1563.9)
  middle = warmup + (IMAGENET_TOTAL_STEPS - warmup) // 2
  np.testing.assert_allclose(float(schedule(0)), 0.0, atol=1e-9)
  np.testing.assert_allclose(float(schedule(warmup // 2)), peak / 2, rtol=1e-6)
  np.testing.assert_allclose(float(schedule(warmup)), peak, rtol=1e-6)
  np.testing.assert_allclose(float(schedule(middle)), peak / 2, rtol=1e-4)
  np.testing.assert_allclose(float(schedule(IMAGENET_TOTAL_STEPS)), 0.0, atol=1e-7)
  # Rounding the float warm-up (1563.9 -> 1564) stays within 0.1% of the peak everywhere.
  steps = np.arange(0, IMAGENET_TOTAL_STEPS + 1, 7)
  ours = np.asarray(jax.vmap(schedule)(jnp.asarray(steps)))
  ref = np.array([official_schedule(s, peak, 5 * IMAGENET_STEPS_PER_EPOCH, IMAGENET_TOTAL_STEPS)
                  for s in steps])
  assert np.max(np.abs(ours - ref)) < 1e-3 * peak


def test_schedule_without_batch_scaling_or_warmup():
  c = OptimizerOptions(lr_scale_by_batch=False, warmup_epochs=0.0)
  schedule = optim.make_schedule(c, batch_size=1024, steps_per_epoch=10, total_steps=100)
  np.testing.assert_allclose(float(schedule(0)), 0.1, rtol=1e-6)  # No scaling, no warm-up.
  np.testing.assert_allclose(float(schedule(50)), 0.05, rtol=1e-5)
  assert optim.peak_learning_rate(OptimizerOptions(), 512) == pytest.approx(0.2)


def test_weight_decay_mask_is_by_name():
  mask = optim.weight_decay_mask(make_tree(0))
  assert [k for m in mask for k, v in mask[m].items() if v] == ["w", "w", "w"]


def _run(tx, params, grads_seq):
  """Applies `tx` over a sequence of gradients; returns the final params and state."""
  state = tx.init(params)

  @jax.jit
  def step(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  for grads in grads_seq:
    params, state = step(params, state, grads)
  return params, state


def _grads_seq(n=4):
  # Mixed scales so some units clip; the classifier gradient is large (would clip).
  seq = []
  for i in range(n):
    g = make_tree(10 + i, scale=0.05)
    g[CLASSIFIER]["w"] = g[CLASSIFIER]["w"] * 100
    seq.append(g)
  return seq


def _config(**overrides):
  # 3 warm-up steps then cosine: the steps below see both phases.
  return OptimizerOptions(**{"warmup_epochs": 1.0, **overrides})


def test_sgd_agc_matches_hand_written_chain_and_official_step():
  kw = dict(batch_size=512, steps_per_epoch=3, total_steps=10)
  tx, schedule = optim.build_optimizer(_config(), **kw)
  params, grads_seq = make_tree(0), _grads_seq()
  ours, state = _run(tx, params, grads_seq)

  not_head_w = jax.tree.map(lambda _: True, params)
  not_head_w[CLASSIFIER]["w"] = False
  is_w = {m: {n: n == "w" for n in leaves} for m, leaves in params.items()}
  hand = optax.chain(
      optax.masked(optax.adaptive_grad_clip(0.01, 1e-3), not_head_w),
      optax.masked(optax.add_decayed_weights(2e-5), is_w),
      optax.sgd(optax.warmup_cosine_decay_schedule(0.0, 0.2, 3, 10), momentum=0.9, nesterov=True))
  theirs, _ = _run(hand, params, grads_seq)
  for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-8)

  ref, bufs = params, jax.tree.map(lambda p: np.zeros(p.shape), params)
  for t, grads in enumerate(grads_seq):
    ref, bufs = official_sgd_agc_step(ref, grads, bufs, float(schedule(t)),
                                      excluded={"NFNet/~/linear/w"})
  for mod in ref:
    for name in ref[mod]:
      np.testing.assert_allclose(ours[mod][name], ref[mod][name], rtol=1e-5, atol=1e-7,
                                 err_msg=f"{mod}/{name}")
  assert int(agc.agc_metrics(state)["agc/units_clipped"]) > 0


def test_classifier_weight_untouched_by_agc_in_builder():
  kw = dict(batch_size=256, steps_per_epoch=3, total_steps=10)
  params, grads_seq = make_tree(0), _grads_seq(2)
  with_agc, _ = _run(optim.build_optimizer(_config(), **kw)[0], params, grads_seq)
  without, _ = _run(optim.build_optimizer(_config(name="sgd"), **kw)[0], params, grads_seq)
  np.testing.assert_allclose(with_agc[CLASSIFIER]["w"], without[CLASSIFIER]["w"], rtol=1e-6)
  assert not np.allclose(with_agc[SE]["w"], without[SE]["w"])
  assert not np.allclose(with_agc[CLASSIFIER]["b"], without[CLASSIFIER]["b"])  # Bias is clipped.


@pytest.mark.parametrize("name", ["sgd", "adam", "adamw"])
def test_weight_decay_never_touches_gains_biases_skip_gains(name):
  c = _config(name=name, warmup_epochs=0.0, weight_decay=0.1)
  tx, _ = optim.build_optimizer(c, batch_size=256, steps_per_epoch=3, total_steps=10)
  params = make_tree(0)
  zero = jax.tree.map(jnp.zeros_like, params)
  updates, _ = tx.update(zero, tx.init(params), params)
  for mod in params:
    for leaf_name, u in updates[mod].items():
      if leaf_name == "w":
        assert np.all(np.abs(np.asarray(u)) > 0), f"{mod}/{leaf_name} not decayed"
      else:
        np.testing.assert_array_equal(u, 0.0, err_msg=f"{mod}/{leaf_name} decayed")
  if name == "sgd":  # Nesterov at step 0 with zero grads: update = -lr (1 + m) wd w.
    w = params[CLASSIFIER]["w"]
    np.testing.assert_allclose(updates[CLASSIFIER]["w"], -0.1 * 1.9 * 0.1 * w, rtol=1e-5)


@pytest.mark.parametrize("name, with_adam, expect_agc", [
    ("sgd_agc", False, True), ("sgd", False, False), ("adam", False, False),
    ("adam", True, True), ("adamw", True, True)])
def test_agc_presence_per_optimizer(name, with_adam, expect_agc):
  c = _config(name=name, agc=AGCOptions(with_adam=with_adam))
  tx, _ = optim.build_optimizer(c, batch_size=256, steps_per_epoch=3, total_steps=10)
  params = make_tree(0)
  _, state = tx.update(make_tree(1), tx.init(params), params)
  assert bool(agc.agc_metrics(state)) == expect_agc


def test_empty_exclude_clips_the_classifier():
  c = _config(agc=AGCOptions(exclude=()))
  kw = dict(batch_size=256, steps_per_epoch=3, total_steps=10)
  params, grads_seq = make_tree(0), _grads_seq(2)
  clipped, _ = _run(optim.build_optimizer(c, **kw)[0], params, grads_seq)
  plain, _ = _run(optim.build_optimizer(_config(name="sgd"), **kw)[0], params, grads_seq)
  assert not np.allclose(clipped[CLASSIFIER]["w"], plain[CLASSIFIER]["w"])


def test_bad_inputs_raise():
  kw = dict(batch_size=256, steps_per_epoch=3, total_steps=10)
  with pytest.raises(ValueError, match=r"Unknown optimizer.name 'lamb'.*'sgd_agc', 'sgd', "
                     r"'adam', 'adamw'"):
    _config(name="lamb")
  assert set(optim.OPTIMIZERS) == set(OPTIMIZER_NAMES)  # The names the options accept.
  with pytest.raises(ValueError, match="must be > 0"):
    optim.build_optimizer(_config(), batch_size=0, steps_per_epoch=3, total_steps=10)
  with pytest.raises(ValueError, match="shorter than total_steps"):
    optim.build_optimizer(_config(warmup_epochs=5.0), **kw)
  bad = _config(agc=AGCOptions(clipping=0.0))
  with pytest.raises(ValueError, match="clipping must be > 0"):
    optim.build_optimizer(bad, **kw)
  typo = _config(agc=AGCOptions(exclude=("NFNet/~/linaer:w",)))
  tx, _ = optim.build_optimizer(typo, **kw)
  with pytest.raises(ValueError, match="matches no parameter"):
    tx.init(make_tree(0))


def test_ema_warmup_formula():
  for step, expected in [(0, 0.1), (8, 0.5), (90, 0.91), (10**7, 0.99999)]:
    np.testing.assert_allclose(float(optim.ema_decay_at(step, 0.99999)), expected, rtol=1e-6)
  ema = {"a": jnp.full((3,), 2.0), "b": {"c": jnp.asarray(4.0)}, "n": jnp.asarray(7, jnp.int32)}
  new = {"a": jnp.full((3,), 1.0, jnp.bfloat16), "b": {"c": jnp.asarray(0.0)},
         "n": jnp.asarray(9, jnp.int32)}
  out = jax.jit(optim.ema_update, static_argnums=3)(ema, new, jnp.asarray(8), 0.99999)
  np.testing.assert_allclose(out["a"], 0.5 * 2.0 + 0.5 * 1.0)  # d_8 = 9/18.
  np.testing.assert_allclose(out["b"]["c"], 2.0)
  assert out["a"].dtype == jnp.float32 and out["b"]["c"].dtype == jnp.float32
  assert int(out["n"]) == 9  # Integer leaves are not averaged.
  late = optim.ema_update(ema, new, 10**7, 0.99)  # The ceiling decay applies.
  np.testing.assert_allclose(late["b"]["c"], 0.99 * 4.0, rtol=1e-6)
  with pytest.raises(ValueError, match="decay must be in"):
    optim.ema_update(ema, new, 0, 1.0)
