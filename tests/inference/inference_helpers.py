"""Tiny models with random (not initial) weights, shared by the inference tests.

Not a test module. Weights are perturbed away from their initial values (gains and biases
jittered, skip gains non-zero) so that weight standardisation, gains and every residual branch
matter: folding or exporting a network whose branches are switched off would prove nothing.
"""

import jax
import numpy as np

from nfnets.models import registry
from nfnets.models.variants import ResNetVariant

TINY = {
    "NFNet": dict(variant=dict(width=(16, 32, 64, 64), depth=(1, 1, 1, 1), group_width=8)),
    "NF_ResNet": dict(variant=ResNetVariant(depth=(1, 1, 1, 1)), width=0.25),
    "NF_RegNet": dict(variant=dict(width=(16, 32, 48, 64), depth=(1, 1, 1, 1))),
}


def random_params(name: str, num_classes: int = 10, size: int = 32, seed: int = 0) -> dict:
  forward = registry.make_forward(name, num_classes, **TINY[name])
  shapes, _ = jax.eval_shape(lambda: forward.init(jax.random.PRNGKey(0),
                                                  np.zeros((1, size, size, 3), np.float32),
                                                  is_training=True))
  rng = np.random.default_rng(seed)
  params = {}
  for module, leaves in shapes.items():
    params[module] = {}
    for leaf, shape in leaves.items():
      if leaf == "gain":
        value = 1.0 + 0.2 * rng.standard_normal(shape.shape)
      elif leaf == "skip_gain":
        value = rng.uniform(0.5, 1.5, shape.shape)
      elif leaf in ("bias", "b"):
        value = 0.1 * rng.standard_normal(shape.shape)
      else:
        fan_in = int(np.prod(shape.shape[:-1])) or 1
        value = rng.standard_normal(shape.shape) / np.sqrt(fan_in)
      params[module][leaf] = value.astype(np.float32)
  return params
