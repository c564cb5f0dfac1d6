"""Tests for nfnets.analysis.gamma: gamma estimation against the table and closed forms."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nfnets.analysis import gamma as gamma_lib
from nfnets.models import activations

@pytest.mark.parametrize('name', sorted(activations.GAMMAS))
def test_compute_gamma_reproduces_table(name):
  axis = gamma_lib.AXIS_SIZES.get(name, 1)
  gamma = gamma_lib.compute_gamma(activations.BASE_FUNCTIONS[name],
                                    num_samples=2**18, axis_size=axis)
  # The literals are finite-sample estimates (all lie 0.007-0.09 % above the
  # population values, glu 0.12 %), so they are compared relatively. glu's
  # literal is 1.19e-3 above its exact value (checked independently in
  # test_compute_gamma_matches_closed_forms), so no accurate method can get
  # within 1e-3 of it.
  rtol = 1.5e-3 if name == 'glu' else 1e-3
  assert gamma == pytest.approx(activations.GAMMAS[name], rel=rtol)


def test_compute_gamma_matches_closed_forms():
  # relu: E[relu(x)^2] = 1/2, E[relu(x)] = 1/sqrt(2 pi).
  relu_gamma = 1.0 / math.sqrt(0.5 - 1.0 / (2.0 * math.pi))
  assert gamma_lib.compute_gamma(jax.nn.relu) == pytest.approx(
      relu_gamma, rel=1e-5)
  # selu's constants are chosen so that N(0, 1) maps to unit variance.
  assert gamma_lib.compute_gamma(jax.nn.selu) == pytest.approx(1.0, rel=1e-4)
  # glu(a, b) = a * sigmoid(b), a and b independent: Var = E[sigmoid(b)^2].
  nodes, weights = np.polynomial.hermite_e.hermegauss(120)
  weights = weights / weights.sum()
  e_sig2 = np.sum(weights / (1.0 + np.exp(-nodes))**2)
  glu_gamma = gamma_lib.compute_gamma(jax.nn.glu, axis_size=2)
  assert glu_gamma == pytest.approx(1.0 / math.sqrt(e_sig2), rel=1e-4)
  # Identity has gamma 1.
  assert gamma_lib.compute_gamma(lambda x: x) == pytest.approx(1.0, rel=1e-5)


def test_compute_gamma_is_deterministic_and_seed_insensitive():
  fn = activations.BASE_FUNCTIONS['gelu']
  a = gamma_lib.compute_gamma(fn, seed=0)
  assert gamma_lib.compute_gamma(fn, seed=0) == a
  assert gamma_lib.compute_gamma(fn, seed=3) == pytest.approx(a, rel=1e-5)


def test_compute_gamma_rejects_constant_function():
  with pytest.raises(ValueError, match='gamma is undefined'):
    gamma_lib.compute_gamma(jnp.zeros_like, num_samples=1024)
