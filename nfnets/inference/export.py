"""Export a trained NFNet for serving: a StableHLO artifact (`jax.export`) and a SavedModel.

Both take images already at the model's evaluation size, [batch, S, S, C] with any batch
(the batch dimension is symbolic), as uint8 pixels or float32 pixels on the same 0..255 scale,
and return float32 logits. Normalisation (ImageNet mean/std) is inside; the resize/crop of the
paper's protocol is left to the client (S is in `export.json`). Weight standardisation is
folded into the kernels first (`folding.py`), so the graphs contain plain convolutions only.

  write_exports(loaded, out_dir) writes
    model_uint8.jax_export, model_float32.jax_export   jax.export serialisations (StableHLO
        with the weights inside): `jax.export.deserialize(open(f, 'rb').read()).call(images)`
        runs them with plain JAX, without this project;
    saved_model/                                      a TensorFlow SavedModel via jax2tf with
        signatures 'serving_default' (uint8) and 'float_pixels' (float32);
    params.npz                                        our npz (unfolded) with its ModelSpec;
    export.json                                       input size, channels, class names.
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp

from nfnets import weights as weights_lib
from nfnets.data.normalization import normalize
from nfnets.inference.folding import fold_weight_standardization
from nfnets.inference import loading
from nfnets.inference.loading import LoadedModel
from nfnets.models import registry

FORMATS = ("jax", "savedmodel", "npz")


def eval_size(loaded: LoadedModel) -> int:
  return loading.eval_size(loaded.spec)


def logits_fn(loaded: LoadedModel) -> tuple[Callable[[Any, jax.Array], jax.Array], Any]:
  """(f(params, pixels) -> logits, folded params) of the network, weights folded."""
  spec = loaded.spec
  forward = registry.make_forward(spec.name, spec.num_classes, folded=True, **spec.kwargs)
  state = loaded.state

  def f(params, pixels):
    images = normalize(pixels.astype(jnp.float32), spec.channels, xp=jnp)
    outputs, _ = forward.apply(params, state, None, images, is_training=False)
    return outputs["logits"].astype(jnp.float32)

  return f, fold_weight_standardization(loaded.params)


def export_jax(loaded: LoadedModel, dtype: Any) -> bytes:
  """A serialised `jax.export.Exported` of pixels [b, S, S, C] (`dtype`) -> logits."""
  f, params = logits_fn(loaded)
  size = eval_size(loaded)
  (batch,) = jax.export.symbolic_shape("b")
  spec = jax.ShapeDtypeStruct((batch, size, size, loaded.spec.channels), dtype)
  exported = jax.export.export(jax.jit(lambda x: f(params, x)))(spec)
  return exported.serialize()


def export_savedmodel(loaded: LoadedModel, directory: str) -> None:
  """A TensorFlow SavedModel (jax2tf) with a uint8 and a float32 signature."""
  from nfnets.quiet_tensorflow import tf  # pylint: disable=g-import-not-at-top
  from jax.experimental import jax2tf  # pylint: disable=g-import-not-at-top
  f, params = logits_fn(loaded)
  size, channels = eval_size(loaded), loaded.spec.channels
  module = tf.Module()
  # Weights as variables, not graph constants: the graph stays small for big variants.
  module.params = tf.nest.map_structure(tf.Variable, params)
  converted = jax2tf.convert(f, polymorphic_shapes=[None, f"(b, {size}, {size}, {channels})"],
                             with_gradient=False)

  def signature(dtype):
    @tf.function(autograph=False, input_signature=[
        tf.TensorSpec([None, size, size, channels], dtype, name="images")])
    def serve(images):
      return {"logits": converted(module.params, images)}
    return serve

  module.serve_uint8 = signature(tf.uint8)
  module.serve_float32 = signature(tf.float32)
  tf.saved_model.save(module, directory, signatures={
      "serving_default": module.serve_uint8, "float_pixels": module.serve_float32})


def write_exports(loaded: LoadedModel, out_dir: str, formats=FORMATS) -> list[str]:
  """Writes the requested formats (see the module docstring); returns the paths written."""
  unknown = sorted(set(formats) - set(FORMATS))
  if unknown:
    raise ValueError(f"Unknown export format(s) {unknown}; use some of {list(FORMATS)}.")
  os.makedirs(out_dir, exist_ok=True)
  written = []
  if "jax" in formats:
    for name, dtype in (("uint8", jnp.uint8), ("float32", jnp.float32)):
      path = os.path.join(out_dir, f"model_{name}.jax_export")
      with open(path, "wb") as f:
        f.write(export_jax(loaded, dtype))
      written.append(path)
  if "savedmodel" in formats:
    path = os.path.join(out_dir, "saved_model")
    export_savedmodel(loaded, path)
    written.append(path)
  if "npz" in formats:
    path = os.path.join(out_dir, "params.npz")
    weights_lib.save_params(path, loaded.params, model=loaded.spec)
    written.append(path)
  meta = {"source": loaded.source, "image_size": eval_size(loaded),
          "channels": loaded.spec.channels, "input": "pixels 0..255, uint8 or float32, "
          "already resized and cropped to image_size (the paper: resize to S + 32, centre crop)",
          "spec": json.loads(loaded.spec.to_json())}
  with open(os.path.join(out_dir, "export.json"), "w") as f:
    json.dump(meta, f, indent=1)
  written.append(os.path.join(out_dir, "export.json"))
  return written
