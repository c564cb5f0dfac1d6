"""Deterministic, resumable train/eval iterators (tf.data on random-access sources).

Design: a random-access source (sources.py) + an index sampler in numpy + tf.data
preprocessing with STATELESS random ops. Batch k of host h depends only on
(seed, k, h):
  * host h owns the contiguous slice np.array_split(arange(N), host_count)[h];
  * the host's example stream is epoch after epoch of that slice, each epoch in
    the order np.random.default_rng([seed, epoch]).permutation(len(slice));
  * batch k consumes stream positions [k * M, (k + 1) * M), M = per-host batch
    times 2 when MixUp/CutMix is on (each output mixes two inputs);
  * every random op is keyed by (seed, purpose, host, position): crop/flip by
    the input position, the mix by k, RandAugment by the output position.
So `start_step=k` computes batch k directly, without replaying any data, and a
resumed run sees exactly the batches an uninterrupted run would have.

Output batches are numpy dicts shaped [local_devices, per_device, ...].
"""

import math
from typing import Any, Iterator, Optional

import numpy as np
import tensorflow as tf

from nfnets.data import mixing
from nfnets.data import preprocessing
from nfnets.data import sources

try:
  # The pipeline runs on the host CPU; TF must not grab GPU memory JAX needs.
  tf.config.set_visible_devices([], "GPU")
except RuntimeError:  # TF already initialised its devices: nothing to change.
  pass

# Purpose tags, so that crop, mix and RandAugment never share a random stream.
_CROP, _MIX, _RANDAUGMENT = 0, 1, 2
# The host index sits above 2**40 stream positions (10^12 examples).
_HOST_SHIFT = 40


def _get(config: Any, key: str, default: Any = None) -> Any:
  value = config.get(key, default)
  return default if value is None else value


def _seed(config: Any) -> int:
  seed = int(_get(config, "seed", 0))
  if not 0 <= seed < 2**31:
    raise ValueError(f"data.seed must be in [0, 2**31), got {seed}.")
  return seed


def example_seeds(seed: int, purpose: int, host: int,
                  positions: np.ndarray) -> np.ndarray:
  """int64 [len(positions), 2] stateless seeds, unique per (purpose, host, pos)."""
  positions = np.asarray(positions, np.int64)
  first = np.full_like(positions, seed * 4 + purpose)
  return np.stack([first, (np.int64(host) << _HOST_SHIFT) + positions], axis=-1)


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


def _image_size(config: Any, key: str, fallback: Optional[str] = None) -> int:
  value = config.get(key)
  if value is None and fallback:
    value = config.get(fallback)
  if value is None or int(value) <= 0:
    raise ValueError(f"data.{key} must be a positive int (pixels), got {value!r}.")
  return int(value)


def _per_host_batch(global_batch_size: int, host_count: int,
                    local_device_count: int) -> int:
  if global_batch_size % (host_count * local_device_count):
    raise ValueError(
        f"global_batch_size={global_batch_size} must be divisible by "
        f"host_count * local_device_count = {host_count * local_device_count}.")
  return global_batch_size // host_count


def _check_classes(config: Any, source: sources.Source) -> None:
  expected = config.get("num_classes")
  if expected is not None and int(expected) != source.num_classes:
    raise ValueError(f"data.num_classes={expected} but {config.get('name')!r} "
                     f"has {source.num_classes} classes: fix the config.")


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


def build_train_iterator(data_config: Any, *, global_batch_size: int,
                         host_index: int, host_count: int,
                         local_device_count: int,
                         start_step: int = 0) -> Iterator[dict[str, np.ndarray]]:
  """Endless training batches, batch k a pure function of (seed, k, host).

  Args:
    data_config: `config.data` (name, data_dir, folder, train_split,
      image_size, train_preproc, random_flip, randaugment, mixup_alpha,
      cutmix, num_classes, seed).
    global_batch_size: examples per step over all hosts.
    host_index: this host (jax.process_index()).
    host_count: number of hosts (jax.process_count()).
    local_device_count: devices on this host.
    start_step: first step to produce (resume point).

  Returns:
    Iterator of {'images' f32 [D, B, S, S, C] normalised, 'labels' i32 [D, B]}
    plus, when mixing, 'mix_labels' i32 [D, B] and 'mix_ratio' f32 [D, B].
  """
  batch = _per_host_batch(global_batch_size, host_count, local_device_count)
  seed = _seed(data_config)
  size = _image_size(data_config, "image_size")
  method = _get(data_config, "train_preproc", "inception_crop")
  preprocessing.check_preproc_names(
      method, _get(data_config, "eval_preproc", "resize_crop_32"))
  flip = bool(_get(data_config, "random_flip", True))
  mixup_alpha = float(_get(data_config, "mixup_alpha", 0.0))
  cutmix = bool(_get(data_config, "cutmix", False))
  mixes = mixup_alpha > 0 or cutmix
  randaugment = mixing.parse_randaugment(data_config.get("randaugment"))
  randaugment_fn = mixing.load_randaugment() if randaugment else None
  if start_step < 0:
    raise ValueError(f"start_step must be >= 0, got {start_step}.")

  source = sources.open_source(data_config, _get(data_config, "train_split", "train"))
  _check_classes(data_config, source)
  channels = source.channels
  start, end = host_slice(len(source), host_index, host_count)
  sampler = IndexSampler(start, end - start, seed)
  inputs = batch * (2 if mixes else 1)
  host_base = host_index << _HOST_SHIFT

  def records():
    step = start_step
    while True:
      positions = np.arange(step * inputs, (step + 1) * inputs, dtype=np.int64)
      images, labels = _read_or_none(source, sampler.indices(positions))
      if images is None:
        return
      yield {"image": np.asarray(images, dtype=object), "label": labels,
             "seed": example_seeds(seed, _CROP, host_index, positions),
             "step": np.full([inputs], step, np.int64)}
      step += 1

  signature = {"image": tf.TensorSpec([inputs], tf.string),
               "label": tf.TensorSpec([inputs], tf.int64),
               "seed": tf.TensorSpec([inputs, 2], tf.int64),
               "step": tf.TensorSpec([inputs], tf.int64)}

  def decode(example):
    image = preprocessing.preprocess_train(
        example["image"], example["seed"], method=method, size=size,
        channels=channels, flip=flip)
    return {"images": image, "labels": tf.cast(example["label"], tf.int32),
            "step": example["step"]}

  def mix(examples):
    step = examples["step"][0]
    mix_seed = tf.stack([tf.constant(seed * 4 + _MIX, tf.int64),
                         tf.constant(host_base, tf.int64) + step])
    out = mixing.mix_batch(examples["images"], examples["labels"], mix_seed,
                           mixup_alpha=mixup_alpha, cutmix=cutmix)
    out["step"] = examples["step"][:batch]
    return out

  def augment(example):
    # The output position step * batch + i keys RandAugment, one stream each.
    example = dict(example)
    position = example.pop("position")
    ra_seed = tf.stack([tf.constant(seed * 4 + _RANDAUGMENT, tf.int64),
                        tf.constant(host_base, tf.int64) + position])
    example["images"] = mixing.apply_randaugment(
        example["images"], ra_seed, *randaugment, randaugment_fn=randaugment_fn)
    return example

  def add_positions(examples):
    examples = dict(examples)
    examples["position"] = examples.pop("step") * batch + tf.range(batch, dtype=tf.int64)
    return examples

  def finish(examples):
    examples = dict(examples)
    examples.pop("step", None)
    examples["images"] = preprocessing.normalize(examples["images"], channels)
    return {k: tf.reshape(v, [local_device_count, batch // local_device_count] +
                          v.shape[1:].as_list()) for k, v in examples.items()}

  parallel = tf.data.AUTOTUNE
  ds = tf.data.Dataset.from_generator(records, output_signature=signature)
  ds = ds.unbatch().map(decode, num_parallel_calls=parallel, deterministic=True)
  ds = ds.batch(inputs, drop_remainder=True)
  if mixes:
    ds = ds.map(mix, num_parallel_calls=parallel, deterministic=True)
  if randaugment:
    ds = ds.map(add_positions).unbatch()
    ds = ds.map(augment, num_parallel_calls=parallel, deterministic=True)
    ds = ds.batch(batch, drop_remainder=True)
  ds = ds.map(finish, num_parallel_calls=parallel, deterministic=True)
  return ds.prefetch(tf.data.AUTOTUNE).as_numpy_iterator()


def build_eval_iterator(data_config: Any, *, split: Optional[str] = None,
                        global_batch_size: int, host_index: int,
                        host_count: int,
                        local_device_count: int) -> Iterator[dict[str, np.ndarray]]:
  """One pass over `split`: every example exactly once, over all hosts.

  The last batch is padded (repeating an example) with 'mask' 0; every host
  yields the same number of batches, so collective eval steps stay in sync.

  Args:
    data_config: `config.data` (eval_split, eval_image_size, eval_preproc ...).
    split: split to read; default `data_config.eval_split` (or 'test').
    global_batch_size: examples per eval step over all hosts.
    host_index: this host.
    host_count: number of hosts.
    local_device_count: devices on this host.

  Returns:
    Iterator of {'images' f32 [D, B, S, S, C], 'labels' i32 [D, B],
    'mask' f32 [D, B]}.
  """
  batch = _per_host_batch(global_batch_size, host_count, local_device_count)
  split = split or _get(data_config, "eval_split", "test")
  size = _image_size(data_config, "eval_image_size", "image_size")
  method = _get(data_config, "eval_preproc", "resize_crop_32")
  preprocessing.check_preproc_names(
      _get(data_config, "train_preproc", "inception_crop"), method)
  source = sources.open_source(data_config, split)
  _check_classes(data_config, source)
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
    image = preprocessing.preprocess_eval(example["image"], method=method,
                                          size=size, channels=channels)
    return {"images": image, "labels": tf.cast(example["label"], tf.int32),
            "mask": example["mask"]}

  def reshape(examples):
    return {k: tf.reshape(v, [local_device_count, batch // local_device_count] +
                          v.shape[1:].as_list()) for k, v in examples.items()}

  ds = tf.data.Dataset.from_generator(records, output_signature=signature)
  ds = ds.unbatch().map(decode, num_parallel_calls=tf.data.AUTOTUNE,
                        deterministic=True)
  ds = ds.batch(batch, drop_remainder=True).map(reshape)
  return ds.prefetch(tf.data.AUTOTUNE).as_numpy_iterator()


def dataset_info(data_config: Any) -> tuple[int, int, int]:
  """(num_train_examples, num_eval_examples, num_classes) of the configured splits."""
  train = sources.open_source(data_config, _get(data_config, "train_split", "train"))
  evaluation = sources.open_source(data_config, _get(data_config, "eval_split", "test"))
  _check_classes(data_config, train)
  return len(train), len(evaluation), train.num_classes
