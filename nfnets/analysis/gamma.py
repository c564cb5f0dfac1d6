"""Estimating the activation gammas: gamma = 1 / std(f(x)) for x ~ N(0, 1).

The models use DeepMind's literal constants (`nfnets.models.activations.GAMMAS`); this module
computes the population values, to check that table and to derive gamma for a new
nonlinearity. It needs scipy (a scrambled Sobol sample and the inverse normal CDF), which is
why it is not part of `nfnets.models`.
"""

from typing import Dict

import jax.numpy as jnp
import numpy as np
from scipy import special as sp_special
from scipy.stats import qmc

from nfnets.models.activations import Activation

# Axis size used when estimating gamma for the functions that do not act
# elementwise. glu pairs two independent N(0,1) values. For log_softmax, the
# gamma depends weakly on the axis size n (about 1 + 0.14 / n, because the
# subtracted log-sum-exp varies less as n grows); the official literal 1.0002
# corresponds to an axis of a few hundred or more channels, so 256 is used.
AXIS_SIZES: Dict[str, int] = {'glu': 2, 'log_softmax': 256}


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
