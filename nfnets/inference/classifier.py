"""Classify images with a trained NFNet in a few lines.

  clf = nfnets.Classifier.from_weights('F0_haiku.npz')          # or our npz, or a workdir
  probs, names = clf.predict(['cat.jpg', 'dog.png'])           # [N, classes], top-1 names
  clf.top_k(['cat.jpg'], k=5)                                  # names, synsets, probabilities

Images are preprocessed by the evaluator's own function (`nfnets.data.preprocessing.
preprocess_eval`: the paper's square bicubic resize to S + 32 and centre crop S, at the
variant's test resolution), batched, and run through the network in float32 with
`is_training=False`. Class names: a folder run's class names from its workdir, ImageNet's 1000
WordNet names (shipped in `imagenet_classes.tsv`) for 1000-class weights, else class indices.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.resources
import os
from collections.abc import Iterable, Sequence
from typing import Any, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np

from nfnets.inference import loading
from nfnets.inference.folding import fold_weight_standardization
from nfnets.models import registry

Image = Union[str, os.PathLike, bytes, np.ndarray]


@dataclasses.dataclass(frozen=True)
class ClassScore:
  """One of an image's top classes."""
  index: int
  probability: float
  name: str
  synset: Optional[str] = None


@functools.lru_cache(maxsize=1)
def imagenet_classes() -> tuple[tuple[str, str], ...]:
  """(synset, name) of the 1000 ImageNet-2012 classes, in label order."""
  table = importlib.resources.files("nfnets.inference") / "imagenet_classes.tsv"
  rows = [line.split("\t") for line in table.read_text().splitlines()
          if line and not line.startswith("#")]
  assert [int(r[0]) for r in rows] == list(range(len(rows))) == list(range(1000)), "table"
  return tuple((r[1], r[2]) for r in rows)


class Classifier:
  """A loaded model with its evaluation preprocessing and class names.

  Args:
    loaded: from `nfnets.inference.loading.load_model`.
    batch_size: images per forward pass (the last batch is padded, then trimmed).
    fold: run with weight standardisation folded into the kernels (same logits to ~1e-6,
      fewer ops); NF models only.
  """

  def __init__(self, loaded: loading.LoadedModel, batch_size: int = 32, fold: bool = False):
    spec = loaded.spec
    self.spec = spec
    self.source = loaded.source
    self.batch_size = batch_size
    self.image_size = loading.eval_size(spec)
    params = fold_weight_standardization(loaded.params) if fold else loaded.params
    forward = registry.make_forward(spec.name, spec.num_classes, folded=fold, **spec.kwargs)
    self._params, self._state = jax.device_put((params, loaded.state))
    self._logits = jax.jit(lambda p, s, x: forward.apply(
        p, s, None, x, is_training=False)[0]["logits"].astype(jnp.float32))
    imagenet = imagenet_classes()
    if spec.class_names and tuple(spec.class_names) != tuple(s for s, _ in imagenet):
      self.labels = [(None, name) for name in spec.class_names]
    elif spec.num_classes == len(imagenet):  # Also a run on TFDS imagenet2012 (synset names).
      self.labels = list(imagenet)
    else:
      self.labels = [(None, str(i)) for i in range(spec.num_classes)]

  @classmethod
  def from_weights(cls, path: Union[str, os.PathLike], *, model: Optional[str] = None,
                   variant: Optional[str] = None, ema: bool = True, batch_size: int = 32,
                   fold: bool = False) -> "Classifier":
    """Loads DeepMind's file, our npz or a workdir (see `loading.load_model`)."""
    return cls(loading.load_model(os.fspath(path), model=model, variant=variant, ema=ema),
               batch_size=batch_size, fold=fold)

  def preprocess(self, image: Image) -> np.ndarray:
    """The evaluator's preprocessing of one image: float32 [S, S, C], normalised.

    Raises:
      ValueError: the image cannot be read or decoded (names the file).
    """
    import tensorflow as tf  # pylint: disable=g-import-not-at-top  (the host pipeline's ops)
    from nfnets.data import preprocessing  # pylint: disable=g-import-not-at-top
    where = os.fspath(image) if isinstance(image, (str, os.PathLike)) else type(image).__name__
    try:
      if isinstance(image, np.ndarray):
        pixels = image[..., None] if image.ndim == 2 else image
        data = tf.io.encode_png(tf.constant(pixels.astype(np.uint8)))  # lossless
      elif isinstance(image, bytes):
        data = tf.constant(image)
      else:
        with open(image, "rb") as f:
          data = tf.constant(f.read())
      out = preprocessing.preprocess_eval(data, method=self.spec.eval_preproc,
                                          size=self.image_size, channels=self.spec.channels)
      return out.numpy()
    except (OSError, tf.errors.OpError, ValueError) as e:
      reason = getattr(e, "message", None) or getattr(e, "strerror", None) or str(e)
      raise ValueError(f"{where}: cannot read it as an image ({reason.splitlines()[0]})") from None

  def logits(self, images: Sequence[Image]) -> np.ndarray:
    """float32 [N, num_classes] logits (preprocessing included)."""
    return self.logits_of(np.stack([self.preprocess(im) for im in images]))

  def logits_of(self, batch: np.ndarray) -> np.ndarray:
    """Logits of already preprocessed images [N, S, S, C], in batches of `batch_size`."""
    out = []
    for i in range(0, len(batch), self.batch_size):
      chunk = batch[i:i + self.batch_size]
      padded = np.concatenate([chunk, np.zeros((self.batch_size - len(chunk),) + chunk.shape[1:],
                                               chunk.dtype)]) if len(chunk) < self.batch_size else chunk
      out.append(np.asarray(self._logits(self._params, self._state, padded))[:len(chunk)])
    return np.concatenate(out) if out else np.zeros((0, self.spec.num_classes), np.float32)

  def predict(self, images: Sequence[Image]) -> tuple[np.ndarray, list[str]]:
    """(probabilities [N, num_classes], the top-1 class name of each image)."""
    probs = np.asarray(jax.nn.softmax(self.logits(images), axis=-1))
    return probs, [self.labels[int(i)][1] for i in probs.argmax(-1)]

  def top_k(self, images: Sequence[Image], k: int = 5) -> list[list[ClassScore]]:
    """The k most probable classes of each image, most probable first."""
    probs, _ = self.predict(images)
    return [self.scores(p, k) for p in probs]

  def scores(self, probs: np.ndarray, k: int = 5) -> list[ClassScore]:
    order = np.argsort(-probs)[:k]
    return [ClassScore(int(i), float(probs[i]), self.labels[int(i)][1], self.labels[int(i)][0])
            for i in order]


def image_files(paths: Iterable[Union[str, os.PathLike]]) -> list[str]:
  """The files named, and the image files under the folders named (sorted, recursively)."""
  from nfnets.data.folder import IMAGE_EXTENSIONS  # pylint: disable=g-import-not-at-top
  out = []
  for path in map(os.fspath, paths):
    if os.path.isdir(path):
      for root, _, names in sorted(os.walk(path)):
        out += [os.path.join(root, n) for n in sorted(names)
                if n.lower().endswith(IMAGE_EXTENSIONS) and not n.startswith(".")]
    else:
      out.append(path)
  return out
