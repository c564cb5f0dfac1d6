"""Tests for nfnets.agc against an independent NumPy implementation of the paper's formula.

The reference below is written from the paper (arXiv 2102.06171, Sec. 4.1), in float64:
unit i of a parameter is clipped when ||G_i|| / max(||W_i||, eps) > lambda, and then
G_i <- lambda * max(||W_i||, eps) / ||G_i|| * G_i. Units: conv HWIO -> one per output
channel (norm over H, W, I); linear IO -> one per output column; vectors/scalars -> one.
"""

import re

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from nfnets.train import agc

LAMBDA = 0.01
EPS = 1e-3
# Parameter shapes named like a tiny Haiku NFNet.
SHAPES = {
    "NFNet/~/stem_conv0": {"w": (3, 3, 3, 8), "gain": (8,), "bias": (8,)},
    "NFNet/~/nf_block/~/conv0": {"w": (1, 1, 8, 6), "gain": (6,), "bias": (6,)},
    "NFNet/~/nf_block/~/squeeze_excite/~/linear": {"w": (6, 4), "b": (4,)},
    "NFNet/~/nf_block": {"skip_gain": ()},
    "NFNet/~/linear": {"w": (6, 5), "b": (5,)},
}
CLASSIFIER = "NFNet/~/linear"


def make_params(seed: int = 0) -> dict:
  """Haiku-like init: fan-in normal weights, unit gains, zero biases and skip gain."""
  rng = np.random.default_rng(seed)
  params = {}
  for module, leaves in SHAPES.items():
    params[module] = {}
    for name, shape in leaves.items():
      if name == "w":
        fan_in = int(np.prod(shape[:-1]))
        value = rng.normal(size=shape) / np.sqrt(fan_in)
      elif name == "gain":
        value = 1.0 + 0.1 * rng.normal(size=shape)
      else:  # bias, b, skip_gain: zero-initialised, so AGC must use the eps floor.
        value = np.zeros(shape)
      params[module][name] = jnp.asarray(value, jnp.float32)
  return params


def make_grads(seed: int = 1) -> dict:
  """Gradients whose per-unit scale spans 1e-5..1e-1, so some units clip and some do not."""
  rng = np.random.default_rng(seed)
  grads = {}
  for module, leaves in SHAPES.items():
    grads[module] = {}
    for name, shape in leaves.items():
      value = rng.normal(size=shape)
      if len(shape) >= 2:  # A different scale per output unit (last axis).
        value = value * np.logspace(-5, -1, shape[-1])
      else:
        value = value * 10.0 ** rng.uniform(-6, -1)
      grads[module][name] = jnp.asarray(value, jnp.float32)
  return grads


def ref_unit_norms(x: np.ndarray) -> np.ndarray:
  """Per-unit L2 norms, keepdims (one entry per unit)."""
  x = np.asarray(x, np.float64)
  if np.squeeze(x).ndim <= 1:
    return np.sqrt(np.sum(x * x)).reshape((1,) * x.ndim)
  axes = (0,) if x.ndim in (2, 3) else tuple(range(x.ndim - 1))  # Conv: all but the output.
  return np.sqrt(np.sum(x * x, axis=axes, keepdims=True))


def ref_agc_leaf(g, p, lam=LAMBDA, eps=EPS):
  """(clipped gradient, clipped-unit count, unit count, max ratio) for one leaf."""
  g = np.asarray(g, np.float64)
  g_norm = ref_unit_norms(g)
  w_norm = np.maximum(ref_unit_norms(p), eps)
  clip = g_norm / w_norm > lam
  scale = np.where(clip, lam * w_norm / np.where(clip, g_norm, 1.0), 1.0)
  return g * scale, int(clip.sum()), clip.size, float(np.max(g_norm / (lam * w_norm)))


def ref_agc(grads, params, excluded=(), lam=LAMBDA, eps=EPS):
  out, clipped, total, max_ratio = {}, 0, 0, 0.0
  for module in grads:
    out[module] = {}
    for name in grads[module]:
      g, p = grads[module][name], params[module][name]
      if f"{module}/{name}" in excluded:
        out[module][name] = np.asarray(g, np.float64)
        continue
      out[module][name], c, t, r = ref_agc_leaf(g, p, lam, eps)
      clipped, total, max_ratio = clipped + c, total + t, max(max_ratio, r)
  return out, clipped, total, max_ratio


def run(tx, grads, params):
  # Jitted: one compile per test is cheaper here than eager per-op compiles for every shape,
  # and it runs the trace-time statistics code as training will.
  state = tx.init(params)
  return jax.jit(tx.update)(grads, state, params)


def assert_tree_close(actual, expected, rtol=1e-5, atol=1e-12):
  for module in expected:
    for name in expected[module]:
      np.testing.assert_allclose(np.asarray(actual[module][name], np.float64),
                                 expected[module][name], rtol=rtol, atol=atol,
                                 err_msg=f"{module}/{name}")


def test_matches_reference_and_statistics_without_exclusion():
  params, grads = make_params(), make_grads()
  updates, state = run(agc.adaptive_grad_clip(LAMBDA, EPS), grads, params)
  expected, clipped, total, max_ratio = ref_agc(grads, params)
  assert_tree_close(updates, expected)
  # The data must exercise both branches, otherwise this test proves little.
  assert 0 < clipped < total
  metrics = agc.agc_metrics(state)
  assert int(metrics["agc/units_clipped"]) == clipped
  assert int(metrics["agc/units_total"]) == total == 8 + 2 + 6 + 2 + 4 + 1 + 1 + 5 + 1
  np.testing.assert_allclose(float(metrics["agc/fraction_clipped"]), clipped / total, rtol=1e-6)
  np.testing.assert_allclose(float(metrics["agc/max_ratio"]), max_ratio, rtol=1e-4)


# Leaves of every unit layout AGC knows: one unit per trailing index; a single unit (a vector,
# a conv with one output channel, a 1 x n row, a scalar).
LAYOUTS = {"rank2": (6, 5), "rank3": (4, 2, 3), "conv": (3, 3, 4, 6), "conv3d": (2, 2, 2, 3, 4),
           "one_output_conv": (3, 3, 4, 1), "row": (1, 5), "vector": (7,), "scalar": ()}


def test_statistics_count_each_unit_once_on_every_layout():
  rng = np.random.default_rng(3)
  params = {k: jnp.asarray(rng.normal(size=s), jnp.float32) for k, s in LAYOUTS.items()}

  def grad(shape):
    # Scales over four decades along the last axis: some units of a leaf clip, some do not.
    scale = np.logspace(-4, 0, shape[-1]) if len(shape) > 1 else 10.0 ** rng.uniform(-4, 0)
    return jnp.asarray(rng.normal(size=shape) * scale, jnp.float32)

  grads = {k: grad(s) for k, s in LAYOUTS.items()}
  _, state = run(agc.adaptive_grad_clip(LAMBDA, EPS), grads, params)
  clipped = total = 0
  max_ratio = 0.0
  for k in LAYOUTS:
    g_norm = np.ravel(ref_unit_norms(grads[k]))
    max_norm = LAMBDA * np.maximum(np.ravel(ref_unit_norms(params[k])), EPS)
    clipped += int(np.sum(g_norm > max_norm))
    total += g_norm.size
    max_ratio = max(max_ratio, float(np.max(g_norm / max_norm)))
  metrics = agc.agc_metrics(state)
  assert int(metrics["agc/units_total"]) == total == 5 + 6 + 6 + 4 + 1 + 1 + 1 + 1
  assert 0 < clipped < total
  assert int(metrics["agc/units_clipped"]) == clipped
  np.testing.assert_allclose(float(metrics["agc/max_ratio"]), max_ratio, rtol=1e-5)


def _reductions(jaxpr) -> int:
  count = 0
  for eqn in jaxpr.eqns:
    count += eqn.primitive.name.startswith(("reduce_", "argmax", "argmin"))
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
      count += _reductions(sub)
  return count


def test_statistics_add_two_reductions_whatever_the_number_of_leaves():
  # Each reduction becomes a kernel of its own, and XLA's compile time grows with their
  # number: per leaf, only the two unit norms; the statistics of all leaves take one each.
  def count(leaves):
    params = {f"conv{i}": {"w": jnp.ones((3, 3, 4, 8))} for i in range(leaves)}
    tx = agc.adaptive_grad_clip(LAMBDA, EPS)
    closed = jax.make_jaxpr(lambda g, p: tx.update(g, tx.init(p), p))(params, params)
    return _reductions(closed.jaxpr)

  assert count(6) - count(2) == 2 * 4
  assert count(2) == 2 * 2 + 2


def test_used_alone_clips_the_classifier_too():
  params, grads = make_params(), make_grads()
  grads[CLASSIFIER]["w"] = grads[CLASSIFIER]["w"] * 1e3  # Far above lambda * ||W||.
  updates, _ = run(agc.adaptive_grad_clip(LAMBDA), grads, params)
  expected, *_ = ref_agc(grads, params)
  np.testing.assert_allclose(updates[CLASSIFIER]["w"], expected[CLASSIFIER]["w"], rtol=1e-5)
  assert not np.allclose(updates[CLASSIFIER]["w"], grads[CLASSIFIER]["w"])


@pytest.mark.parametrize("pattern", [
    "NFNet/~/linear:w",
    "NFNet/~/linear/w",
    agc.CLASSIFIER_WEIGHT,
    re.compile(r"NFNet/~/linear/w"),
    [lambda path, leaf: path == "NFNet/~/linear/w"],
    ("NFNet/?/linear:w",),  # Glob '?' is one character ('*' would span '/' into the SE).
])
def test_classifier_weight_left_untouched(pattern):
  params, grads = make_params(), make_grads()
  grads[CLASSIFIER]["w"] = grads[CLASSIFIER]["w"] * 1e3
  grads["NFNet/~/nf_block/~/squeeze_excite/~/linear"]["w"] *= 1e3  # SE weights must clip.
  updates, state = run(agc.adaptive_grad_clip(LAMBDA, EPS, exclude=pattern), grads, params)
  np.testing.assert_array_equal(updates[CLASSIFIER]["w"], grads[CLASSIFIER]["w"])
  expected, clipped, total, _ = ref_agc(grads, params, excluded={"NFNet/~/linear/w"})
  assert_tree_close(updates, expected)
  metrics = agc.agc_metrics(state)
  assert int(metrics["agc/units_total"]) == total  # The head's 5 units are not counted.
  assert int(metrics["agc/units_clipped"]) == clipped


def test_weight_and_bias_pattern_excludes_both_like_timm():
  params, grads = make_params(), make_grads()
  grads[CLASSIFIER] = jax.tree.map(lambda g: g * 1e3, grads[CLASSIFIER])
  tx = agc.adaptive_grad_clip(LAMBDA, exclude=agc.CLASSIFIER_WEIGHT_AND_BIAS)
  updates, _ = run(tx, grads, params)
  for name in ("w", "b"):
    np.testing.assert_array_equal(updates[CLASSIFIER][name], grads[CLASSIFIER][name])
  expected, *_ = ref_agc(grads, params, excluded={"NFNet/~/linear/w", "NFNet/~/linear/b"})
  assert_tree_close(updates, expected)


def test_predicate_sees_leaf():
  params, grads = make_params(), make_grads()
  grads["NFNet/~/nf_block"]["skip_gain"] = jnp.float32(5.0)
  tx = agc.adaptive_grad_clip(LAMBDA, exclude=lambda path, leaf: jnp.ndim(leaf) == 0)
  updates, _ = run(tx, grads, params)
  assert float(updates["NFNet/~/nf_block"]["skip_gain"]) == 5.0


def test_zero_gradients_give_zeros_without_nan():
  params = make_params()
  grads = jax.tree.map(jnp.zeros_like, params)
  updates, state = run(agc.adaptive_grad_clip(LAMBDA), grads, params)
  for leaf in jax.tree.leaves(updates):
    assert np.all(np.asarray(leaf) == 0.0)
  metrics = agc.agc_metrics(state)
  assert int(metrics["agc/units_clipped"]) == 0
  assert np.isfinite(float(metrics["agc/max_ratio"]))


def test_zero_parameters_use_the_eps_floor():
  params, grads = make_params(), make_grads()
  bias_grad = np.array([3.0, 4.0, 0, 0, 0, 0, 0, 0], np.float32)  # Norm 5.
  grads["NFNet/~/stem_conv0"]["bias"] = jnp.asarray(bias_grad)
  updates, _ = run(agc.adaptive_grad_clip(LAMBDA, EPS), grads, params)
  out = np.asarray(updates["NFNet/~/stem_conv0"]["bias"])
  # A zero bias has ||W||* = eps, so its gradient norm is capped at lambda * eps, direction kept.
  np.testing.assert_allclose(np.linalg.norm(out), LAMBDA * EPS, rtol=1e-5)
  np.testing.assert_allclose(out, bias_grad * (LAMBDA * EPS / 5.0), rtol=1e-5)


def test_bfloat16_gradients():
  params, grads = make_params(), make_grads()
  grads_bf16 = jax.tree.map(lambda g: g.astype(jnp.bfloat16), grads)
  updates, state = run(agc.adaptive_grad_clip(LAMBDA), grads_bf16, params)
  for leaf in jax.tree.leaves(updates):
    assert leaf.dtype == jnp.bfloat16  # The caller's dtype is kept.
    assert np.all(np.isfinite(np.asarray(leaf, np.float32)))
  as_f32 = jax.tree.map(lambda g: np.asarray(g, np.float32), grads_bf16)
  expected, clipped, _, _ = ref_agc(as_f32, params)
  assert_tree_close(updates, expected, rtol=2e-2, atol=1e-9)
  # Borderline units may flip with bf16 norms; the count must still be essentially the same.
  assert abs(int(agc.agc_metrics(state)["agc/units_clipped"]) - clipped) <= 1


def test_unit_exactly_at_threshold_is_not_clipped():
  # Exact in binary: ||W|| = 5, lambda = 0.5 -> max norm 2.5; ||G|| = sqrt(1.5^2 + 2^2) = 2.5.
  params = {"layer": {"w": jnp.array([[3.0, 3.0], [4.0, 4.0]])}}
  grads = {"layer": {"w": jnp.array([[1.5, 1.5 * 1.01], [2.0, 2.0 * 1.01]])}}
  updates, state = run(agc.adaptive_grad_clip(0.5), grads, params)
  out = np.asarray(updates["layer"]["w"])
  np.testing.assert_array_equal(out[:, 0], [1.5, 2.0])  # At the threshold: unchanged.
  np.testing.assert_allclose(np.linalg.norm(out[:, 1]), 2.5, rtol=1e-6)  # 1% above: rescaled.
  metrics = agc.agc_metrics(state)
  assert int(metrics["agc/units_clipped"]) == 1 and int(metrics["agc/units_total"]) == 2
  np.testing.assert_allclose(float(metrics["agc/max_ratio"]), 1.01, rtol=1e-6)


@pytest.mark.parametrize("clipping, eps", [(0.0, 1e-3), (-0.01, 1e-3), (0.01, 0.0), (0.01, -1.0)])
def test_rejects_non_positive_hyperparameters(clipping, eps):
  with pytest.raises(ValueError, match="must be > 0"):
    agc.adaptive_grad_clip(clipping, eps)


@pytest.mark.parametrize("exclude", [
    "NFNet/~/linaer:w",  # Typo.
    ["NFNet/~/linear:w", "NFNet/~/head:w"],  # One good, one matching nothing.
    "re:NFNet/~/linear",  # Regexes must match the whole path.
])
def test_pattern_matching_nothing_raises_at_init(exclude):
  tx = agc.adaptive_grad_clip(LAMBDA, exclude=exclude)
  with pytest.raises(ValueError, match="matches no parameter"):
    tx.init(make_params())


@pytest.mark.parametrize("exclude, message", [
    ("", "empty string"), (3, "must be str"), ("re:(", "does not compile")])
def test_malformed_patterns_raise(exclude, message):
  with pytest.raises(ValueError, match=message):
    agc.adaptive_grad_clip(LAMBDA, exclude=exclude)


def test_update_without_params_raises():
  params, grads = make_params(), make_grads()
  tx = agc.adaptive_grad_clip(LAMBDA)
  with pytest.raises(ValueError, match="needs the parameters"):
    tx.update(grads, tx.init(params))


def test_metrics_found_in_nested_states():
  params, grads = make_params(), make_grads()
  assert agc.agc_metrics(optax.sgd(0.1).init(params)) == {}
  keep_all = jax.tree.map(lambda _: True, params)
  nested = optax.chain(
      optax.masked(agc.adaptive_grad_clip(LAMBDA), keep_all),
      optax.inject_hyperparams(optax.sgd)(learning_rate=0.1))
  _, state = run(nested, grads, params)
  metrics = agc.agc_metrics(state)
  _, clipped, total, _ = ref_agc(grads, params)
  assert int(metrics["agc/units_clipped"]) == clipped and int(metrics["agc/units_total"]) == total
  two = optax.chain(agc.adaptive_grad_clip(LAMBDA), agc.adaptive_grad_clip(LAMBDA / 10))
  _, state = run(two, grads, params)
  assert set(agc.agc_metrics(state)) == {f"agc_{i}/{f}" for i in (1, 2) for f in agc.AGCState._fields}


def test_path_to_str_joins_keys():
  flat, _ = jax.tree_util.tree_flatten_with_path({"NFNet/~/linear": {"w": 1}, "x": [2]})
  assert sorted(agc.path_to_str(p) for p, _ in flat) == ["NFNet/~/linear/w", "x/0"]
