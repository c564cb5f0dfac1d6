"""Layers shared by the normalizer-free model families.

Parameter names and module paths follow the official DeepMind code, so that
official checkpoints load into these modules unchanged:

- `WSConv2D`: a `hk.Conv2D` with Scaled Weight Standardisation; params `w`
  (HWIO), `gain` (O,) and `bias` (O,).
- `SqueezeExcite`: returns the sigmoid gate; sub-modules `linear`, `linear_1`.
- `StochDepth`: drops whole residual branches per example while training.
- `signal_metrics`: signal-propagation statistics of an NHWC activation.
- `pooled_shortcut`, `merge_nf_residual`, `classifier_head`: the transition shortcut, block
  ending and head the families share (`nfnets.models.blocks` runs the blocks between them).

All layers compute in the dtype of their inputs and parameters: bf16 training
casts the parameters to bf16 and feeds bf16 images, so nothing here upcasts.
"""

import contextlib
import contextvars
import functools
from typing import Callable, Dict, Iterator, Optional, Sequence, Union

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np

IntOrPair = Union[int, Sequence[int]]

# Inside `folded_weight_standardization()`, WSConv2D reads an already standardised kernel.
_FOLDED = contextvars.ContextVar('nfnets_folded_weight_standardization', default=False)


@contextlib.contextmanager
def folded_weight_standardization() -> Iterator[None]:
  """Within this context (at trace time), every WSConv2D is a plain convolution.

  At inference the standardised kernel (w - mean) * gain / sqrt(max(N var, eps)) is a
  constant, so it can be computed once (`nfnets.inference.folding`) and stored as `w`, with
  no `gain`. The network then runs `lax.conv` only, which every serving stack understands.
  """
  token = _FOLDED.set(True)
  try:
    yield
  finally:
    _FOLDED.reset(token)


@functools.partial(jax.jit, static_argnames=('eps',))
def standardize_weight(w: jax.Array, gain: jax.Array,
                       eps: float = 1e-4) -> jax.Array:
  """Scaled weight standardisation of an HWIO kernel (see WSConv2D).

  Jitted so that tracing a deep model binds one cached call per conv instead
  of a dozen primitives: eval_shape of the big NFNets is ~2x faster.

  Args:
    w: Kernel [kh, kw, in / groups, out].
    gain: Per-output-channel gain [out].
    eps: Floor on fan_in * var.

  Returns:
    (w - mean) * gain / sqrt(max(fan_in * var, eps)), stats over (H, W, I).
  """
  fan_in = int(np.prod(w.shape[:-1]))
  mean = jnp.mean(w, axis=(0, 1, 2), keepdims=True)
  var = jnp.var(w, axis=(0, 1, 2), keepdims=True)  # biased (ddof=0)
  # Fused form: one multiply and one subtract on the kernel instead of a divide
  # per element.
  scale = jax.lax.rsqrt(jnp.maximum(var * fan_in, eps)) * gain
  shift = mean * scale
  return w * scale - shift


class WSConv2D(hk.Conv2D):
  """2D convolution with Scaled Weight Standardisation and a learnable gain.

  Why: without BatchNorm, nothing renormalises the activations, so each conv
  must preserve variance by construction. For y = sum_k w_k x_k over the fan-in
  N = kh * kw * (in_ch / groups), with x_k of unit variance and independent,
  Var(y) = sum_k w_k^2 = N * (Var(w) + mean(w)^2). Standardising each output
  filter to zero mean and variance 1/N gives Var(y) = 1 (Brock et al. 2021a,
  eq. 2), whatever the initial weights. The mean is removed because a non-zero
  mean makes the output's mean grow with depth (the "mean shift" issue).

  Formula, per output channel o, with mean and biased variance over (H, W, I):
    w_hat = (w - mean) * gain / sqrt(max(N * var, eps)).
  eps = 1e-4 is a floor (max) on N * var, not an additive term: it only
  matters for (near-)constant filters, which it keeps from dividing by zero.
  (timm instead adds N * 1e-5, a small systematic difference.)

  The `bias` is always added; `with_bias` is not an option. Any activation
  gamma lives in the activation function, not here.
  """

  def __init__(self,
               output_channels: int,
               kernel_shape: IntOrPair,
               stride: IntOrPair = 1,
               padding: Union[str, Sequence[tuple[int, int]]] = 'SAME',
               feature_group_count: int = 1,
               w_init: Optional[hk.initializers.Initializer] = None,
               eps: float = 1e-4,
               name: Optional[str] = None):
    """Builds the module.

    Args:
      output_channels: Number of output channels O.
      kernel_shape: Kernel size, an int or (kh, kw).
      stride: Stride, an int or (sh, sw).
      padding: 'SAME' (every official NF model), 'VALID', or explicit pairs.
      feature_group_count: Number of groups of a grouped convolution; the
        input channel count must be divisible by it.
      w_init: Initialiser of `w`. Default: VarianceScaling(1, 'fan_in',
        'normal'), an untruncated normal with std 1/sqrt(fan_in), as official.
      eps: Floor on fan_in * var(w) inside the rsqrt. Default 1e-4.
      name: Module name.
    """
    super().__init__(
        output_channels=output_channels,
        kernel_shape=kernel_shape,
        stride=stride,
        padding=padding,
        with_bias=True,
        w_init=w_init,
        data_format='NHWC',
        feature_group_count=feature_group_count,
        name=name)
    if output_channels < 1 or feature_group_count < 1:
      raise ValueError(
          f'WSConv2D needs output_channels >= 1 and feature_group_count >= 1, '
          f'got {output_channels} and {feature_group_count}.')
    if output_channels % feature_group_count:
      raise ValueError(
          f'output_channels={output_channels} must be divisible by '
          f'feature_group_count={feature_group_count}; change one of them.')
    self.eps = eps

  def standardized_weights(self, in_channels: int,
                           dtype: jnp.dtype = jnp.float32) -> jax.Array:
    """Creates/reads `w` and `gain` and returns the standardised HWIO kernel.

    Args:
      in_channels: Number of input channels of the convolution.
      dtype: dtype used to create the parameters at init time.

    Returns:
      w_hat with shape kernel_shape + (in_channels // groups, output_channels).
    """
    w_shape = self.kernel_shape + (in_channels // self.feature_group_count,
                                   self.output_channels)
    w_init = self.w_init
    if w_init is None:
      w_init = hk.initializers.VarianceScaling(1.0, 'fan_in', 'normal')
    w = hk.get_parameter('w', w_shape, dtype, init=w_init)
    if _FOLDED.get():
      return w  # Already standardised, gain included (see folded_weight_standardization).
    gain = hk.get_parameter('gain', (self.output_channels,), w.dtype,
                            init=jnp.ones)
    return standardize_weight(w, gain, self.eps)

  def __call__(self, inputs: jax.Array, *,
               precision: Optional[jax.lax.Precision] = None) -> jax.Array:
    """Applies the convolution.

    Args:
      inputs: NHWC array.
      precision: Optional precision passed to the XLA convolution.

    Returns:
      NHWC array with `output_channels` channels.
    """
    if inputs.ndim != 4:
      raise ValueError(
          f'{self.module_name} expects NHWC inputs of rank 4, got shape '
          f'{inputs.shape}; add a batch axis or reshape.')
    in_ch = inputs.shape[-1]
    if in_ch % self.feature_group_count:
      raise ValueError(
          f'{self.module_name}: input channels {in_ch} are not divisible by '
          f'feature_group_count={self.feature_group_count}; change the width '
          'or the group width.')
    w_hat = self.standardized_weights(in_ch, inputs.dtype)
    # Mixed precision with f32 params and bf16 inputs: convolve in the input
    # dtype (a no-op when both are the same, the usual case).
    w_hat = w_hat.astype(inputs.dtype)
    out = jax.lax.conv_general_dilated(
        inputs,
        w_hat,
        window_strides=self.stride,
        padding=self.padding,
        lhs_dilation=self.lhs_dilation,
        rhs_dilation=self.kernel_dilation,
        dimension_numbers=self.dimension_numbers,
        feature_group_count=self.feature_group_count,
        precision=precision)
    bias = hk.get_parameter('bias', (self.output_channels,), inputs.dtype,
                            init=jnp.zeros)
    return out + bias.astype(out.dtype)


class SqueezeExcite(hk.Module):
  """Squeeze-and-Excite gate: sigmoid(fc1(relu(fc0(mean_hw(x))))).

  Returns the gate only, shaped [B, 1, 1, out_ch]; the NFNet block multiplies
  its branch by 2 * gate, so that at init (gate ~ 0.5) the branch keeps its
  variance. The hidden activation is plain ReLU, not gamma-scaled: the paper's
  appendix says GELU but the official code and released weights use ReLU.
  """

  def __init__(self,
               in_ch: int,
               out_ch: int,
               se_ratio: float = 0.5,
               hidden_ch: Optional[int] = None,
               activation: Callable[[jax.Array], jax.Array] = jax.nn.relu,
               name: Optional[str] = None):
    """Builds the module.

    Args:
      in_ch: Channels of the input.
      out_ch: Channels of the gate.
      se_ratio: Hidden width as a fraction of in_ch (ignored if hidden_ch).
      hidden_ch: Explicit hidden width; default max(1, int(in_ch * se_ratio)).
      activation: Hidden activation; default ReLU as the official code.
      name: Module name; default 'squeeze_excite'.
    """
    super().__init__(name=name)
    self.in_ch, self.out_ch = in_ch, out_ch
    if hidden_ch is None:
      self.hidden_ch = max(1, int(in_ch * se_ratio))
    else:
      self.hidden_ch = hidden_ch
    if self.hidden_ch < 1 or out_ch < 1:
      raise ValueError(
          f'SqueezeExcite needs hidden_ch >= 1 and out_ch >= 1, got '
          f'{self.hidden_ch} and {out_ch}; raise se_ratio or hidden_ch.')
    self.activation = activation
    # Created here so the module names are 'linear' and 'linear_1', as in the
    # official parameter tree. Haiku's default init (truncated normal with std
    # 1/sqrt(fan_in), zero bias) is what the official code uses.
    self.fc0 = hk.Linear(self.hidden_ch, with_bias=True)
    self.fc1 = hk.Linear(self.out_ch, with_bias=True)

  def __call__(self, x: jax.Array) -> jax.Array:
    """Returns the gate for an NHWC input.

    Args:
      x: NHWC array with in_ch channels.

    Returns:
      Sigmoid gate of shape [B, 1, 1, out_ch], same dtype as x.
    """
    h = jnp.mean(x, axis=(1, 2))
    h = self.fc1(self.activation(self.fc0(h)))
    return jax.nn.sigmoid(h)[:, None, None]


class StochDepth(hk.Module):
  """Stochastic depth: drops the residual branch of whole examples.

  While training, each example's branch is kept with probability
  1 - drop_rate via the mask floor(keep + U[0, 1)), shaped [B, 1, 1, 1].
  The official NFNets do not rescale by 1/keep (scale_by_keep=False), unlike
  timm's DropPath. At evaluation it is the identity and draws no randomness.
  """

  def __init__(self, drop_rate: float, scale_by_keep: bool = False,
               name: Optional[str] = None):
    """Builds the module.

    Args:
      drop_rate: Probability in [0, 1) of dropping an example's branch.
      scale_by_keep: Divide kept branches by (1 - drop_rate).
      name: Module name.
    """
    super().__init__(name=name)
    if not 0.0 <= drop_rate < 1.0:
      raise ValueError(
          f'StochDepth drop_rate must be in [0, 1), got {drop_rate}; lower it.')
    self.drop_rate = drop_rate
    self.scale_by_keep = scale_by_keep

  def __call__(self, x: jax.Array, is_training: bool,
               keep_prob: Optional[jax.Array] = None) -> jax.Array:
    """Applies the per-example mask (training) or returns x (evaluation).

    Args:
      x: Array whose first axis is the batch.
      is_training: Whether to drop; needs an rng (hk.next_rng_key) if so.
      keep_prob: 1 - drop rate as a scalar array of x's dtype, for a block run under
        `lax.scan` whose rate is a scanned input; default 1 - `drop_rate`.

    Returns:
      Array like x.
    """
    if not is_training or self.drop_rate == 0.0:
      return x
    keep = 1.0 - self.drop_rate if keep_prob is None else keep_prob
    mask_shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    r = jax.random.uniform(hk.next_rng_key(), mask_shape, dtype=x.dtype)
    # floor(keep + U) is 1 with probability keep and 0 otherwise.
    mask = jnp.floor(keep + r)
    if self.scale_by_keep:
      x = x / keep
    return x * mask


def signal_metrics(x: jax.Array, i: Union[int, str]) -> Dict[str, jax.Array]:
  """Signal-propagation statistics of an NHWC activation.

  Args:
    x: NHWC array.
    i: Index or label appended to the metric names.

  Returns:
    {'avg_sq_mean_i': mean over channels of the squared per-channel mean,
     'avg_var_i': mean over channels of the per-channel (biased) variance},
    the statistics taken over the batch and spatial axes.
  """
  return {
      f'avg_sq_mean_{i}': jnp.mean(jnp.mean(x, axis=(0, 1, 2)) ** 2),
      f'avg_var_{i}': jnp.mean(jnp.var(x, axis=(0, 1, 2))),
  }


def pooled_shortcut(x: jax.Array, stride: int, conv: Optional[hk.Module]) -> jax.Array:
  """The shortcut of a strided NF transition: 2x2 average pool, then an optional 1x1 conv.

  Averaging before the 1x1 conv (instead of a strided 1x1 conv, which would discard 3/4 of the
  positions) lets the projection see every input pixel. 'SAME' pooling divides by the number of
  valid positions, so odd sizes are handled too. NFNet and NF-RegNet transitions use it;
  NF-ResNets keep the strided 1x1 conv of the original ResNet.

  Args:
    x: NHWC input (already act(x) * beta).
    stride: The block's stride (> 1).
    conv: The 1x1 projection, or None when the channel count does not change.

  Returns:
    NHWC shortcut at the block's output resolution.
  """
  window = (1, stride, stride, 1)
  shortcut = hk.avg_pool(x, window_shape=window, strides=window, padding='SAME')
  return conv(shortcut) if conv is not None else shortcut


def merge_nf_residual(branch: jax.Array, shortcut: jax.Array, alpha: float, is_training: bool,
                      stoch_depth: Optional[StochDepth] = None,
                      skip_gain_init: hk.initializers.Initializer = jnp.zeros,
                      keep_prob: Optional[jax.Array] = None
                      ) -> "tuple[jax.Array, jax.Array]":
  """The end of every NF block: shortcut + alpha * skip_gain * branch.

  Creates the scalar parameter 'skip_gain' in the calling block's scope (a function, not a
  module, so the official parameter path '<block>/skip_gain' is kept).

  Args:
    branch: Output of the residual branch.
    shortcut: The skip path (identity or projection).
    alpha: The per-block variance growth rate; with skip_gain = 1 the skip path's variance
      grows by alpha**2 per block.
    is_training: Stochastic depth drops branches only when True.
    stoch_depth: Optional `StochDepth`, applied after the metric below is taken.
    skip_gain_init: Zeros (SkipInit: every block starts as the identity) or e.g. ones.
    keep_prob: Passed to `stoch_depth` (a scanned block's rate; see `BlockScalars`).

  Returns:
    (output, res_avg_var): the block output and the mean per-channel variance of the branch
    before skip_gain and stochastic depth (the signal-propagation metric).
  """
  res_avg_var = jnp.mean(jnp.var(branch, axis=(0, 1, 2)))
  if stoch_depth is not None:
    branch = stoch_depth(branch, is_training, keep_prob=keep_prob)
  skip_gain = hk.get_parameter('skip_gain', (), branch.dtype, init=skip_gain_init)
  return branch * skip_gain * alpha + shortcut, res_avg_var


def classifier_head(features: jax.Array, fc: hk.Linear, drop_rate: float, is_training: bool,
                    outputs: Dict[str, jax.Array]) -> Dict[str, jax.Array]:
  """Global average pool -> dropout (training only) -> classifier, shared by every family.

  Args:
    features: Final NHWC feature map (already activated where the family does so).
    fc: The classifier; its module name fixes the parameter path (e.g. 'NFNet/~/linear').
    drop_rate: Dropout rate before the classifier; inverted dropout, so eval needs no rescale.
    is_training: Dropout is applied only when True (it then draws from hk.next_rng_key()).
    outputs: The model's output dict; 'pool' (pre-dropout features) and 'logits' are added.

  Returns:
    `outputs`, for chaining.
  """
  pool = jnp.mean(features, axis=(1, 2))
  outputs['pool'] = pool
  if is_training and drop_rate > 0.0:
    pool = hk.dropout(hk.next_rng_key(), drop_rate, pool)
  outputs['logits'] = fc(pool)
  return outputs
