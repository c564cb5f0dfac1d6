"""Deterministic, resumable train/eval iterators (tf.data on random-access sources).

Design: a random-access source (sources.py) + an index sampler in numpy + tf.data
preprocessing with STATELESS random ops. The global batch of step k depends only on
(seed, k), whatever the number of hosts:
  * the example stream is epoch after epoch of the whole split, each epoch in the order
    np.random.default_rng([seed, epoch]).permutation(N);
  * step k consumes stream positions [k * M, (k + 1) * M), M = global batch times
    `inputs_per_example` (2 for the paper's MixUp/CutMix: each output mixes two decoded
    inputs); a host decodes only its rows of the global batch (`rows`, from the device mesh),
    i.e. the inputs at positions k * M + [start * n, stop * n);
  * the crop and flip of the input at position p are keyed by (seed, p).
So `start_step=k` computes batch k directly, without replaying any data, a resumed run sees
exactly the batches an uninterrupted run would have, and every topology (2 hosts x 1 device,
1 host x 2 devices, 4 hosts after 8) trains on the same examples with the same crops. (The
official pipeline gave each host a fixed slice of the examples; here each host reads its share
of a global order, which needs random access, and the same total number of reads.)

The host's share of the work stops at decode + crop + flip + resize: training batches are
uint8 crops, and MixUp/CutMix, RandAugment and normalisation run on the accelerator inside the
train step (`nfnets.augment`), keyed by the step. The bicubic output is rounded and clipped to
[0, 255] here; the official pipeline kept it unclipped float until RandAugment clipped it
(after mixing), so pixels differ by at most half a grey level, except where the bicubic kernel
overshoots at edges. Shipping uint8 also cuts the host-to-device bytes by 4.

Output batches are numpy dicts holding this host's rows [rows, ...] of the global batch.
"""

import math
from typing import Iterator, Optional

import numpy as np

from nfnets.data import preprocessing
from nfnets.data import sources
from nfnets.data.options import DataOptions, DatasetInfo
from nfnets.quiet_tensorflow import tf

try:
  # The pipeline runs on the host CPU; TF must not grab GPU memory JAX needs.
  tf.config.set_visible_devices([], "GPU")
except RuntimeError:  # TF already initialised its devices: nothing to change.
  pass

# Purpose tag of the crop/flip stream (others would take other tags).
_CROP = 0


def example_seeds(seed: int, purpose: int, positions: np.ndarray) -> np.ndarray:
  """int64 [len(positions), 2] stateless seeds, unique per (purpose, stream position)."""
  positions = np.asarray(positions, np.int64)
  first = np.full_like(positions, seed * 4 + purpose)
  return np.stack([first, positions], axis=-1)


def host_slice(num_examples: int, host_index: int, host_count: int) -> tuple[int, int]:
  """[start, end) of this host's examples (np.array_split: disjoint, covering)."""
  if not 0 <= host_index < host_count:
    raise ValueError(f"host_index must be in [0, {host_count}), got {host_index}.")
  if num_examples < host_count:
    raise ValueError(f"{num_examples} examples cannot be split over "
                     f"{host_count} hosts: use fewer hosts or a larger split.")
  bounds = np.cumsum([0] + [len(a) for a in np.array_split(
      np.arange(num_examples), host_count)])
  return int(bounds[host_index]), int(bounds[host_index + 1])


def check_rows(global_batch_size: int, rows: tuple[int, int]) -> int:
  """The number of rows [start, stop) of a global batch a host reads, checked."""
  start, stop = rows
  if not 0 <= start < stop <= global_batch_size:
    raise ValueError(f"rows {rows} are not a share of a global batch of {global_batch_size}.")
  return stop - start


def _check_classes(options: DataOptions, source: sources.Source) -> None:
  if options.num_classes is not None and options.num_classes != source.num_classes:
    raise ValueError(f"data.num_classes={options.num_classes} but {options.name!r} "
                     f"has {source.num_classes} classes: fix the config (None takes the data "
                     "set's).")


def _read_or_none(source: sources.Source, indices: np.ndarray):
  """source.read, or (None, None) when the process is exiting."""
  try:
    return source.read(indices)
  except RuntimeError as e:
    # The prefetcher may still be reading when the process exits; the
    # array_record thread pool then refuses work. End the stream quietly.
    if "interpreter shutdown" in str(e):
      return None, None
    raise


class IndexSampler:
  """Maps stream positions of one host to example indices (per-epoch shuffles).

  Args:
    start: first example index of the host's slice.
    size: number of examples in the slice.
    seed: shuffle seed.
  """

  def __init__(self, start: int, size: int, seed: int):
    self.start, self.size, self.seed = start, size, seed
    self._perms: dict[int, np.ndarray] = {}

  def _perm(self, epoch: int) -> np.ndarray:
    if epoch not in self._perms:
      if len(self._perms) >= 2:  # A batch spans at most two epochs.
        self._perms.pop(min(self._perms))
      self._perms[epoch] = np.random.default_rng(
          [self.seed, epoch]).permutation(self.size)
    return self._perms[epoch]

  def indices(self, positions: np.ndarray) -> np.ndarray:
    epochs, offsets = np.divmod(np.asarray(positions, np.int64), self.size)
    out = np.empty(len(offsets), np.int64)
    for epoch in np.unique(epochs):
      chosen = epochs == epoch
      out[chosen] = self.start + self._perm(int(epoch))[offsets[chosen]]
    return out


def to_uint8(image: tf.Tensor) -> tf.Tensor:
  """Rounds and clips a float 0..255 image to uint8 (what the host ships for training)."""
  return tf.cast(tf.clip_by_value(tf.round(image), 0.0, 255.0), tf.uint8)


def build_train_iterator(options: DataOptions, *, global_batch_size: int,
                         rows: tuple[int, int],
                         start_step: int = 0) -> Iterator[dict[str, np.ndarray]]:
  """Endless training batches of uint8 crops, batch k a pure function of (seed, k).

  Args:
    options: `config.data`.
    global_batch_size: examples per step over all hosts.
    rows: [start, stop): the rows of each global batch this host reads
      (`nfnets.train.mesh.local_rows`).
    start_step: first step to produce (resume point).

  Returns:
    Iterator of {'images' uint8 [R * n, S, S, C], 'labels' int32 [R * n], 'example_id' int64
    [R * n] (the data set index of each input, for checks; not sent to the devices)}, R the
    host's rows and n = options.inputs_per_example (2 when the paper's MixUp/CutMix mixes two
    decoded inputs per example; each device splits its inputs into the pairs of its groups).
  """
  batch = check_rows(global_batch_size, rows)
  size = options.image_size
  preprocessing.check_preproc_names(options.train_preproc, options.eval_preproc)
  if start_step < 0:
    raise ValueError(f"start_step must be >= 0, got {start_step}.")
  source = sources.open_source(options, options.train_split)
  _check_classes(options, source)
  channels = source.channels
  sampler = IndexSampler(0, len(source), options.seed)
  inputs = batch * options.inputs_per_example
  global_inputs = global_batch_size * options.inputs_per_example

  def records():
    step = start_step
    while True:
      first = step * global_inputs + rows[0] * options.inputs_per_example
      positions = np.arange(first, first + inputs, dtype=np.int64)
      indices = sampler.indices(positions)
      images, labels = _read_or_none(source, indices)
      if images is None:
        return
      yield {"image": np.asarray(images, dtype=object), "label": labels,
             "seed": example_seeds(options.seed, _CROP, positions), "example_id": indices}
      step += 1

  signature = {"image": tf.TensorSpec([inputs], tf.string),
               "label": tf.TensorSpec([inputs], tf.int64),
               "seed": tf.TensorSpec([inputs, 2], tf.int64),
               "example_id": tf.TensorSpec([inputs], tf.int64)}

  def decode(example):
    image = preprocessing.preprocess_train(
        example["image"], example["seed"], method=options.train_preproc, size=size,
        channels=channels, flip=options.random_flip)
    return {"images": to_uint8(image), "labels": tf.cast(example["label"], tf.int32),
            "example_id": example["example_id"]}

  ds = tf.data.Dataset.from_generator(records, output_signature=signature)
  ds = ds.unbatch().map(decode, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  ds = ds.batch(inputs, drop_remainder=True)
  return ds.prefetch(tf.data.AUTOTUNE).as_numpy_iterator()


def build_eval_iterator(options: DataOptions, *, split: Optional[str] = None,
                        global_batch_size: int, host_index: int,
                        host_count: int) -> Iterator[dict[str, np.ndarray]]:
  """One pass over `split`: every example exactly once, over all hosts.

  The last batch is padded (repeating an example) with 'mask' 0; every host
  yields the same number of batches, so collective eval steps stay in sync.

  Args:
    options: `config.data` (eval_split, eval_image_size, eval_preproc ...).
    split: split to read; default `options.eval_split`.
    global_batch_size: examples per eval step over all hosts.
    host_index: this host's share of the mesh (`nfnets.train.mesh.local_share`).
    host_count: the number of shares.

  Returns:
    Iterator of this host's rows {'images' f32 [B, S, S, C] normalised, 'labels' i32 [B],
    'mask' f32 [B]}, B = global_batch_size / host_count.
  """
  if global_batch_size % host_count:
    raise ValueError(f"eval batch {global_batch_size} does not split over {host_count} hosts.")
  batch = global_batch_size // host_count
  split = split or options.eval_split
  size = options.eval_image_size
  preprocessing.check_preproc_names(options.train_preproc, options.eval_preproc)
  source = sources.open_source(options, split)
  _check_classes(options, source)
  channels = source.channels
  start, end = host_slice(len(source), host_index, host_count)
  # The first host's slice is the largest (array_split), so all hosts run
  # ceil(that / batch) steps.
  num_batches = math.ceil(math.ceil(len(source) / host_count) / batch)

  def records():
    for b in range(num_batches):
      positions = np.arange(b * batch, (b + 1) * batch, dtype=np.int64)
      valid = positions < end - start
      images, labels = _read_or_none(source, start + np.where(valid, positions, 0))
      if images is None:
        return
      yield {"image": np.asarray(images, dtype=object), "label": labels,
             "mask": valid.astype(np.float32)}

  signature = {"image": tf.TensorSpec([batch], tf.string),
               "label": tf.TensorSpec([batch], tf.int64),
               "mask": tf.TensorSpec([batch], tf.float32)}

  def decode(example):
    image = preprocessing.preprocess_eval(example["image"], method=options.eval_preproc,
                                          size=size, channels=channels)
    return {"images": image, "labels": tf.cast(example["label"], tf.int32),
            "mask": example["mask"]}

  ds = tf.data.Dataset.from_generator(records, output_signature=signature)
  ds = ds.unbatch().map(decode, num_parallel_calls=tf.data.AUTOTUNE,
                        deterministic=True)
  ds = ds.batch(batch, drop_remainder=True)
  return ds.prefetch(tf.data.AUTOTUNE).as_numpy_iterator()


def dataset_info(options: DataOptions) -> DatasetInfo:
  """Sizes, class count and class names of the configured splits."""
  train = sources.open_source(options, options.train_split)
  evaluation = sources.open_source(options, options.eval_split)
  _check_classes(options, train)
  return DatasetInfo(num_train=len(train), num_eval=len(evaluation),
                     num_classes=train.num_classes, channels=train.channels,
                     class_names=tuple(train.class_names) if train.class_names else None)
