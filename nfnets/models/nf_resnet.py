"""Normalizer-Free pre-activation ResNets (Brock, De & Smith, ICLR 2021).

The BN ResNet v2 of `resnet.py` with every BatchNorm removed and signal propagation kept
right analytically instead:

* each residual branch sees `act(x) * beta` with `beta = 1 / expected_std`, where the
  expected standard deviation of the skip path grows as `sqrt(std**2 + alpha**2)` per block
  and resets to 1 after each transition block (whose shortcut is a fresh conv of a unit-variance
  input);
* convs are Scaled Weight-Standardised (`WSConv2D`) and activations gamma-scaled, so each
  conv maps unit-variance inputs to unit-variance outputs;
* the branch output is multiplied by `alpha` and a scalar `skip_gain` initialised at 0 (SkipInit),
  so at initialisation every block is the identity on its (projected) shortcut.

Beta and the stochastic-depth ramp come from `nfnets.models.residual_scaling`, as for every NF
family.
"""

from __future__ import annotations

from collections.abc import Callable

import haiku as hk
import jax
import jax.numpy as jnp

from nfnets.models import variants
from nfnets.models.activations import get_activation
from nfnets.models.blocks import BlockScalars, NFResidualBlock, apply_blocks, check_remat
from nfnets.models.layers import (SqueezeExcite, StochDepth, WSConv2D, classifier_head,
                                  merge_nf_residual)
from nfnets.models.residual_scaling import nf_block_scalings
from nfnets.models.variants import (RESNET_STAGE_STRIDES, RESNET_VARIANTS, ResNetVariant,
                                    resnet_stage_widths)


class NFResBlock(NFResidualBlock):
  """Normalizer-Free pre-activation bottleneck: 1x1 -> 3x3 (strided) -> 1x1 (-> SE)."""

  def __init__(self, in_ch: int, out_ch: int, stride: int = 1, beta: float = 1.0,
               alpha: float = 0.2, activation: Callable[[jax.Array], jax.Array] = jax.nn.relu,
               stochdepth_rate: float = 0.0, use_se: bool = False, se_ratio: float = 0.25,
               bottleneck_ratio: float = 0.25,
               skip_gain_init: hk.initializers.Initializer = jnp.zeros, name: str | None = None):
    """Builds the block.

    Args:
      in_ch: Input channels.
      out_ch: Output channels.
      stride: Stride of the 3x3 conv and of the 1x1 projection shortcut.
      beta: Input pre-multiplier, 1 / expected std of the input.
      alpha: Residual branch scale.
      activation: Gamma-scaled nonlinearity.
      stochdepth_rate: Probability of dropping the residual branch per example in training.
      use_se: Whether to gate the branch with 2 * Squeeze-Excite.
      se_ratio: SE hidden width as a fraction of out_ch.
      bottleneck_ratio: Bottleneck width as a fraction of out_ch.
      skip_gain_init: Initialiser of the scalar `skip_gain` (zeros: SkipInit; ones gives the
        untrained signal-propagation plots of the paper).
      name: Module name.
    """
    super().__init__(name=name)
    self.in_ch, self.out_ch, self.stride = in_ch, out_ch, stride
    self.beta, self.alpha = beta, alpha
    self.activation = activation
    self.skip_gain_init = skip_gain_init
    self.width = int(out_ch * bottleneck_ratio)
    self.conv0 = WSConv2D(self.width, 1, name='conv0')
    self.conv1 = WSConv2D(self.width, 3, stride=stride, name='conv1')
    self.conv2 = WSConv2D(out_ch, 1, name='conv2')
    self.use_projection = stride > 1 or in_ch != out_ch
    if self.use_projection:
      # Unlike NFNets (avg-pool then conv), NF-ResNets downsample the shortcut by a strided 1x1.
      self.conv_shortcut = WSConv2D(out_ch, 1, stride=stride, name='conv_shortcut')
    self.use_se = use_se
    if use_se:
      self.se = SqueezeExcite(out_ch, out_ch, se_ratio=se_ratio)
    # Rate 0 is a no-op and rate 1 would always drop the branch: build the layer only between.
    self.stoch_depth = StochDepth(stochdepth_rate) if 0.0 < stochdepth_rate < 1.0 else None

  def __call__(self, x: jax.Array, is_training: bool,
               scalars: BlockScalars | None = None) -> tuple[jax.Array, jax.Array]:
    """Applies the block; `scalars` replaces beta and the stochastic-depth rate under a scan.

    Args:
      x: NHWC input with in_ch channels.
      is_training: Enables stochastic depth (needs an rng).
      scalars: beta and the keep probability as arrays, when this block's module runs a
        whole stage under `lax.scan` (`apply_blocks(scan_blocks=True)`); default its own.

    Returns:
      (output, res_avg_var): the block output and the mean per-channel variance of the
      residual branch before skip_gain (a metric).
    """
    beta = self.beta if scalars is None else scalars.beta
    out = self.activation(x) * beta
    # The projection sees the scaled, activated input; the identity skip keeps raw x so the
    # skip path's variance grows by exactly alpha**2 per block.
    shortcut = self.conv_shortcut(out) if self.use_projection else x
    out = self.conv0(out)
    out = self.conv1(self.activation(out))
    out = self.conv2(self.activation(out))
    if self.use_se:
      # The sigmoid gate averages ~0.5 at init; x2 keeps the branch variance near 1.
      out = 2.0 * self.se(out) * out
    return merge_nf_residual(out, shortcut, self.alpha, is_training,
                             stoch_depth=self.stoch_depth, skip_gain_init=self.skip_gain_init,
                             keep_prob=None if scalars is None else scalars.keep_prob)


class NF_ResNet(hk.Module):  # pylint: disable=invalid-name  (the paper's name)
  """Normalizer-Free pre-activation ResNet-50..600."""

  VARIANTS: dict[str, ResNetVariant] = RESNET_VARIANTS

  def __init__(self, num_classes: int, variant: str | ResNetVariant = 'ResNet50',
               width: float = 4, alpha: float = 0.2, stochdepth_rate: float = 0.1,
               drop_rate: float = 0.25, activation: str = 'relu', use_se: bool = False,
               se_ratio: float = 0.25, fc_init: hk.initializers.Initializer | None = None,
               skip_gain_init: hk.initializers.Initializer = jnp.zeros,
               remat: str = 'none', scan_blocks: bool = False, name: str = 'NF_ResNet'):
    """Builds the network.

    Args:
      num_classes: Classifier outputs.
      variant: A key of `VARIANTS` ('ResNet50'...'ResNet600') or a `ResNetVariant`, e.g.
        `ResNetVariant(depth=(1, 1, 1, 1))` for a tiny test net.
      width: Width multiplier; stage widths are width*(64, 128, 256, 512), the stem 16*width.
        4 is the paper's; fractions such as 0.25 give tiny test nets.
      alpha: Residual branch scale (variance growth alpha**2 per block).
      stochdepth_rate: Stochastic-depth rate of the (virtual) block after the last one.
      drop_rate: Dropout before the classifier. 0.25 is this project's default: the official
        code had no value for NF-ResNets (its `drop_rate=None` crashed).
      activation: Name for `activations.get_activation` (gamma-scaled).
      use_se: Whether every block has a Squeeze-Excite gate.
      se_ratio: SE hidden width as a fraction of the block output width.
      fc_init: Classifier weight initialiser; N(0, 0.01) if None.
      skip_gain_init: Initialiser of every block's scalar `skip_gain` (zeros = SkipInit).
      remat: 'block' recomputes each block in the backward pass; 'none' keeps activations.
      scan_blocks: Run the repeated blocks of each stage as one `lax.scan`: each is traced
        once per stage; parameters and values unchanged (see `blocks.apply_blocks`).
      name: Module name.
    """
    super().__init__(name=name)
    self.num_classes = variants.check_num_classes(num_classes)
    self.variant = variants.resolve_variant('NF_ResNet', RESNET_VARIANTS, ResNetVariant, variant,
                                            required=('depth',))
    self.drop_rate = variants.check_rate('drop_rate', drop_rate)
    variants.check_rate('stochdepth_rate', stochdepth_rate)
    self.remat = check_remat(remat)
    self.scan_blocks = bool(scan_blocks)
    self.activation = get_activation(activation)
    widths = resnet_stage_widths(width)
    ch = int(16 * width)
    # No with_bias here: WSConv2D always has a bias (the official with_bias=False was ignored).
    self.initial_conv = WSConv2D(ch, 7, stride=2, name='initial_conv')
    self.blocks = []
    for plan in nf_block_scalings(self.variant.depth, alpha, stochdepth_rate):
      out_ch = widths[plan.stage]
      stride = RESNET_STAGE_STRIDES[plan.stage] if plan.first_in_stage else 1
      self.blocks.append(NFResBlock(
          ch, out_ch, stride=stride, beta=plan.beta, alpha=alpha, activation=self.activation,
          stochdepth_rate=plan.drop_rate, use_se=use_se, se_ratio=se_ratio,
          skip_gain_init=skip_gain_init))
      ch = out_ch
    self.fc = hk.Linear(num_classes, with_bias=True,
                        w_init=fc_init or hk.initializers.RandomNormal(stddev=0.01, mean=0.0))

  def __call__(self, x: jax.Array, is_training: bool = True,
               return_metrics: bool = False) -> dict[str, jax.Array]:
    """Classifies NHWC images.

    Args:
      x: Images [B, H, W, C].
      is_training: Enables stochastic depth and dropout (both need an rng).
      return_metrics: Also return the per-block signal-propagation metrics.

    Returns:
      Dict with 'logits' [B, num_classes], 'pool' [B, F] (pre-dropout features) and, with
      `return_metrics`, 'avg_sq_mean_i'/'avg_var_i' (i=0: after the stem, i+1: after block i)
      and 'res_avg_var_i' (residual branch of block i, before skip_gain).
    """
    outputs = {}
    # Pre-activation: no nonlinearity after the stem conv; each block activates its input.
    out = self.initial_conv(x)
    out = hk.max_pool(out, window_shape=(1, 3, 3, 1), strides=(1, 2, 2, 1), padding='SAME')
    out = apply_blocks(self.blocks, out, is_training, outputs, return_metrics, remat=self.remat,
                       scan_blocks=self.scan_blocks)
    # No final conv: the head is just act -> global mean.
    return classifier_head(self.activation(out), self.fc, self.drop_rate, is_training, outputs)
