"""Tests for nfnets.models.activations: the official literals, scaling, lookup."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nfnets.models import activations

# The official literals, as listed in the reference facts (section 2.5).
_OFFICIAL = {
    'celu': 1.270926833152771,
    'elu': 1.2716004848480225,
    'gelu': 1.7015043497085571,
    'glu': 1.8484294414520264,
    'leaky_relu': 1.70590341091156,
    'log_sigmoid': 1.9193484783172607,
    'log_softmax': 1.0002083778381348,
    'relu': 1.7139588594436646,
    'relu6': 1.7131484746932983,
    'selu': 1.0008515119552612,
    'sigmoid': 4.803835391998291,
    'silu': 1.7881293296813965,
    'soft_sign': 2.338853120803833,
    'softplus': 1.9203323125839233,
    'tanh': 1.5939117670059204,
}


def test_gamma_literals_are_exact():
  assert activations.GAMMAS == _OFFICIAL
  assert set(activations.ACTIVATIONS) == set(_OFFICIAL) | {'identity'}
  assert len(activations.ACTIVATIONS) == 16


def _np_reference(name, x):
  """Independent numpy formulas of the unscaled activations."""
  sig = 1.0 / (1.0 + np.exp(-x))
  formulas = {
      'relu': lambda: np.maximum(x, 0.0),
      'gelu': lambda: 0.5 * x * (1.0 + np.tanh(
          math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3))),
      'silu': lambda: x * sig,
      'sigmoid': lambda: sig,
      'tanh': lambda: np.tanh(x),
      'elu': lambda: np.where(x > 0, x, np.expm1(x)),
      'softplus': lambda: np.log1p(np.exp(x)),
      'soft_sign': lambda: x / (1.0 + np.abs(x)),
      'leaky_relu': lambda: np.where(x >= 0, x, 0.01 * x),
      'relu6': lambda: np.clip(x, 0.0, 6.0),
      'glu': lambda: x[..., :x.shape[-1] // 2] * sig[..., x.shape[-1] // 2:],
  }
  return formulas[name]()


@pytest.mark.parametrize('name', ['relu', 'gelu', 'silu', 'sigmoid', 'tanh',
                                  'elu', 'softplus', 'soft_sign', 'leaky_relu',
                                  'relu6', 'glu'])
def test_scaled_activation_matches_numpy(name):
  x = np.linspace(-7.0, 7.0, 64, dtype=np.float32).reshape(4, 16)
  got = np.asarray(activations.get_activation(name)(jnp.asarray(x)))
  want = _np_reference(name, x.astype(np.float64)) * _OFFICIAL[name]
  np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)


def test_gelu_is_the_tanh_approximation():
  # At x = -2 the exact (erf) GELU and the tanh approximation differ by ~4e-4.
  x = jnp.asarray([-2.0, 1.5])
  gamma = _OFFICIAL['gelu']
  got = activations.ACTIVATIONS['gelu'](x) / gamma
  exact = jax.nn.gelu(x, approximate=False)
  assert float(jnp.max(jnp.abs(got - exact))) > 1e-4
  # 1e-5: float32 rounding of tanh differs by an ulp or two between XLA's CPU code paths
  # (e.g. LLVM optimisation levels); the erf/tanh gap asserted above is ~1e-2 relative.
  np.testing.assert_allclose(got, _np_reference('gelu', np.asarray(x)),
                             rtol=1e-5)


def test_identity_is_unscaled_and_dtypes_are_kept():
  x = jnp.asarray([[-1.5, 0.0, 2.0, 0.5]], jnp.bfloat16)
  assert activations.get_activation('identity')(x) is x
  for name, fn in activations.ACTIVATIONS.items():
    # Shape/dtype inference only: no need to compile 16 tiny kernels.
    assert jax.eval_shape(fn, x).dtype == jnp.bfloat16, name


def test_get_activation_unknown_lists_names():
  with pytest.raises(ValueError, match=r"Unknown activation 'swish'.*'gelu'"):
    activations.get_activation('swish')
