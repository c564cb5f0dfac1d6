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


def nf_tiny_run(forward: hk.TransformedWithState, image_size: int = 32) -> dict:
  """Compiles init, a train step and an eval of a tiny NF net; runs them at skip_gain 0 and 1.

  Three compilations serve a whole test module. Returns 'params', 'state' and, per skip-gain
  setting (0: as initialised, 1: every `skip_gain` set to one), two train results
  ((loss, outputs), grads) and two eval outputs under rng keys 1 and 2: 'train0', 'train1',
  'eval0', 'eval1'.
  """
  rng = jax.random.PRNGKey(0)
  images = jax.random.normal(rng, (4, image_size, image_size, 3))
  labels = jnp.arange(4)
  params, state = jax.jit(lambda r, x: forward.init(r, x, True),
                          compiler_options=FAST_COMPILE)(rng, images)

  def loss_fn(p, r):
    outputs, _ = forward.apply(p, state, r, images, True, return_metrics=True)
    logp = jax.nn.log_softmax(outputs['logits'])
    return -jnp.mean(logp[jnp.arange(4), labels]), outputs

  train = jax.jit(jax.value_and_grad(loss_fn, has_aux=True), compiler_options=FAST_COMPILE)
  evaluate = jax.jit(lambda p, r: forward.apply(p, state, r, images, False,
                                                return_metrics=True)[0],
                     compiler_options=FAST_COMPILE)
  ones = hk.data_structures.map(
      lambda m, n, v: jnp.ones_like(v) if n == 'skip_gain' else v, params)
  keys = [jax.random.PRNGKey(k) for k in (1, 2)]
  return {
      'params': params, 'state': state,
      'train0': [train(params, k) for k in keys], 'train1': [train(ones, k) for k in keys],
      'eval0': [evaluate(params, k) for k in keys], 'eval1': [evaluate(ones, k) for k in keys],
  }
