"""Parameter trees shared by the weights tests (not a test module)."""

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np

from nfnets.models.nfnet import NFNet, NFNetVariant

# Uneven depths so depth inference and the global block index are exercised.
_TINY = NFNetVariant(width=(16, 32, 64, 64), depth=(1, 2, 1, 2), group_width=8)


def _shapes(variant, num_classes):
  forward = hk.transform(lambda x: NFNet(num_classes, variant)(x, is_training=False))
  return jax.eval_shape(forward.init, jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)))


def _random_params(shapes, seed=0):
  rng = np.random.default_rng(seed)
  return {m: {n: rng.normal(size=s.shape).astype(np.float32) for n, s in inner.items()}
          for m, inner in shapes.items()}




def _assert_trees_equal(a, b):
  assert set(a) == set(b)
  for module in a:
    assert set(a[module]) == set(b[module]), module
    for name in a[module]:
      x, y = np.asarray(a[module][name]), np.asarray(b[module][name])
      assert x.dtype == y.dtype and x.shape == y.shape, (module, name)
      as_bytes = lambda z: z.reshape(-1).view(np.uint8)  # Bit-exact, NaNs included.
      np.testing.assert_array_equal(as_bytes(x), as_bytes(y))
