"""Tests for nfnets.models.residual_scaling: the one NF residual bookkeeping, used by every family."""

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nfnets.models import nf_regnet, nf_resnet, nfnet
from nfnets.models.residual_scaling import nf_block_scalings
from nfnets.models.variants import ResNetVariant

# The F0 betas of the reference facts (depths 1, 2, 6, 3; alpha 0.2), identical in timm.
F0_BETAS = [1.0, 0.980581, 0.980581, 0.96225, 0.980581, 0.96225, 0.944911, 0.928477,
            0.912871, 0.898027, 0.980581, 0.96225]


def test_f0_betas_ramp_and_variance_reset():
  plans = nf_block_scalings((1, 2, 6, 3), alpha=0.2, stochdepth_rate=0.25)
  np.testing.assert_allclose([p.beta for p in plans], F0_BETAS, atol=1e-6)
  # Block i of N drops with rate * i / N: 0 for the first block, no rescale to the full rate.
  np.testing.assert_allclose([p.drop_rate for p in plans], [0.25 * i / 12 for i in range(12)])
  assert [p.index for p in plans] == list(range(12))
  assert [p.stage for p in plans] == [0, 1, 1, 2, 2, 2, 2, 2, 2, 3, 3, 3]
  assert [p.first_in_stage for p in plans] == [True, True, False, True] + [False] * 5 + [
      True, False, False]
  # Variance: 1 + alpha^2 after every transition, + alpha^2 per block within the stage.
  expected_var = [1.04, 1.04, 1.08, 1.04, 1.08, 1.12, 1.16, 1.20, 1.24, 1.04, 1.08, 1.12]
  np.testing.assert_allclose([p.expected_var for p in plans], expected_var, rtol=1e-12)
  # And beta is 1 / sqrt of the previous block's predicted output variance.
  np.testing.assert_allclose([p.beta for p in plans[1:]],
                             1 / np.sqrt([p.expected_var for p in plans[:-1]]), rtol=1e-12)


def test_rejects_empty_or_non_positive_depths():
  for depths in [(), (2, 0), (-1,)]:
    with pytest.raises(ValueError, match='positive block counts'):
      nf_block_scalings(depths, 0.2)


def _blocks(module, **kwargs):
  """The residual blocks a family builds (module construction only, inside a transform)."""
  found = []

  def f(x):
    model = module(**kwargs)
    found.extend(model.blocks)
    return model(x, is_training=False)['logits']

  jax.eval_shape(hk.transform(f).init, jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)))
  return found


@pytest.mark.parametrize('module,kwargs,depths', [
    (nfnet.NFNet, dict(variant=nfnet.NFNetVariant(width=(16, 32, 64, 64), depth=(2, 1, 3, 1),
                                                   group_width=8)), (2, 1, 3, 1)),
    (nf_resnet.NF_ResNet, dict(variant=ResNetVariant(depth=(2, 1, 3, 1)), width=0.25),
     (2, 1, 3, 1)),
    (nf_regnet.NF_RegNet, dict(variant=nf_regnet.NFRegNetVariant(width=(16, 32, 48, 64),
                                                                 depth=(2, 1, 3, 1))),
     (2, 1, 3, 1)),
])
def test_every_family_builds_its_blocks_from_the_schedule(module, kwargs, depths):
  blocks = _blocks(module, num_classes=3, alpha=0.3, stochdepth_rate=0.4, **kwargs)
  plans = nf_block_scalings(depths, 0.3, 0.4)
  assert [b.beta for b in blocks] == [p.beta for p in plans]
  rates = [b.stoch_depth.drop_rate if getattr(b, 'stoch_depth', None) else 0.0 for b in blocks]
  assert rates == [p.drop_rate for p in plans]
