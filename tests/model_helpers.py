"""Helpers shared by the model-family tests: Haiku transforms and compile-free builds.

Full-size checks (parameter counts, output shapes) trace `init` abstractly with
`jax.eval_shape`, so no XLA program is compiled; only each family's one tiny network is.
"""

import math
from typing import Any, Optional

import haiku as hk
import jax
import jax.numpy as jnp

# Backend optimisation dominates CPU compile time and buys nothing for the tiny test nets.
FAST_COMPILE = {'xla_backend_optimization_level': 0}


def transform(module: Any, shapes: Optional[dict] = None, **kwargs) -> hk.TransformedWithState:
  """`module(**kwargs)` as a transformed forward; a `shapes` dict records the output shapes."""
  def forward(images, is_training, return_metrics=False):
    outputs = module(**kwargs)(images, is_training=is_training, return_metrics=return_metrics)
    if shapes is not None:
      shapes.update({k: v.shape for k, v in outputs.items()})  # static, safe to keep
    return outputs
  return hk.transform_with_state(forward)


def abstract_build(module: Any, image_size: int = 32, **kwargs) -> tuple[Any, Any, dict]:
  """(params, state, output shapes) from one abstract trace of init on 2 images."""
  shapes = {}
  forward = transform(module, shapes, **kwargs)
  images = jax.ShapeDtypeStruct((2, image_size, image_size, 3), jnp.float32)
  params, state = jax.eval_shape(lambda rng, x: forward.init(rng, x, True),
                                 jax.random.PRNGKey(0), images)
  return params, state, shapes


def count(tree: Any) -> int:
  """Number of scalars in a (possibly abstract) parameter tree."""
  return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))
