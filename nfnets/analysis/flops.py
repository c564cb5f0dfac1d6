"""Multiply-accumulate (MAC) and parameter counts from shapes only.

The NFNet paper's "FLOPs" (F0: 12.38B ... F6: 377.28B) are multiply-accumulates
per image at the TEST resolution, counted the official way:

- every convolution: out_H * out_W * out_C * kh * kw * (in_C / groups);
- every linear layer (squeeze-excite FCs, classifier): in * out;
- nothing else: no biases, activations, pooling, weight standardisation, or
  the squeeze-excite/skip multiplies.

Instead of re-deriving each architecture by hand, the model is traced once
with `jax.eval_shape` (no FLOPs are executed and no parameters allocated),
and every `hk.ConvND` (this includes `WSConv2D`) and `hk.Linear` call is
observed with `hk.intercept_methods` to read its real input and output shapes.
So any Haiku model built from those layers is counted, including the other
families in `nfnets.models`.
"""

from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Tuple, Union

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np

from nfnets.models import nfnet
from nfnets.models import registry

ModelLike = Union[str, Callable[..., Any], hk.Transformed, hk.TransformedWithState]
ImageSize = Union[int, Sequence[int]]


def _image_hw(model: ModelLike, image_size: Optional[ImageSize],
              model_kwargs: Mapping[str, Any]) -> Tuple[int, int]:
  """Resolves the (H, W) to count at; None means an NFNet's test resolution."""
  if image_size is None:
    variant = None
    if isinstance(model, str) and model in nfnet.VARIANTS:
      variant = nfnet.VARIANTS[model]
    elif model == 'NFNet':
      variant = nfnet.resolve_variant(model_kwargs.get('variant', 'F0'))
    if variant is None:
      raise ValueError(
          'image_size is required unless the model is an NFNet variant (whose '
          'test resolution is used); pass e.g. image_size=224.')
    return variant.test_imsize, variant.test_imsize
  if isinstance(image_size, int):
    return image_size, image_size
  hw = tuple(int(s) for s in image_size)
  if len(hw) != 2:
    raise ValueError(f'image_size must be an int or (H, W), got {image_size}.')
  return hw


def _zeros_creator(next_creator, shape, dtype, init, context):
  del init, context  # Shapes and dtypes are kept; values are never computed.
  return next_creator(shape, dtype, jnp.zeros)


def _as_transformed(model: ModelLike, num_classes: int,
                    model_kwargs: Mapping[str, Any]) -> Any:
  """Returns an object with an `init(rng, images, **call_kwargs)` method."""
  if isinstance(model, (hk.Transformed, hk.TransformedWithState)):
    return model
  if isinstance(model, str):
    if model in nfnet.VARIANTS:
      kwargs = dict(model_kwargs, variant=model)

      def forward(images, is_training=False, return_metrics=False):
        # Only parameter shapes matter: zero "initialisers" trace faster than
        # the random ones (eval_shape still traces every op of init).
        with hk.custom_creator(_zeros_creator):
          return nfnet.NFNet(num_classes, **kwargs)(
              images, is_training=is_training, return_metrics=return_metrics)

      return hk.transform_with_state(forward)
    # Any other name is a model family of the registry.
    if model not in registry.MODELS:
      raise ValueError(
          f'Unknown model {model!r}; use an NFNet variant '
          f'{list(nfnet.VARIANTS)}, a family {sorted(registry.MODELS)}, or a '
          'forward function.')
    return registry.make_forward(model, num_classes, **model_kwargs)
  if callable(model):
    # A plain forward function that builds Haiku modules.
    return hk.transform_with_state(model)
  raise ValueError(
      f'count_macs needs a model name, a forward function or an hk.Transformed, '
      f'got {type(model).__name__}.')


def _macs_interceptor(counter: Dict[str, int]) -> Callable[..., Any]:
  """Builds a method interceptor that adds each conv/linear call's MACs."""

  def interceptor(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    module = context.module
    if context.method_name != '__call__':
      return out
    if isinstance(module, hk.ConvND):
      inputs = args[0]
      if module.channel_index != -1:
        raise ValueError('count_macs supports channels-last convs only.')
      batch = inputs.shape[0] if inputs.ndim == module.num_spatial_dims + 2 else 1
      in_ch = inputs.shape[-1]
      per_output = int(np.prod(module.kernel_shape)) * (
          in_ch // module.feature_group_count)
      # out.size / batch = out_H * out_W * out_C for one image.
      counter['macs'] += (int(np.prod(out.shape)) // batch) * per_output
      counter['convs'] += 1
    elif isinstance(module, hk.Linear):
      inputs = args[0]
      batch = inputs.shape[0] if inputs.ndim > 1 else 1
      counter['macs'] += (int(np.prod(out.shape)) // batch) * inputs.shape[-1]
      counter['linears'] += 1
    return out

  return interceptor


def model_cost(model: ModelLike,
               image_size: Optional[ImageSize] = None,
               *,
               num_classes: int = 1000,
               channels: int = 3,
               model_kwargs: Optional[Mapping[str, Any]] = None,
               call_kwargs: Optional[Mapping[str, Any]] = None,
               ) -> Dict[str, int]:
  """Counts MACs per image and parameters, tracing the model with eval_shape.

  Args:
    model: An NFNet variant name ('F0'...), a family name of
      `nfnets.models.MODELS` (with `model_kwargs`), a Haiku forward function
      `f(images, **call_kwargs)`, or an `hk.Transformed(WithState)` whose
      `init(rng, images, **call_kwargs)` runs the forward pass (for example
      `nfnets.models.make_forward(...)`).
    image_size: Side (int) or (H, W). None: the NFNet variant's test_imsize.
    num_classes: Classifier size, for names.
    channels: Input channels.
    model_kwargs: Constructor kwargs, for names.
    call_kwargs: Keyword arguments of the forward call; default
      {'is_training': False}.

  Returns:
    {'macs': MACs per image, 'params': number of parameters,
     'convs': conv calls seen, 'linears': linear calls seen}.
  """
  model_kwargs = dict(model_kwargs or {})
  call_kwargs = {'is_training': False} if call_kwargs is None else dict(
      call_kwargs)
  if channels < 1:
    raise ValueError(f'channels must be >= 1, got {channels}.')
  h, w = _image_hw(model, image_size, model_kwargs)
  transformed = _as_transformed(model, num_classes, model_kwargs)
  counter = {'macs': 0, 'convs': 0, 'linears': 0}
  # Batch of 1: the counts are per image (the interceptor also divides by the
  # batch, in case a model reshapes). Haiku's init runs the forward pass once.
  images = jax.ShapeDtypeStruct((1, h, w, channels), jnp.float32)
  with hk.intercept_methods(_macs_interceptor(counter)):
    init_out = jax.eval_shape(
        lambda rng, x: transformed.init(rng, x, **call_kwargs),
        jax.random.PRNGKey(0), images)
  params = init_out[0] if isinstance(transformed, hk.TransformedWithState) \
      else init_out
  counter['params'] = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params))
  return counter


def count_macs(model: ModelLike,
               image_size: Optional[ImageSize] = None,
               **kwargs: Any) -> int:
  """MACs per image (the NFNet paper's "FLOPs"); see `model_cost` for args.

  Examples: `count_macs('F0')` is 12,384,198,656 (F0 at its 256 px test
  resolution; the paper's "12.38B FLOPs"), and
  `count_macs(nfnets.models.make_forward('NFNet', 10, variant=...), 32)` counts a
  registry model at 32 px.
  """
  return model_cost(model, image_size, **kwargs)['macs']


def count_params(model: ModelLike,
                 image_size: Optional[ImageSize] = None,
                 **kwargs: Any) -> int:
  """Number of parameters; see `model_cost` for args."""
  return model_cost(model, image_size, **kwargs)['params']
