"""Normalizer-Free RegNets (the NF-RegNet B0-B8 of Brock, De & Smith, ICLR 2021).

EfficientNet-like inverted bottlenecks made normalizer-free with the NF-ResNet recipe
(beta / alpha bookkeeping from `nfnets.models.residual_scaling`, Scaled WS convs, gamma-scaled
activations, SkipInit gain):

* the expansion is relative to the block *input* width (2.25x), rounded down to whole groups
  of 8 channels; the very first block uses expansion 1, as EfficientNet's first MBConv does;
* the 3x3 conv is grouped (group size 8) and every stage starts with a stride-2 block;
* Squeeze-Excite sits in the middle, between the grouped conv and the projection conv, on the
  expanded width (NFNets put it after the last conv instead);
* transition shortcuts average-pool (2x2, stride 2) before their 1x1 conv;
* an EfficientNet-style 1x1 `final_conv` with int(1280 * C // 440) channels precedes pooling.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import haiku as hk
import jax
import jax.numpy as jnp

from nfnets.models import variants
from nfnets.models.activations import get_activation
from nfnets.models.blocks import BlockScalars, NFResidualBlock, apply_blocks, check_remat
from nfnets.models.layers import (SqueezeExcite, StochDepth, WSConv2D, classifier_head,
                                  merge_nf_residual, pooled_shortcut)
from nfnets.models.residual_scaling import nf_block_scalings

# The official default 'swish' is not in the gamma table (a KeyError there); it is SiLU.
_ACTIVATION_ALIASES = {'swish': 'silu'}


@dataclasses.dataclass(frozen=True)
class NFRegNetVariant:
  """One NF-RegNet size (the official `nf_regnet_params` row).

  Attributes:
    width: Output channels per stage before the model's width multiplier (four stages).
    depth: Blocks per stage.
    train_imsize: Training resolution.
    test_imsize: Evaluation resolution.
    drop_rate: Dropout rate before the classifier used when `drop_rate=None`.
  """

  width: tuple[int, ...]
  depth: tuple[int, ...]
  train_imsize: int = 224
  test_imsize: int = 224
  drop_rate: float = 0.2

  def __post_init__(self):
    width, depth = tuple(self.width), tuple(self.depth)
    if len(width) != len(depth) or not width:
      raise ValueError(f'NFRegNetVariant width {width} and depth {depth} need equal lengths.')
    if any(int(d) < 1 for d in depth) or any(int(w) < 1 for w in width):
      raise ValueError(f'NFRegNetVariant width/depth must be positive, got {width}, {depth}.')
    object.__setattr__(self, 'width', tuple(int(w) for w in width))
    object.__setattr__(self, 'depth', tuple(int(d) for d in depth))


def _variant(width, depth, train, test, drop) -> NFRegNetVariant:
  return NFRegNetVariant(width=width, depth=depth, train_imsize=train, test_imsize=test,
                         drop_rate=drop)


NF_REGNET_VARIANTS: dict[str, NFRegNetVariant] = {
    'B0': _variant((48, 104, 208, 440), (1, 3, 6, 6), 192, 224, 0.2),
    'B1': _variant((48, 104, 208, 440), (2, 4, 7, 7), 224, 256, 0.2),
    'B2': _variant((56, 112, 232, 488), (2, 4, 8, 8), 240, 272, 0.3),
    'B3': _variant((56, 128, 248, 528), (2, 5, 9, 9), 288, 320, 0.3),
    'B4': _variant((64, 144, 288, 616), (2, 6, 11, 11), 320, 384, 0.4),
    'B5': _variant((80, 168, 336, 704), (3, 7, 14, 14), 384, 456, 0.4),
    'B6': _variant((88, 184, 376, 792), (3, 8, 16, 16), 448, 528, 0.5),
    'B7': _variant((96, 208, 416, 880), (4, 10, 19, 19), 512, 600, 0.5),
    'B8': _variant((104, 232, 456, 968), (4, 11, 22, 22), 600, 672, 0.5),
}


def final_conv_channels(last_stage_ch: int) -> int:
  """Head width: EfficientNet-B0's 1280 scaled by the last stage width relative to 440."""
  return int(1280 * last_stage_ch // 440)


class NFRegBlock(NFResidualBlock):
  """NF-RegNet block: 1x1 expand -> grouped 3x3 (strided) -> 2*SE -> 1x1 project."""

  def __init__(self, in_ch: int, out_ch: int, expansion: float = 2.25, se_ratio: float = 0.5,
               group_size: int = 8, stride: int = 1, beta: float = 1.0, alpha: float = 0.2,
               activation: Callable[[jax.Array], jax.Array] = jax.nn.silu,
               stochdepth_rate: float = 0.0,
               skip_gain_init: hk.initializers.Initializer = jnp.zeros, name: str | None = None):
    """Builds the block.

    Args:
      in_ch: Input channels.
      out_ch: Output channels.
      expansion: Expanded width as a multiple of in_ch (before rounding to whole groups).
      se_ratio: SE hidden width as a fraction of the expanded width.
      group_size: Channels per group of the 3x3 conv.
      stride: Stride of the 3x3 conv (and of the shortcut's average pool).
      beta: Input pre-multiplier, 1 / expected std of the input.
      alpha: Residual branch scale.
      activation: Gamma-scaled nonlinearity.
      stochdepth_rate: Probability of dropping the residual branch per example in training.
      skip_gain_init: Initialiser of the scalar `skip_gain` (zeros = SkipInit).
      name: Module name.
    """
    super().__init__(name=name)
    self.in_ch, self.out_ch, self.stride = in_ch, out_ch, stride
    self.beta, self.alpha = beta, alpha
    self.activation = activation
    self.skip_gain_init = skip_gain_init
    # Round the expanded width down to whole groups so the grouped conv divides evenly.
    self.groups = int(in_ch * expansion) // group_size
    if self.groups < 1:
      raise ValueError(f'Block input {in_ch} x expansion {expansion} is below group_size '
                       f'{group_size}: use a larger width or a smaller group_size.')
    self.width = self.groups * group_size
    self.conv0 = WSConv2D(self.width, 1, name='conv0')
    self.conv1 = WSConv2D(self.width, 3, stride=stride, feature_group_count=self.groups,
                          name='conv1')
    self.conv2 = WSConv2D(out_ch, 1, name='conv2')
    self.use_projection = stride > 1 or in_ch != out_ch
    if self.use_projection:
      self.conv_shortcut = WSConv2D(out_ch, 1, name='conv_shortcut')
    self.se = SqueezeExcite(self.width, self.width, se_ratio=se_ratio)
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
    if self.stride > 1:
      shortcut = pooled_shortcut(out, self.stride,
                                 self.conv_shortcut if self.use_projection else None)
    elif self.use_projection:
      shortcut = self.conv_shortcut(out)
    else:
      shortcut = x
    out = self.conv0(out)
    out = self.conv1(self.activation(out))
    # SE on the raw grouped-conv output; x2 undoes the ~0.5 mean of the sigmoid gate at init.
    out = 2.0 * self.se(out) * out
    out = self.conv2(self.activation(out))
    return merge_nf_residual(out, shortcut, self.alpha, is_training,
                             stoch_depth=self.stoch_depth, skip_gain_init=self.skip_gain_init,
                             keep_prob=None if scalars is None else scalars.keep_prob)


class NF_RegNet(hk.Module):  # pylint: disable=invalid-name  (the paper's name)
  """Normalizer-Free RegNet B0-B8."""

  VARIANTS: dict[str, NFRegNetVariant] = NF_REGNET_VARIANTS

  def __init__(self, num_classes: int, variant: str | NFRegNetVariant = 'B0',
               width: float = 0.75, expansion: float = 2.25, group_size: int = 8,
               se_ratio: float = 0.5, alpha: float = 0.2, stochdepth_rate: float = 0.1,
               drop_rate: float | None = None, activation: str = 'silu',
               fc_init: hk.initializers.Initializer | None = None,
               skip_gain_init: hk.initializers.Initializer = jnp.zeros,
               remat: str = 'none', scan_blocks: bool = False, name: str = 'NF_RegNet'):
    """Builds the network.

    Args:
      num_classes: Classifier outputs.
      variant: A key of `VARIANTS` ('B0'...'B8') or an `NFRegNetVariant` (tiny test nets).
      width: Multiplier on the variant's stage widths (0.75 is the paper's).
      expansion: Inverted-bottleneck expansion of every block but the first.
      group_size: Channels per group of the 3x3 convs.
      se_ratio: SE hidden width as a fraction of the expanded width.
      alpha: Residual branch scale.
      stochdepth_rate: Stochastic-depth rate of the (virtual) block after the last one.
      drop_rate: Dropout before the classifier; None uses the variant's.
      activation: Name for `activations.get_activation`; 'swish' is accepted as 'silu'.
      fc_init: Classifier weight initialiser; zeros (the official default) if None.
      skip_gain_init: Initialiser of every block's scalar `skip_gain` (zeros = SkipInit).
      remat: 'block' recomputes each block in the backward pass; 'none' keeps activations.
      scan_blocks: Run the repeated blocks of each stage as one `lax.scan`: each is traced
        once per stage; parameters and values unchanged (see `blocks.apply_blocks`).
      name: Module name.
    """
    super().__init__(name=name)
    self.num_classes = variants.check_num_classes(num_classes)
    self.variant = variant = variants.resolve_variant(
        'NF_RegNet', NF_REGNET_VARIANTS, NFRegNetVariant, variant, required=('width', 'depth'))
    self.drop_rate = variants.check_rate(
        'drop_rate', variant.drop_rate if drop_rate is None else drop_rate)
    variants.check_rate('stochdepth_rate', stochdepth_rate)
    self.remat = check_remat(remat)
    self.scan_blocks = bool(scan_blocks)
    self.activation = get_activation(_ACTIVATION_ALIASES.get(activation, activation))
    widths = [int(w * width) for w in variant.width]
    ch = widths[0]
    self.initial_conv = WSConv2D(ch, 3, stride=2, name='initial_conv')
    self.blocks = []
    for plan in nf_block_scalings(variant.depth, alpha, stochdepth_rate):
      out_ch = widths[plan.stage]
      self.blocks.append(NFRegBlock(
          ch, out_ch, expansion=1.0 if plan.index == 0 else expansion, se_ratio=se_ratio,
          group_size=group_size, stride=2 if plan.first_in_stage else 1, beta=plan.beta,
          alpha=alpha, activation=self.activation, stochdepth_rate=plan.drop_rate,
          skip_gain_init=skip_gain_init))
      ch = out_ch
    self.final_conv = WSConv2D(final_conv_channels(ch), 1, name='final_conv')
    self.fc = hk.Linear(num_classes, w_init=fc_init or jnp.zeros, with_bias=True)

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
    out = self.initial_conv(x)
    out = apply_blocks(self.blocks, out, is_training, outputs, return_metrics, remat=self.remat,
                       scan_blocks=self.scan_blocks)
    out = self.activation(self.final_conv(out))
    return classifier_head(out, self.fc, self.drop_rate, is_training, outputs)
