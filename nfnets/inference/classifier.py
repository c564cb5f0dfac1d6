"""Classify images with a trained NFNet in a few lines, at any scale, without TensorFlow.

  clf = nfnets.Classifier.from_weights('F0_haiku.npz')          # or our npz, or a workdir
  probs, names = clf.predict(['cat.jpg', 'dog.png'])           # [N, classes], top-1 names
  clf.top_k(['cat.jpg'], k=5)                                  # names, synsets, probabilities
  for p in clf.classify(inputs.iter_image_files(['photos/'])):  # streams, batch by batch
    print(p.image, p.error or p.top[0].name)

Images are read through `nfnets.files` (regular files only, the pixel count checked from
the header before decoding) and preprocessed as the evaluator does, in numpy
(`preprocess.py`: the paper's square bicubic resize to S + 32 and centre crop S, at the
variant's test resolution, or the run's own protocol), then run through the network in float32
with `is_training=False`. Batches are padded to the next power of two (at most `batch_size`),
so one image costs a batch-1 forward pass and a whole folder reuses a handful of compiled
programs. Class names: a folder run's class names from its workdir, ImageNet's 1000 WordNet
names (shipped in `imagenet_classes.tsv`) for 1000-class weights, else class indices.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.resources
import os
from collections.abc import Iterable, Iterator, Sequence
from typing import Optional, Union

import jax
import jax.numpy as jnp
import numpy as np

from nfnets import files
from nfnets.inference import loading
from nfnets.inference import preprocess as preprocess_lib
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


@dataclasses.dataclass(frozen=True)
class Prediction:
  """What `Classifier.classify` says about one image: its top classes, or why it was skipped.

  Attributes:
    image: The image as given (a path, bytes or an array).
    top: Its most probable classes, most probable first (None when skipped).
    error: One line naming the file and why it could not be read (None when classified).
  """
  image: Image
  top: Optional[tuple[ClassScore, ...]] = None
  error: Optional[str] = None


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
    batch_size: images per forward pass; a smaller batch is padded to the next power of two
      (at most batch_size), then trimmed.
    fold: run with weight standardisation folded into the kernels (same logits to ~1e-6,
      fewer ops); NF models only.
  """

  def __init__(self, loaded: loading.LoadedModel, batch_size: int = 32, fold: bool = False):
    if batch_size < 1:
      raise ValueError(f"batch_size must be at least 1, got {batch_size}.")
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
      files.UnreadableFileError (a ValueError): the image cannot be read or decoded, or is
        too large; the message names the file and the reason.
    """
    where = (files.printable(os.fspath(image)) if isinstance(image, (str, os.PathLike))
             else type(image).__name__)
    try:
      return preprocess_lib.preprocess_eval(image, method=self.spec.eval_preproc,
                                            size=self.image_size, channels=self.spec.channels)
    except FileNotFoundError:
      raise files.UnreadableFileError(f"{where}: does not exist") from None
    except PermissionError:
      raise files.UnreadableFileError(f"{where}: permission denied") from None
    except OSError as e:
      raise files.UnreadableFileError(f"{where}: cannot be read ({e.strerror or e})") from None

  def _bucket(self, n: int) -> int:
    """The padded batch of n images: the next power of two, at most batch_size."""
    return min(1 << max(n - 1, 0).bit_length(), self.batch_size)

  def logits_of(self, batch: np.ndarray) -> np.ndarray:
    """Logits of already preprocessed images [N, S, S, C], in batches of `batch_size`."""
    out = []
    for i in range(0, len(batch), self.batch_size):
      chunk = np.asarray(batch[i:i + self.batch_size], np.float32)
      count, padded = len(chunk), self._bucket(len(chunk))
      if padded > count:
        chunk = np.concatenate([chunk, np.zeros((padded - count,) + chunk.shape[1:], chunk.dtype)])
      out.append(np.asarray(self._logits(self._params, self._state, chunk))[:count])
    return np.concatenate(out) if out else np.zeros((0, self.spec.num_classes), np.float32)

  def logits(self, images: Sequence[Image]) -> np.ndarray:
    """float32 [N, num_classes] logits (preprocessing included), one batch in memory at a time.

    Raises:
      ValueError: an image cannot be read (see `preprocess`); `classify` skips such images.
    """
    images = list(images)
    out = [self.logits_of(np.stack([self.preprocess(im) for im in images[i:i + self.batch_size]]))
           for i in range(0, len(images), self.batch_size)]
    return np.concatenate(out) if out else np.zeros((0, self.spec.num_classes), np.float32)

  def predict(self, images: Sequence[Image]) -> tuple[np.ndarray, list[str]]:
    """(probabilities [N, num_classes], the top-1 class name of each image)."""
    probs = softmax(self.logits(images))
    return probs, [self.labels[int(i)][1] for i in probs.argmax(-1)]

  def top_k(self, images: Sequence[Image], k: int = 5) -> list[list[ClassScore]]:
    """The k most probable classes of each image, most probable first."""
    probs, _ = self.predict(images)
    return [self.scores(p, k) for p in probs]

  def classify(self, images: Iterable[Image], k: int = 5) -> Iterator[Prediction]:
    """Streams the top-k classes of each image, reading one batch of images at a time.

    Memory stays that of one batch whatever the number of images: pass a generator (e.g.
    `inputs.iter_image_files`) for a folder of any size. An image that cannot be read is
    yielded at once with its `error`; the others are yielded after their batch has run, in
    their order.
    """
    pending, batch = [], []
    for image in images:
      try:
        batch.append(self.preprocess(image))
      except ValueError as e:
        yield Prediction(image, error=files.printable(str(e)))
        continue
      pending.append(image)
      if len(batch) == self.batch_size:
        yield from self._scored(pending, batch, k)
        pending, batch = [], []
    if batch:
      yield from self._scored(pending, batch, k)

  def _scored(self, images: list[Image], batch: list[np.ndarray], k: int) -> Iterator[Prediction]:
    probs = softmax(self.logits_of(np.stack(batch)))
    for image, p in zip(images, probs):
      yield Prediction(image, top=tuple(self.scores(p, k)))

  def scores(self, probs: np.ndarray, k: int = 5) -> list[ClassScore]:
    """The k largest of one image's probabilities, as named classes."""
    order = np.argsort(-probs, kind="stable")[:k]
    return [ClassScore(int(i), float(probs[i]), self.labels[int(i)][1], self.labels[int(i)][0])
            for i in order]


def softmax(logits: np.ndarray) -> np.ndarray:
  """Class probabilities of float32 logits [N, classes] (numpy: nothing to compile)."""
  z = np.asarray(logits, np.float64)
  z = np.exp(z - z.max(axis=-1, keepdims=True))
  return (z / z.sum(axis=-1, keepdims=True)).astype(np.float32)
