"""The NF residual bookkeeping, written once for every normalizer-free family.

A normalizer-free block computes x_{k+1} = shortcut_k + alpha * g * f(act(x_k) * beta_k). Nothing
renormalises the skip path, so the variance of the block inputs has to be predicted
analytically (Brock, De & Smith, ICLR 2021, Sec. 4):

* beta_k = 1 / expected_std(x_k): the residual branch f then sees a unit-variance input, and
  scaled weight standardisation plus gamma-scaled activations keep Var f ~ 1 at init;
* the branch is uncorrelated with the skip path at init, so a block adds (alpha g)^2 to the
  variance: Var x_{k+1} = Var(shortcut_k) + (alpha g)^2, with g = 1 assumed (g is `skip_gain`,
  a trained scalar that starts at 0 -- SkipInit -- and is expected to grow to ~1);
* the first block of a stage (a transition) projects its shortcut with a WS conv of the
  unit-variance act(x) * beta, so the skip variance is reset to 1 there before that block's own
  alpha^2 is added;
* stochastic depth drops block k of N with probability stochdepth_rate * k / N (0 for the first
  block, growing linearly with depth, as the official code).

`nf_block_scalings` is the only implementation: NFNet, NF-ResNet and NF-RegNet build their blocks
from it, and `nfnets.analysis.signal_propagation` takes its predicted variances from it.
"""

import dataclasses
from typing import Sequence


@dataclasses.dataclass(frozen=True)
class BlockScaling:
  """What one residual block needs from the NF analysis.

  Attributes:
    index: Global block index (0-based, over all stages).
    stage: Stage of the block.
    first_in_stage: True for the transition block that opens a stage.
    beta: 1 / expected std of the block input.
    drop_rate: Stochastic-depth rate of the block's residual branch.
    expected_var: Predicted variance of the block output (skip gain 1).
  """
  index: int
  stage: int
  first_in_stage: bool
  beta: float
  drop_rate: float
  expected_var: float


def nf_block_scalings(depths: Sequence[int], alpha: float,
                      stochdepth_rate: float = 0.0) -> list[BlockScaling]:
  """Per-block beta, stochastic-depth rate and predicted output variance.

  Args:
    depths: Blocks per stage, e.g. (1, 2, 6, 3) for NFNet-F0.
    alpha: Residual branch scale; each block adds alpha**2 to the skip-path variance.
    stochdepth_rate: Block k of N drops its branch with probability stochdepth_rate * k / N.

  Returns:
    One `BlockScaling` per block, in order.
  """
  depths = [int(d) for d in depths]
  if not depths or any(d < 1 for d in depths):
    raise ValueError(f'depths must be positive block counts per stage, got {depths!r}.')
  num_blocks = sum(depths)
  plans = []
  expected_std = 1.0
  for stage, depth in enumerate(depths):
    for block_index in range(depth):
      first = block_index == 0
      beta = 1.0 / expected_std
      # The transition's shortcut is a WS conv of a unit-variance input: the variance is back
      # to 1 there, and this block's own branch still adds alpha**2. (The arithmetic is the
      # official code's, so the betas equal the released models' to the last bit.)
      expected_std = ((1.0 if first else expected_std) ** 2 + alpha ** 2) ** 0.5
      plans.append(BlockScaling(index=len(plans), stage=stage, first_in_stage=first, beta=beta,
                             drop_rate=stochdepth_rate * len(plans) / num_blocks,
                             expected_var=expected_std ** 2))
  return plans
