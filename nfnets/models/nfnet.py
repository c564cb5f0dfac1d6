"""NFNet-F0..F7 (and F0+..F7+): normalizer-free ResNets (Brock et al., 2021).

"High-Performance Large-Scale Image Recognition Without Normalization",
arXiv:2102.06171. The structure, parameter names and defaults follow the
official Haiku code exactly, so official checkpoints load into this module:

  stem:  stem_conv0 (3x3/2, 16) -> act -> stem_conv1 (3x3, 32) -> act
         -> stem_conv2 (3x3, 64) -> act -> stem_conv3 (3x3/2, width[0] // 2)
  body:  four stages of NFBlocks (strides 1, 2, 2, 2; only the first block of
         a stage is strided), named nf_block, nf_block_1, ... globally
  head:  final_conv (1x1) -> act -> spatial mean ('pool') -> dropout
         (training only) -> linear (init N(0, 0.01))

Variants are data (`NFNetVariant`), so small models for tests and demos use
the same code path as the published ones.
"""

import dataclasses
from typing import Any, Dict, Mapping, Optional, Tuple, Union

import haiku as hk
import jax

from nfnets.models import activations
from nfnets.models import blocks
from nfnets.models import layers
from nfnets.models import residual_scaling
from nfnets.models import variants

_NUM_STAGES = 4
_STAGE_STRIDES = (1, 2, 2, 2)


@dataclasses.dataclass(frozen=True)
class NFNetVariant:
  """Architecture of one NFNet variant (one entry of the paper's Table 1).

  Per-stage fields accept a scalar (used for all four stages) or 4 values.

  Attributes:
    width: Output channels of each stage (before the width multiplier).
    depth: Number of blocks in each stage.
    group_width: Channels per group of the 3x3 grouped convs.
    expansion: Bottleneck width as a fraction of the block width.
    big_width: Take the bottleneck width from out_ch (True) or in_ch.
    train_imsize: Training resolution.
    test_imsize: Evaluation resolution (the paper's FLOPs use this one).
    ra_level: RandAugment setting, e.g. '405' = 4 layers, magnitude 5.
    drop_rate: Dropout rate before the classifier.
  """
  width: Tuple[int, ...]
  depth: Tuple[int, ...]
  group_width: Union[int, Tuple[int, ...]] = 128
  expansion: Union[float, Tuple[float, ...]] = 0.5
  big_width: Union[bool, Tuple[bool, ...]] = True
  train_imsize: int = 192
  test_imsize: int = 256
  ra_level: str = '405'
  drop_rate: float = 0.2

  def __post_init__(self):
    # Normalise every per-stage field to a 4-tuple (frozen: use object setattr).
    for field in ('width', 'depth', 'group_width', 'expansion', 'big_width'):
      value = getattr(self, field)
      if isinstance(value, (list, tuple)):
        value = tuple(value)
      else:
        value = (value,) * _NUM_STAGES
      if len(value) != _NUM_STAGES:
        raise ValueError(
            f'NFNetVariant.{field} needs {_NUM_STAGES} values (one per stage), '
            f'got {value}.')
      object.__setattr__(self, field, value)
    if any(int(d) < 1 for d in self.depth):
      raise ValueError(f'NFNetVariant.depth must be >= 1 per stage, got '
                       f'{self.depth}.')
    if any(int(w) < 1 for w in self.width) or any(
        int(g) < 1 for g in self.group_width):
      raise ValueError('NFNetVariant.width and group_width must be positive, '
                       f'got {self.width} and {self.group_width}.')
    if not 0.0 <= self.drop_rate < 1.0:
      raise ValueError(f'NFNetVariant.drop_rate must be in [0, 1), got '
                       f'{self.drop_rate}.')


def _official_variants() -> Dict[str, NFNetVariant]:
  """The F0..F7 table of the paper, and the wider F0+..F7+."""
  # name: (depth multiple N, train px, test px, RandAugment, dropout)
  table = {
      'F0': (1, 192, 256, '405', 0.2),
      'F1': (2, 224, 320, '410', 0.3),
      'F2': (3, 256, 352, '410', 0.4),
      'F3': (4, 320, 416, '415', 0.4),
      'F4': (5, 384, 512, '415', 0.5),
      'F5': (6, 416, 544, '415', 0.5),
      'F6': (7, 448, 576, '415', 0.5),
      'F7': (8, 480, 608, '415', 0.5),
  }
  variants = {}
  for name, (n, train_px, test_px, ra, drop) in table.items():
    for suffix, width in (('', (256, 512, 1536, 1536)),
                          ('+', (384, 768, 2048, 2048))):
      variants[name + suffix] = NFNetVariant(
          width=width, depth=tuple(n * d for d in (1, 2, 6, 3)),
          train_imsize=train_px, test_imsize=test_px, ra_level=ra,
          drop_rate=drop)
  return variants


VARIANTS: Dict[str, NFNetVariant] = _official_variants()


def resolve_variant(
    variant: Union[str, NFNetVariant, Mapping[str, Any]]) -> NFNetVariant:
  """Returns the NFNetVariant for a name, an instance, or a dict of fields (`width`, `depth`
  required), e.g. from a config file."""
  return variants.resolve_variant('NFNet', VARIANTS, NFNetVariant, variant,
                                  required=('width', 'depth'))


class NFBlock(blocks.NFResidualBlock):
  """NFNet bottleneck block: 1x1 -> 3x3 grouped -> 3x3 grouped -> 1x1 -> SE.

  Computes h_out = h + alpha * skip_gain * f(act(h) * beta), where beta
  = 1 / (expected std of h) makes the branch see a unit-variance input at init.
  skip_gain starts at 0 (SkipInit), so every block starts as the identity.
  """

  def __init__(self,
               in_ch: int,
               out_ch: int,
               expansion: float = 0.5,
               se_ratio: float = 0.5,
               kernel_shape: int = 3,
               group_size: int = 128,
               stride: int = 1,
               beta: float = 1.0,
               alpha: float = 0.2,
               activation: activations.Activation = activations.ACTIVATIONS[
                   'gelu'],
               big_width: bool = True,
               use_two_convs: bool = True,
               stochdepth_rate: Optional[float] = None,
               name: Optional[str] = None):
    """Builds the block.

    Args:
      in_ch: Input channels.
      out_ch: Output channels.
      expansion: Bottleneck width ratio.
      se_ratio: Squeeze-excite hidden ratio (of out_ch).
      kernel_shape: Kernel size of the grouped convs.
      group_size: Channels per group of the grouped convs.
      stride: Stride of conv1 (and of the average-pool shortcut).
      beta: Input pre-multiplier, 1 / expected std of the block input.
      alpha: Scale of the residual branch (variance growth per block).
      activation: Gamma-scaled activation.
      big_width: Bottleneck width from out_ch (True) or in_ch (False).
      use_two_convs: Use the extra 3x3 conv `conv1b` (the NFNet default).
      stochdepth_rate: Stochastic-depth drop rate; used if in (0, 1).
      name: Module name.
    """
    super().__init__(name=name)
    self.in_ch, self.out_ch = in_ch, out_ch
    self.stride, self.beta, self.alpha = stride, beta, alpha
    self.activation = activation
    self.use_two_convs = use_two_convs
    width = int((out_ch if big_width else in_ch) * expansion)
    # Round the bottleneck down to a whole number of groups.
    self.groups = width // group_size
    if self.groups < 1:
      raise ValueError(
          f'NFBlock bottleneck width {width} < group_size {group_size} leaves '
          'zero groups; raise the width or lower the group width.')
    self.width = group_size * self.groups
    conv = layers.WSConv2D
    self.conv0 = conv(self.width, 1, padding='SAME', name='conv0')
    self.conv1 = conv(self.width, kernel_shape, stride=stride, padding='SAME',
                      feature_group_count=self.groups, name='conv1')
    if use_two_convs:
      self.conv1b = conv(self.width, kernel_shape, stride=1, padding='SAME',
                         feature_group_count=self.groups, name='conv1b')
    self.conv2 = conv(out_ch, 1, padding='SAME', name='conv2')
    self.use_projection = stride > 1 or in_ch != out_ch
    if self.use_projection:
      self.conv_shortcut = conv(out_ch, 1, padding='SAME',
                                name='conv_shortcut')
    self.se = layers.SqueezeExcite(out_ch, out_ch, se_ratio=se_ratio)
    self.use_stochdepth = (stochdepth_rate is not None and
                           0.0 < stochdepth_rate < 1.0)
    self.stoch_depth = (layers.StochDepth(stochdepth_rate) if self.use_stochdepth
                        else None)

  def __call__(self, x: jax.Array, is_training: bool,
               scalars: Optional[blocks.BlockScalars] = None
               ) -> Tuple[jax.Array, jax.Array]:
    """Applies the block.

    Args:
      x: NHWC input with in_ch channels.
      is_training: Enables stochastic depth (needs an rng).
      scalars: beta and the stochastic-depth keep probability as arrays, when
        this block's module runs a whole stage under `lax.scan`; default its own.

    Returns:
      (output, res_avg_var): the block output and the mean per-channel
      variance of the residual branch before skip_gain (a metric).
    """
    beta = self.beta if scalars is None else scalars.beta
    out = self.activation(x) * beta
    if self.stride > 1:
      shortcut = layers.pooled_shortcut(out, self.stride, self.conv_shortcut)
    elif self.use_projection:
      shortcut = self.conv_shortcut(out)
    else:
      # Identity shortcut takes the raw input, not act(x) * beta, so the
      # variance of the skip path keeps accumulating: Var = Var(x) + alpha^2.
      shortcut = x
    out = self.conv0(out)
    out = self.conv1(self.activation(out))
    if self.use_two_convs:
      out = self.conv1b(self.activation(out))
    out = self.conv2(self.activation(out))
    # 2 * sigmoid gate: the gate is ~0.5 at init, so the branch keeps its scale.
    out = (self.se(out) * 2) * out
    return layers.merge_nf_residual(
        out, shortcut, self.alpha, is_training, stoch_depth=self.stoch_depth,
        keep_prob=None if scalars is None else scalars.keep_prob)


class NFNet(hk.Module):
  """Normalizer-Free Network (NFNet-F*), with the official parameter tree."""

  VARIANTS: Dict[str, NFNetVariant] = VARIANTS

  def __init__(self,
               num_classes: int,
               variant: Union[str, NFNetVariant, Mapping[str, Any]] = 'F0',
               width: float = 1.0,
               se_ratio: float = 0.5,
               alpha: float = 0.2,
               stochdepth_rate: float = 0.1,
               drop_rate: Optional[float] = None,
               activation: str = 'gelu',
               fc_init: Optional[hk.initializers.Initializer] = None,
               final_conv_mult: Optional[float] = 2,
               final_conv_ch: Optional[int] = None,
               use_two_convs: bool = True,
               remat: str = 'none',
               scan_blocks: bool = False,
               name: str = 'NFNet'):
    """Builds the network.

    Args:
      num_classes: Number of output logits.
      variant: 'F0'..'F7', 'F0+'..'F7+', an NFNetVariant or a dict of its fields.
      width: Multiplier of every stage width (not of the stem).
      se_ratio: Squeeze-excite hidden ratio.
      alpha: Residual branch scale; variance grows by alpha^2 per block.
      stochdepth_rate: Maximum stochastic-depth rate; block i of N gets
        rate * i / N. The official class default is 0.1; the paper used 0.25.
      drop_rate: Dropout before the classifier; None uses the variant's.
      activation: Name of a gamma-scaled activation (see nfnets.activations).
      fc_init: Classifier weight initialiser; default N(0, 0.01).
      final_conv_mult: final_conv channels = final_conv_mult * last width.
      final_conv_ch: final_conv channels, used only if final_conv_mult is None.
      use_two_convs: Use the second 3x3 conv in each block.
      remat: 'block' recomputes each block in the backward pass (less activation memory,
        ~1 extra forward pass); 'none' keeps every activation. Values are unchanged.
      scan_blocks: Run the repeated blocks of each stage as one `lax.scan`: each is
        traced once per stage; parameters and values unchanged (see
        `blocks.apply_blocks`).
      name: Module name; 'NFNet' gives the official parameter paths.
    """
    super().__init__(name=name)
    self.num_classes = variants.check_num_classes(num_classes)
    self.variant = resolve_variant(variant)
    self.width = width
    self.remat = blocks.check_remat(remat)
    self.scan_blocks = bool(scan_blocks)
    self.activation = activations.get_activation(activation)
    self.drop_rate = variants.check_rate(
        'drop_rate', self.variant.drop_rate if drop_rate is None else drop_rate)
    variants.check_rate('stochdepth_rate', stochdepth_rate)

    # Stem: total stride 4. The stem width does not follow `width`.
    ch = self.variant.width[0] // 2
    self.stem_convs = [
        layers.WSConv2D(16, 3, stride=2, padding='SAME', name='stem_conv0'),
        layers.WSConv2D(32, 3, stride=1, padding='SAME', name='stem_conv1'),
        layers.WSConv2D(64, 3, stride=1, padding='SAME', name='stem_conv2'),
        layers.WSConv2D(ch, 3, stride=2, padding='SAME', name='stem_conv3'),
    ]

    # Body: beta, the stochastic-depth ramp and the variance reset at transitions come from
    # the one NF residual scaling (see nfnets.models.residual_scaling for the derivation).
    self.blocks = []
    self.stage_ends = []  # global index of the last block of each stage
    for plan in residual_scaling.nf_block_scalings(self.variant.depth, alpha, stochdepth_rate):
      stage = plan.stage
      out_ch = int(self.variant.width[stage] * width)
      group_width = int(self.variant.group_width[stage])
      expansion = self.variant.expansion[stage]
      big_width = bool(self.variant.big_width[stage])
      mid = int((out_ch if big_width else ch) * expansion)
      if out_ch < 1 or mid // group_width < 1:
        raise ValueError(
            f'Stage {stage}: bottleneck width {mid} (= {expansion} x '
            f'{out_ch if big_width else ch} channels) is below group_width '
            f'{group_width}, which leaves zero groups; raise `width` or the '
            f'stage width, or lower group_width to <= {max(mid, 1)}.')
      self.blocks.append(NFBlock(
          ch, out_ch,
          expansion=expansion,
          se_ratio=se_ratio,
          group_size=group_width,
          stride=_STAGE_STRIDES[stage] if plan.first_in_stage else 1,
          beta=plan.beta,
          alpha=alpha,
          activation=self.activation,
          big_width=big_width,
          use_two_convs=use_two_convs,
          stochdepth_rate=plan.drop_rate))
      ch = out_ch
      if plan.first_in_stage and stage > 0:
        self.stage_ends.append(plan.index - 1)
    self.stage_ends.append(len(self.blocks) - 1)

    # Head.
    if final_conv_mult is None:
      if final_conv_ch is None:
        raise ValueError(
            'Pass final_conv_mult or final_conv_ch (both are None).')
      final_ch = int(final_conv_ch)
    else:
      final_ch = int(final_conv_mult * ch)
    self.final_conv = layers.WSConv2D(final_ch, 1, padding='SAME',
                                      name='final_conv')
    if fc_init is None:
      fc_init = hk.initializers.RandomNormal(stddev=0.01, mean=0.0)
    self.fc = hk.Linear(num_classes, w_init=fc_init, with_bias=True)

  def __call__(self, x: jax.Array, is_training: bool = True,
               return_metrics: bool = False) -> Dict[str, jax.Array]:
    """Runs the network.

    Args:
      x: NHWC images, any number of channels >= 1 (official: 3).
      is_training: Enables stochastic depth and dropout (needs an rng).
      return_metrics: Also return signal-propagation metrics:
        avg_sq_mean_i / avg_var_i (i = 0 after the stem, i = k + 1 after
        block k) and res_avg_var_k (block k's residual branch).

    Returns:
      Dict with 'logits' [B, num_classes], 'pool' [B, final_ch], 'stem' and
      'stage_0'..'stage_3' (NHWC features), plus metrics if requested.
    """
    if x.ndim != 4 or x.shape[-1] < 1:
      raise ValueError(
          f'NFNet expects NHWC images of rank 4 with >= 1 channel, got shape '
          f'{x.shape}; add the batch/channel axes (e.g. x[None] or x[..., None]).')
    outputs = {}
    out = x
    for i, conv in enumerate(self.stem_convs):
      out = conv(out)
      if i < len(self.stem_convs) - 1:  # no activation after stem_conv3
        out = self.activation(out)
    outputs['stem'] = out
    out = blocks.apply_blocks(self.blocks, out, is_training, outputs, return_metrics,
                              stage_ends=self.stage_ends, remat=self.remat,
                              scan_blocks=self.scan_blocks)
    out = self.activation(self.final_conv(out))
    return layers.classifier_head(out, self.fc, self.drop_rate, is_training, outputs)
