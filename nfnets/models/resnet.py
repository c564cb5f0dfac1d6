"""The BatchNorm ResNet baseline of the NF-ResNet paper (Brock, De & Smith, ICLR 2021).

Pre-activation ResNet v2 (He et al. 2016b) by default, post-activation v1 optionally, both with
bottleneck blocks, `hk.BatchNorm` (so the forward pass needs Haiku state) and an optional
Squeeze-Excite. The NF-ResNet in `nf_resnet.py` is this network with every BatchNorm removed,
so the two share the variant table (`ResNetVariant`, `RESNET_VARIANTS`) of `variants.py`.

Signal-propagation metrics (`return_metrics=True`) use the NF-ResNet paper's indexing:
`avg_sq_mean_0`/`avg_var_0` describe the stem output, `avg_*_{i+1}` the output of block `i`
and `res_avg_var_{i}` the variance of block `i`'s residual branch.
"""

from __future__ import annotations

from collections.abc import Callable

import haiku as hk
import jax
import jax.numpy as jnp

from nfnets.models import variants
from nfnets.models.blocks import apply_blocks, check_remat
from nfnets.models.layers import SqueezeExcite, classifier_head
from nfnets.models.variants import (RESNET_STAGE_STRIDES, RESNET_VARIANTS, ResNetVariant,
                                    resnet_stage_widths)

# Plain activations: BatchNorm re-normalises, so no gamma scaling is wanted here.
BN_ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    'relu': jax.nn.relu,
    'silu': jax.nn.silu,
    'gelu': jax.nn.gelu,
    'elu': jax.nn.elu,
}


class ResBlockV2(hk.Module):
  """Pre-activation bottleneck: BN-act before each conv, projection on act(BN(x))."""

  def __init__(self, out_ch: int, stride: int = 1, use_projection: bool = False,
               activation: Callable[[jax.Array], jax.Array] = jax.nn.relu,
               bn_factory: Callable[..., hk.BatchNorm] = hk.BatchNorm,
               use_se: bool = False, se_ratio: float = 0.25, name: str | None = None):
    """Builds the block.

    Args:
      out_ch: Output channels; the bottleneck is out_ch // 4 wide.
      stride: Stride of the 3x3 conv and of the projection shortcut.
      use_projection: Whether the shortcut is a strided 1x1 conv (first block of a stage).
      activation: Elementwise nonlinearity.
      bn_factory: Builds a BatchNorm given `name=`.
      use_se: Whether to gate the residual branch with Squeeze-Excite.
      se_ratio: SE hidden width as a fraction of out_ch.
      name: Module name.
    """
    super().__init__(name=name)
    self.out_ch, self.stride, self.use_projection = out_ch, stride, use_projection
    self.activation = activation
    self.use_se = use_se
    mid = out_ch // 4
    self.bn0 = bn_factory(name='bn0')
    self.conv0 = hk.Conv2D(mid, 1, with_bias=False, padding='SAME', name='conv0')
    self.bn1 = bn_factory(name='bn1')
    self.conv1 = hk.Conv2D(mid, 3, stride=stride, with_bias=False, padding='SAME', name='conv1')
    self.bn2 = bn_factory(name='bn2')
    self.conv2 = hk.Conv2D(out_ch, 1, with_bias=False, padding='SAME', name='conv2')
    if use_projection:
      self.conv_shortcut = hk.Conv2D(out_ch, 1, stride=stride, with_bias=False, padding='SAME',
                                     name='conv_shortcut')
    if use_se:
      self.se = SqueezeExcite(out_ch, out_ch, se_ratio=se_ratio)

  def __call__(self, x: jax.Array, is_training: bool) -> tuple[jax.Array, jax.Array]:
    out = self.activation(self.bn0(x, is_training))
    # v2 projects the normalised input, so the skip path of a transition is normalised too.
    shortcut = self.conv_shortcut(out) if self.use_projection else x
    out = self.conv0(out)
    out = self.conv1(self.activation(self.bn1(out, is_training)))
    out = self.conv2(self.activation(self.bn2(out, is_training)))
    if self.use_se:
      # No x2 here: BatchNorm restores the scale that the sigmoid gate (~0.5) removes.
      out = self.se(out) * out
    res_avg_var = jnp.mean(jnp.var(out, axis=(0, 1, 2)))
    return out + shortcut, res_avg_var


class ResBlockV1(ResBlockV2):
  """Post-activation bottleneck (the original ResNet): conv-BN-act, act after the sum."""

  def __init__(self, out_ch: int, stride: int = 1, use_projection: bool = False,
               activation: Callable[[jax.Array], jax.Array] = jax.nn.relu,
               bn_factory: Callable[..., hk.BatchNorm] = hk.BatchNorm,
               use_se: bool = False, se_ratio: float = 0.25, name: str | None = None):
    """Same arguments as `ResBlockV2`; v1 adds a BatchNorm on the projection shortcut."""
    super().__init__(out_ch, stride, use_projection, activation, bn_factory, use_se, se_ratio,
                     name=name)
    if use_projection:
      self.shortcut_bn = bn_factory(name='shortcut_bn')

  def __call__(self, x: jax.Array, is_training: bool) -> tuple[jax.Array, jax.Array]:
    shortcut = x
    if self.use_projection:
      shortcut = self.shortcut_bn(self.conv_shortcut(x), is_training)
    # In v1 bn0..bn2 normalise conv outputs (bottleneck width), not the block input.
    out = self.activation(self.bn0(self.conv0(x), is_training))
    out = self.activation(self.bn1(self.conv1(out), is_training))
    out = self.bn2(self.conv2(out), is_training)
    if self.use_se:
      out = self.se(out) * out
    res_avg_var = jnp.mean(jnp.var(out, axis=(0, 1, 2)))
    return self.activation(out + shortcut), res_avg_var


class ResNet(hk.Module):
  """BatchNorm ResNet-50..600 (v2 pre-activation by default), the NF-ResNet's baseline."""

  VARIANTS = RESNET_VARIANTS

  def __init__(self, num_classes: int, variant: str | ResNetVariant = 'ResNet50',
               width: float = 4, preactivation: bool = True, activation: str = 'relu',
               drop_rate: float = 0.0, use_se: bool = False, se_ratio: float = 0.25,
               bn_decay_rate: float = 0.9, bn_eps: float = 1e-5,
               bn_cross_replica_axis: str | None = None,
               fc_init: hk.initializers.Initializer | None = None, remat: str = 'none',
               scan_blocks: bool = False, name: str = 'ResNet'):
    """Builds the network.

    Args:
      num_classes: Classifier outputs.
      variant: A key of `VARIANTS` ('ResNet50'...'ResNet600') or a `ResNetVariant`, e.g.
        `ResNetVariant(depth=(1, 1, 1, 1))` for a tiny test net.
      width: Width multiplier; stage widths are width*(64, 128, 256, 512), the stem 16*width.
        4 is the standard ResNet; fractions such as 0.25 give tiny test nets.
      preactivation: True for ResNet v2 (He et al. 2016b), False for v1.
      activation: One of `BN_ACTIVATIONS` (not gamma-scaled).
      drop_rate: Dropout rate before the classifier, training only (official default 0).
      use_se: Whether every block has a Squeeze-Excite gate.
      se_ratio: SE hidden width as a fraction of the block output width.
      bn_decay_rate: Moving-average decay of the BatchNorm statistics.
      bn_eps: BatchNorm variance epsilon.
      bn_cross_replica_axis: pmap axis name to average batch statistics over, if any.
      fc_init: Classifier weight initialiser; zeros (the official default) if None.
      remat: 'block' recomputes each block in the backward pass; 'none' keeps activations.
      scan_blocks: Accepted so every family takes the same execution options; BatchNorm
        blocks update per-block moving statistics, so they always run one by one.
      name: Module name.
    """
    super().__init__(name=name)
    if activation not in BN_ACTIVATIONS:
      raise ValueError(f'Unknown activation {activation!r}; use one of {sorted(BN_ACTIVATIONS)}.')
    self.num_classes = variants.check_num_classes(num_classes)
    self.drop_rate = variants.check_rate('drop_rate', drop_rate)
    self.remat = check_remat(remat)
    del scan_blocks  # See Args: BatchNorm blocks always run one by one.
    self.variant = variants.resolve_variant('ResNet', RESNET_VARIANTS, ResNetVariant, variant,
                                            required=('depth',))
    self.preactivation = preactivation
    self.activation = BN_ACTIVATIONS[activation]

    def bn_factory(name: str) -> hk.BatchNorm:
      return hk.BatchNorm(create_scale=True, create_offset=True, decay_rate=bn_decay_rate,
                          eps=bn_eps, cross_replica_axis=bn_cross_replica_axis, name=name)

    widths = resnet_stage_widths(width)
    self.initial_conv = hk.Conv2D(int(16 * width), 7, stride=2, with_bias=False, padding='SAME',
                                  name='initial_conv')
    if not preactivation:
      self.initial_bn = bn_factory('initial_bn')
    block_cls = ResBlockV2 if preactivation else ResBlockV1
    self.blocks = []
    for out_ch, depth, stride in zip(widths, self.variant.depth, RESNET_STAGE_STRIDES):
      for block_index in range(depth):
        self.blocks.append(block_cls(
            out_ch, stride=stride if block_index == 0 else 1,
            use_projection=block_index == 0, activation=self.activation,
            bn_factory=bn_factory, use_se=use_se, se_ratio=se_ratio))
    if preactivation:
      # v2 blocks end on a raw sum, so the head normalises once more before pooling.
      self.final_bn = bn_factory('final_bn')
    self.fc = hk.Linear(num_classes, w_init=fc_init or jnp.zeros, with_bias=True)

  def __call__(self, x: jax.Array, is_training: bool,
               return_metrics: bool = False) -> dict[str, jax.Array]:
    """Classifies NHWC images.

    Args:
      x: Images [B, H, W, C].
      is_training: Batch statistics (and their moving-average update) and dropout if True.
      return_metrics: Also return the per-block signal-propagation metrics.

    Returns:
      Dict with 'logits' [B, num_classes], 'pool' [B, F] (pre-dropout features) and, with
      `return_metrics`, 'avg_sq_mean_i', 'avg_var_i', 'res_avg_var_i'.
    """
    outputs = {}
    out = self.initial_conv(x)
    if not self.preactivation:
      out = self.activation(self.initial_bn(out, is_training))
    out = hk.max_pool(out, window_shape=(1, 3, 3, 1), strides=(1, 2, 2, 1), padding='SAME')
    out = apply_blocks(self.blocks, out, is_training, outputs, return_metrics, remat=self.remat)
    if self.preactivation:
      out = self.activation(self.final_bn(out, is_training))
    return classifier_head(out, self.fc, self.drop_rate, is_training, outputs)

