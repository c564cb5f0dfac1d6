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
uses. `nfnets.analysis.gamma.compute_gamma` computes the population value, for new
activations and for checking the table (it needs scipy, so it lives outside the models).
"""

from typing import Callable, Dict

import jax
import jax.numpy as jnp

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
