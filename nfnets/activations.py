"""Gamma-scaled activations for normalizer-free networks.

A normalizer-free network keeps activations at unit variance without batch
statistics. For that, every nonlinearity f is rescaled by a constant gamma so
that f(x) * gamma has unit standard deviation when x ~ N(0, 1). With this
scaling, a block whose input has unit variance, and whose weight-standardised
convolutions preserve variance, also produces unit-variance features
(Brock et al., 2021, "Characterizing signal propagation ...", section 4).

`GAMMAS` holds the official constants verbatim. They are finite-sample
estimates, not exact values: the closed form for relu is
sqrt(2 / (1 - 1/pi)) = 1.712859, while the literal is 1.713959. Pretrained
weights were trained with the literals, so the literals are what the model
uses. `compute_gamma` computes the population value, for new activations and
for checking the table.
"""

from typing import Callable, Dict

import jax
import jax.numpy as jnp
import numpy as np
from scipy import special as sp_special
from scipy.stats import qmc

Activation = Callable[[jax.Array], jax.Array]

# The 15 official constants, copied exactly. They multiply f(x).
GAMMAS: Dict[str, float] = {
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


def _gelu(x: jax.Array) -> jax.Array:
  # The official models use JAX's default tanh approximation. timm's dm_nfnet
  # uses the exact erf form, which gives slightly different logits.
  return jax.nn.gelu(x, approximate=True)


# The unscaled functions. glu and log_softmax act on the last axis: glu splits
# it in two halves (a * sigmoid(b)), and log_softmax normalises over it.
BASE_FUNCTIONS: Dict[str, Activation] = {
    'celu': jax.nn.celu,
    'elu': jax.nn.elu,
    'gelu': _gelu,
    'glu': jax.nn.glu,
    'leaky_relu': jax.nn.leaky_relu,
    'log_sigmoid': jax.nn.log_sigmoid,
    'log_softmax': jax.nn.log_softmax,
    'relu': jax.nn.relu,
    'relu6': jax.nn.relu6,
    'selu': jax.nn.selu,
    'sigmoid': jax.nn.sigmoid,
    'silu': jax.nn.silu,
    'soft_sign': jax.nn.soft_sign,
    'softplus': jax.nn.softplus,
    'tanh': jnp.tanh,
}

# Axis size used when estimating gamma for the functions that do not act
# elementwise. glu pairs two independent N(0,1) values. For log_softmax, the
# gamma depends weakly on the axis size n (about 1 + 0.14 / n, because the
# subtracted log-sum-exp varies less as n grows); the official literal 1.0002
# corresponds to an axis of a few hundred or more channels, so 256 is used.
AXIS_SIZES: Dict[str, int] = {'glu': 2, 'log_softmax': 256}


def _identity(x: jax.Array) -> jax.Array:
  return x


def _scaled(name: str, fn: Activation, gamma: float) -> Activation:
  """Returns x -> fn(x) * gamma, named after the activation for readable traces."""

  def scaled(x: jax.Array) -> jax.Array:
    # gamma is a Python float, so the product keeps the input dtype (bf16
    # activations stay bf16 under JAX's weak typing).
    return fn(x) * gamma

  scaled.__name__ = f'scaled_{name}'
  scaled.__qualname__ = scaled.__name__
  scaled.__doc__ = f'{name}(x) * {gamma!r} (unit variance for x ~ N(0, 1)).'
  # Jitted so that each call while tracing a model is one cached call rather
  # than several primitives (it is inlined when the model is compiled).
  return jax.jit(scaled)


ACTIVATIONS: Dict[str, Activation] = {'identity': _identity}
ACTIVATIONS.update({
    name: _scaled(name, BASE_FUNCTIONS[name], gamma)
    for name, gamma in GAMMAS.items()
})


def get_activation(name: str) -> Activation:
  """Returns the gamma-scaled activation called `name`.

  Args:
    name: One of the keys of `ACTIVATIONS` (e.g. 'gelu', 'relu', 'identity').

  Returns:
    A function x -> f(x) * gamma.

  Raises:
    ValueError: if `name` is unknown; the message lists the valid names.
  """
  if name not in ACTIVATIONS:
    raise ValueError(
        f'Unknown activation {name!r}; use one of {sorted(ACTIVATIONS)}.')
  return ACTIVATIONS[name]


def standard_normal_sample(num_samples: int, axis_size: int = 1,
                           seed: int = 0) -> np.ndarray:
  """A deterministic, low-discrepancy sample of independent N(0, 1) values.

  Points of a scrambled Sobol sequence in [0, 1)^axis_size are mapped through
  the inverse normal CDF. Each column is then exactly stratified, so moments are
  estimated with an error far below plain Monte Carlo (about 1e-6 relative for
  the elementwise activations at the default size, against ~1e-3 for a random
  sample of the same size), and the answer depends on `seed` only at that level.

  Args:
    num_samples: Total number of values; rounded down to axis_size * 2^k.
    axis_size: Length of the last axis (the axis glu/log_softmax act on).
    seed: Seed of the Sobol scrambling.

  Returns:
    float64 array of shape [2^k, axis_size].
  """
  if num_samples < 2 * axis_size or axis_size < 1:
    raise ValueError(
        f'Need num_samples >= 2 * axis_size >= 2, got num_samples={num_samples}, '
        f'axis_size={axis_size}; increase num_samples.')
  log2_rows = int(np.floor(np.log2(num_samples // axis_size)))
  sobol = qmc.Sobol(d=axis_size, scramble=True, seed=seed)
  u = sobol.random_base2(m=log2_rows)
  return sp_special.ndtri(u)


def compute_gamma(fn: Activation, num_samples: int = 2**20, seed: int = 0,
                  axis_size: int = 1) -> float:
  """Estimates gamma = 1 / std(fn(x)) for x ~ N(0, 1).

  The sample is `standard_normal_sample` (deterministic, high accuracy), and
  fn is applied to it in float32 as the network would; the standard deviation
  is then taken over all outputs in float64. For the elementwise activations
  the result is the population value to ~1e-6; it differs from the official
  literals by up to ~0.1 % because those were finite-sample estimates.

  Args:
    fn: The unscaled activation (e.g. `jax.nn.relu`); it receives a float32
      array of shape [rows, axis_size] and may act along the last axis.
    num_samples: Total number of N(0, 1) inputs (default 2^20).
    seed: Seed of the sample's scrambling.
    axis_size: Last-axis length; 1 for elementwise functions, 2 for glu (it
      multiplies one half by the sigmoid of the other), a few hundred for
      log_softmax (see `AXIS_SIZES`).

  Returns:
    gamma as a Python float.
  """
  x = standard_normal_sample(num_samples, axis_size=axis_size, seed=seed)
  y = np.asarray(fn(jnp.asarray(x, dtype=jnp.float32)), dtype=np.float64)
  std = float(np.std(y))
  if not np.isfinite(std) or std == 0.0:
    raise ValueError(
        f'Activation output has std {std} on N(0, 1) inputs, so gamma is '
        'undefined; pass a non-constant function that returns finite values.')
  return 1.0 / std
