"""Starting a run from trained weights: `config.init.weights` (fine-tuning), from any source.

One option takes DeepMind's `F*_haiku.npz`, our `.npz` or a run's workdir (its newest verified
checkpoint, EMA weights by default, read without building its optimizer). Then:

  * the architecture comes from the source when it records one (a workdir's config, our npz's
    ModelSpec, DeepMind's variant read off the parameter shapes): config.model's family and
    kwargs are replaced, except the regularisation rates (`REGULARISATION`), which stay the
    config's; the source's optimizer is irrelevant (an SGD run fine-tunes with AdamW);
  * the classifier is re-initialised when the class count differs (or `init.reset_head`);
  * the input convolution adapts when the channels differ (1 <-> 3, `weights.adapt`);
  * every other parameter must match in name, shape and kind (float), and be finite.
The optimizer state starts fresh and the EMA starts from the loaded weights.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Optional

import jax
import numpy as np

from nfnets.data.options import DatasetInfo
from nfnets.train import mesh as mesh_lib
from nfnets.train.options import ExperimentOptions
from nfnets.train.state import TrainState
from nfnets.weights import merge
from nfnets.weights.adapt import adapt_input_channels
from nfnets.weights.npz import ModelSpec

# Model kwargs that change training, not the parameters: a fine-tuning config keeps its own.
REGULARISATION = ("drop_rate", "stochdepth_rate")


@dataclasses.dataclass(frozen=True)
class Source:
  """What `init.weights` holds.

  Attributes:
    spec: the architecture it records (None: it records none; the config's model is used).
    params: its params (numpy).
    state: its Haiku state.
    description: where they came from, for messages.
  """
  spec: Optional[ModelSpec]
  params: dict
  state: dict
  description: str


@dataclasses.dataclass(frozen=True)
class Loaded:
  """Source weights checked against the model, ready for `start_from`."""
  params: dict
  state: dict
  reset_head: bool
  head_pattern: str
  summary: str


def describe(path: str, ema: bool = True) -> Source:
  """Reads `init.weights` (any source); raises a one-line ValueError if it cannot."""
  from nfnets.inference import loading  # pylint: disable=g-import-not-at-top
  spec, params, state, description = loading.read_source(path, ema=ema)
  return Source(spec, params, state, description)


def with_source_architecture(options: ExperimentOptions, source: Source) -> ExperimentOptions:
  """`options` with the model the source records (regularisation rates kept)."""
  if source.spec is None:
    return options
  kwargs = dict(source.spec.kwargs)
  for key in REGULARISATION:
    if key in options.model.kwargs:
      kwargs[key] = options.model.kwargs[key]
  model = dataclasses.replace(options.model, name=source.spec.name, kwargs=kwargs)
  return dataclasses.replace(options, model=model)


def _is_floating(dtype: np.dtype) -> bool:
  # ml_dtypes' bfloat16 (bf16 training saves it) has numpy kind 'V', not 'f'.
  return dtype.kind == "f" or dtype.name == "bfloat16"


def _head_modules(params: dict, pattern: str) -> list[str]:
  head = re.compile(pattern)
  return [m for m in params if head.search(m)]


def load(source: Source, options: ExperimentOptions, shapes: Any,
         data: DatasetInfo) -> Loaded:
  """Checks the source's weights against the model about to train (shapes only, no compile).

  Args:
    source: from `describe`.
    options: the run's options (after `with_source_architecture`).
    shapes: the model's params as ShapeDtypeStructs.
    data: the run's data set (class count, channels).

  Raises:
    ValueError: the weights do not fit (one line naming the first problem).
  """
  init = options.init
  params, adapted = adapt_input_channels(source.params, shapes)
  heads = _head_modules(shapes, init.head_pattern)
  differs = any(np.shape(params.get(m, {}).get(n)) != tuple(s.shape)
                for m in heads for n, s in shapes[m].items())
  reset = init.reset_head or differs
  # Shapes only: the fresh values come from the model's own init in `start_from`.
  problems = []
  for module, leaves in shapes.items():
    if reset and module in heads:
      continue
    for name, want in leaves.items():
      got = params.get(module, {}).get(name)
      if got is None:
        problems.append(f"{module}/{name} missing")
      elif tuple(np.shape(got)) != tuple(want.shape):
        problems.append(f"{module}/{name} has shape {tuple(np.shape(got))}, model needs "
                        f"{tuple(want.shape)}")
      elif not _is_floating(np.asarray(got).dtype):
        problems.append(f"{module}/{name} has dtype {np.asarray(got).dtype}, model needs "
                        "floating point")
  if problems:
    raise ValueError(f"{source.description} does not fit the model ({len(problems)} problems, "
                     f"first: {'; '.join(problems[:2])}); check config.model against the "
                     "weights.")
  merge.check_finite({m: params[m] for m in shapes if m in params and not (
      reset and m in heads)}, source.description)
  notes = []
  if adapted:
    notes.append(f"input channels adapted to {data.channels} in {', '.join(adapted)}")
  if reset:
    notes.append("classifier re-initialised" + (
        f" for {data.num_classes} classes" if differs else ""))
  summary = f"Initialised from {source.description}" + (f" ({'; '.join(notes)})." if notes
                                                         else ".")
  return Loaded(params, source.state, reset, init.head_pattern, summary)


def start_from(ts: TrainState, loaded: Loaded, optimizer: Any, mesh: Any) -> TrainState:
  """The freshly initialised state with the loaded weights, a fresh optimizer, EMA = weights."""
  fresh = mesh_lib.host_copy(ts.params)
  params = merge.merge_params(fresh, loaded.params, loaded.reset_head, loaded.head_pattern,
                              source="Initial weights")
  state = mesh_lib.host_copy(ts.state)
  if loaded.state and jax.tree.structure(loaded.state) == jax.tree.structure(state):
    state = jax.tree.map(lambda new, old: np.asarray(new, old.dtype), loaded.state, state)
  opt_state = jax.device_get(jax.jit(optimizer.init)(params))
  new = ts._replace(params=params, ema_params=params, state=state, ema_state=state,
                    opt_state=opt_state)
  return mesh_lib.replicate(jax.device_get(new), mesh)
