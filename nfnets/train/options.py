"""Typed options: the experiment config read once into frozen dataclasses.

Every default is written here (and in `nfnets.data.options.DataOptions`) and nowhere else:
`configs/common.py` builds its ConfigDict from `ExperimentOptions()` (`to_config_dict`), the
config files override fields, and `ExperimentOptions.from_config` reads the result back. A key
the code reads is therefore always a field, and a key no field defines is refused by name, so a
typo in a config file fails as loudly as one on the command line. Library functions take these
dataclasses, never a ConfigDict.

The same conversion reads a workdir's saved `config.json` (`from_json`), so a run can be
evaluated or resumed from its workdir alone; keys added since that run was written take their
defaults.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from collections.abc import Mapping
from typing import Any, Optional

import ml_collections

from nfnets.data.options import DataOptions
from nfnets.models.blocks import REMAT_MODES
from nfnets.train.agc import CLASSIFIER_WEIGHT


def _default_model_kwargs() -> dict[str, Any]:
  # NFNet-F0 with the paper's regularisation (stochastic depth 0.25, not the class's 0.1).
  return dict(variant="F0", width=1.0, se_ratio=0.5, alpha=0.2, stochdepth_rate=0.25,
              drop_rate=0.2, activation="gelu", final_conv_mult=2, use_two_convs=True)


@dataclasses.dataclass(frozen=True)
class ModelOptions:
  """`config.model`: which network.

  Attributes:
    name: A key of `nfnets.models.MODELS`.
    kwargs: The family's constructor arguments; `variant` may be a name or a dict of fields.
    remat: 'none' | 'block': recompute each residual block in the backward pass (less
      activation memory for ~1/3 more compute). Not part of the model's identity: a run may
      resume with another setting.
    scan_blocks: run each stage's repeated blocks as one lax.scan (one traced block per
      stage; same parameters and values). Like remat, not part of the model's identity.
  """
  name: str = "NFNet"
  kwargs: Mapping[str, Any] = dataclasses.field(default_factory=_default_model_kwargs)
  remat: str = "none"
  scan_blocks: bool = False

  def __post_init__(self):
    if self.remat not in REMAT_MODES:
      raise ValueError(f"model.remat must be one of {REMAT_MODES}, got {self.remat!r}.")


@dataclasses.dataclass(frozen=True)
class AGCOptions:
  """`config.optimizer.agc`: Adaptive Gradient Clipping.

  Attributes:
    clipping: lambda: 0.01 for batch 1024-4096 (the paper), smaller for larger batches.
    eps: Floor on the weight norm, so zero-initialised parameters can still move.
    exclude: Parameters left unclipped (nfnets.train.agc patterns); the paper's is the
      classifier weight. () clips everything.
    with_adam: AGC was tuned for SGD; with adam/adamw it is off unless this is True.
  """
  clipping: float = 0.01
  eps: float = 1e-3
  exclude: tuple[str, ...] = (CLASSIFIER_WEIGHT,)
  with_adam: bool = False


# The optimizers nfnets.train.optim builds (checked here, once, when the config is read).
OPTIMIZER_NAMES = ("sgd_agc", "sgd", "adam", "adamw")


@dataclasses.dataclass(frozen=True)
class OptimizerOptions:
  """`config.optimizer`: the paper's SGD + AGC + warm-up/cosine + EMA recipe by default.

  Attributes:
    name: 'sgd_agc' | 'sgd' | 'adam' | 'adamw'.
    lr: Peak learning rate per 256 examples (when lr_scale_by_batch).
    lr_scale_by_batch: Peak lr = lr * batch_size / 256 (1.6 at batch 4096).
    warmup_epochs: Linear warm-up from 0; fractional epochs allowed.
    end_lr: The cosine decays to this value at the last step.
    momentum: SGD momentum.
    nesterov: Nesterov momentum.
    weight_decay: Coupled (L2 added to the gradient) for sgd/adam, decoupled for adamw; on
      conv/linear weights only.
    b1: adam/adamw first-moment decay.
    b2: adam/adamw second-moment decay.
    adam_eps: adam/adamw epsilon.
    ema_decay: Ceiling of the weight EMA's decay (TF1-style warm-up below it).
    agc: Adaptive Gradient Clipping.
  """
  name: str = "sgd_agc"
  lr: float = 0.1
  lr_scale_by_batch: bool = True
  warmup_epochs: float = 5.0
  end_lr: float = 0.0
  momentum: float = 0.9
  nesterov: bool = True
  weight_decay: float = 2e-5
  b1: float = 0.9
  b2: float = 0.999
  adam_eps: float = 1e-8
  ema_decay: float = 0.99999
  agc: AGCOptions = dataclasses.field(default_factory=AGCOptions)

  def __post_init__(self):
    if self.name not in OPTIMIZER_NAMES:
      raise ValueError(f"Unknown optimizer.name {self.name!r}; use one of "
                       f"{list(OPTIMIZER_NAMES)}.")
    if not 0.0 <= self.ema_decay < 1.0:
      raise ValueError(f"optimizer.ema_decay must be in [0, 1), got {self.ema_decay}; the paper "
                       "uses 0.99999.")


@dataclasses.dataclass(frozen=True)
class TrainOptions:
  """`config.train`: batch, length, loss and precision of training.

  Attributes:
    batch_size: Global batch, over all hosts and devices.
    num_epochs: Training length in epochs of the training split.
    num_steps: > 0 overrides num_epochs.
    label_smoothing: s: targets y * (1 - s) + s / num_classes.
    bfloat16: bf16 forward/backward with float32 parameters, optimizer state and loss.
    sam_rho: > 0 turns on SAM: an ascent step of radius rho on sam_fraction of each device
      batch (not synchronised across devices, paper A.4).
    sam_fraction: Share of each device's batch used for the SAM ascent.
    skip_nonfinite: Skip a step with non-finite loss or gradients (counted) instead of stopping.
    log_every_steps: Train metrics are averaged over this many steps and logged.
    debug_nan_step: > 0 replaces the last device's inputs of this (1-based) step by NaNs (one
      host's data), to try the non-finite handling.
    grad_accum_steps: k: each device processes its batch in k micro-batches inside one step;
      the update, AGC, weight decay, schedule and EMA see the mean gradient of the whole
      global batch, as with k = 1.
    device_batch_limit: > 0 (and grad_accum_steps = 1): the smallest k whose micro-batch has
      at most this many examples per device is chosen.
    record_examples: Debug: each process appends the data set indices of its rows of every
      training batch to <workdir>/examples/process_<i>.jsonl (to check that a run sees the
      same examples on any topology; local workdirs only).
  """
  batch_size: int = 4096
  num_epochs: float = 360.0
  num_steps: int = 0
  label_smoothing: float = 0.1
  bfloat16: bool = True
  sam_rho: float = 0.0
  sam_fraction: float = 0.2
  skip_nonfinite: bool = False
  log_every_steps: int = 100
  debug_nan_step: int = 0
  grad_accum_steps: int = 1
  device_batch_limit: int = 0
  record_examples: bool = False

  def __post_init__(self):
    if self.batch_size <= 0:
      raise ValueError(f"train.batch_size must be positive, got {self.batch_size}.")
    if self.num_steps < 0 or self.num_epochs < 0 or (self.num_steps == 0
                                                     and self.num_epochs == 0):
      raise ValueError("Set train.num_steps > 0 or train.num_epochs > 0.")
    if not 0.0 <= self.label_smoothing < 1.0:
      raise ValueError(f"train.label_smoothing must be in [0, 1), got {self.label_smoothing}.")
    if self.sam_rho < 0:
      raise ValueError(f"train.sam_rho must be >= 0 (0 disables SAM), got {self.sam_rho}.")
    if not 0.0 < self.sam_fraction <= 1.0:
      raise ValueError(f"train.sam_fraction must be in (0, 1], got {self.sam_fraction}.")
    if self.grad_accum_steps < 1:
      raise ValueError(f"train.grad_accum_steps must be >= 1, got {self.grad_accum_steps}.")
    if self.device_batch_limit < 0:
      raise ValueError(f"train.device_batch_limit must be >= 0 (0: off), got "
                       f"{self.device_batch_limit}.")
    if self.device_batch_limit and self.grad_accum_steps != 1:
      raise ValueError("Set either train.grad_accum_steps or train.device_batch_limit, not both.")


@dataclasses.dataclass(frozen=True)
class EvalOptions:
  """`config.eval`.

  Attributes:
    batch_size: Global eval batch.
    every_steps: Evaluate every this many training steps; 0: only at the end.
    max_batches: > 0 caps the periodic evaluations (the final one is always full).
  """
  batch_size: int = 400
  every_steps: int = 5000
  max_batches: int = 0

  def __post_init__(self):
    if self.batch_size <= 0:
      raise ValueError(f"eval.batch_size must be positive, got {self.batch_size}.")


@dataclasses.dataclass(frozen=True)
class CheckpointOptions:
  """`config.checkpoint`: cadence and retention.

  Attributes:
    every_steps: Save when this many steps passed since the last save (0 disables).
    every_seconds: Save when this many seconds passed (0 disables); bounds the work a
      pre-emption can cost.
    keep: Most recent checkpoints kept.
  """
  every_steps: int = 5000
  every_seconds: float = 600.0
  keep: int = 3

  def __post_init__(self):
    if self.keep < 1:
      raise ValueError(f"checkpoint.keep must be >= 1, got {self.keep}; set "
                       "--config.checkpoint.keep=3.")
    if self.every_steps < 0 or self.every_seconds < 0:
      raise ValueError("checkpoint.every_steps/every_seconds must be >= 0 (0 disables).")


@dataclasses.dataclass(frozen=True)
class InitOptions:
  """`config.init`: start from trained weights instead of a random init (fine-tuning).

  Attributes:
    weights: DeepMind's F*_haiku.npz (read with the restricted unpickler), our npz
      (nfnets.weights.save_params / `python -m nfnets.export --formats=npz`), or a run's
      workdir (its newest verified checkpoint). When the source records its architecture (a
      workdir, our npz with a ModelSpec, DeepMind's files by their shapes), the model is taken
      from it: config.model's family and kwargs are replaced, except the regularisation rates
      (drop_rate, stochdepth_rate), which stay the config's.
    ema: From a workdir: its EMA weights (what the paper evaluates) or the raw ones.
    reset_head: Re-initialise the classifier even when the class count matches (it is always
      re-initialised when the class count differs).
    head_pattern: Regex over module names of the classifier (top-level 'linear' only, not
      the SE blocks' nested ones).
  """
  weights: str = ""
  ema: bool = True
  reset_head: bool = False
  head_pattern: str = r"^[^/]+/~/linear$"


@dataclasses.dataclass(frozen=True)
class PlanOptions:
  """`config.plan`: the target machine of `--mode=plan`.

  Attributes:
    device_memory_gb: Memory of one accelerator.
    num_devices: Devices of the planned run (all hosts); 0: this machine's.
    images_per_sec_per_device: Training speed the input pipeline must keep up with.
    cores_per_host: Host CPU cores, to state the per-core input rate.
    devices_per_host: Accelerators per host.
  """
  device_memory_gb: float = 80.0
  num_devices: int = 0
  images_per_sec_per_device: float = 6500.0
  cores_per_host: int = 112
  devices_per_host: int = 8


@dataclasses.dataclass(frozen=True)
class ProfileOptions:
  """`config.profile`: a jax.profiler trace of a few steps, on host 0.

  Attributes:
    start_step: First traced step (1-based); 0 disables profiling.
    num_steps: Steps traced; written under <workdir>/profile.
  """
  start_step: int = 0
  num_steps: int = 3


@dataclasses.dataclass(frozen=True)
class ExperimentOptions:
  """The whole experiment (`configs/*.py` after overrides).

  Attributes:
    seed: Parameter init and per-step randomness (dropout, stochastic depth, augmentation).
    model: The network.
    optimizer: The optimizer, schedule and EMA.
    data: The input pipeline.
    train: Training.
    eval: Evaluation.
    checkpoint: Checkpoint cadence.
    init: Initial weights.
    plan: Target machine of --mode=plan.
    profile: Profiling.
    distributed: Call jax.distributed.initialize() (also NFNETS_DISTRIBUTED=1).
    compilation_cache_dir: '' -> $NFNETS_COMPILATION_CACHE or <workdir>/jax_cache.
    tensorboard: Also write TensorBoard event files.
  """
  seed: int = 0
  model: ModelOptions = dataclasses.field(default_factory=ModelOptions)
  optimizer: OptimizerOptions = dataclasses.field(default_factory=OptimizerOptions)
  data: DataOptions = dataclasses.field(default_factory=DataOptions)
  train: TrainOptions = dataclasses.field(default_factory=TrainOptions)
  eval: EvalOptions = dataclasses.field(default_factory=EvalOptions)
  checkpoint: CheckpointOptions = dataclasses.field(default_factory=CheckpointOptions)
  init: InitOptions = dataclasses.field(default_factory=InitOptions)
  plan: PlanOptions = dataclasses.field(default_factory=PlanOptions)
  profile: ProfileOptions = dataclasses.field(default_factory=ProfileOptions)
  distributed: bool = False
  compilation_cache_dir: str = ""
  tensorboard: bool = True

  @classmethod
  def from_config(cls, config: Any) -> "ExperimentOptions":
    """Reads a ConfigDict (or nested mapping) into options; unknown keys are refused by name."""
    return _build(cls, to_plain(config), "config")

  @classmethod
  def from_json(cls, text: str) -> "ExperimentOptions":
    """Reads a saved `config.json`."""
    return _build(cls, json.loads(text), "config")

  def to_json(self) -> str:
    return json.dumps(to_plain(self), indent=2, sort_keys=True)

  def with_absolute_paths(self) -> "ExperimentOptions":
    """The same options with local data/weights paths made absolute (URLs kept), so a run's
    config.json means the same from any directory."""
    from nfnets import paths  # pylint: disable=g-import-not-at-top
    fix = lambda p: paths.absolute(p) if p else p
    data = dataclasses.replace(self.data, data_dir=fix(self.data.data_dir),
                               folder=fix(self.data.folder))
    init = dataclasses.replace(self.init, weights=fix(self.init.weights))
    return dataclasses.replace(self, data=data, init=init)


def to_plain(value: Any) -> Any:
  """Dataclasses, ConfigDicts, mappings and tuples as plain JSON-able dicts and lists.

  The one conversion of config-like values: the options, the saved config.json and the
  checkpoint signature all go through it.
  """
  if dataclasses.is_dataclass(value) and not isinstance(value, type):
    return {f.name: to_plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
  if hasattr(value, "to_dict") and callable(value.to_dict):
    value = value.to_dict()
  if isinstance(value, Mapping):
    return {str(k): to_plain(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [to_plain(v) for v in value]
  if hasattr(value, "item") and callable(value.item):  # numpy scalars
    return value.item()
  return value


# Keys of workdirs written by earlier versions: old name -> (new name, value conversion).
_RENAMED = {
    "InitOptions": {"official_weights": ("weights", None), "params_path": ("weights", None),
                    "drop_head": ("reset_head", None)},
}


def _renamed(cls: type, values: Mapping[str, Any]) -> dict[str, Any]:
  out = {}
  for key, value in values.items():
    new, _ = _RENAMED.get(cls.__name__, {}).get(key, (key, None))
    if new != key and (value in ("", None) or new in values):
      continue  # An empty old key, or the new key given too: the new one wins.
    out[new] = value
  return out


def _build(cls: type, values: Any, path: str) -> Any:
  if not isinstance(values, Mapping):
    raise ValueError(f"{path} must be a section (a dict), got {type(values).__name__}.")
  values = _renamed(cls, values)
  hints = typing.get_type_hints(cls)
  fields = {f.name: f for f in dataclasses.fields(cls)}
  unknown = sorted(set(values) - set(fields))
  if unknown:
    raise ValueError(f"Unknown config key(s) {[f'{path}.{k}' for k in unknown]}; "
                     f"{path} has {sorted(fields)}.")
  kwargs = {}
  for name, value in values.items():
    hint = hints[name]
    if dataclasses.is_dataclass(hint):
      kwargs[name] = _build(hint, value, f"{path}.{name}")
    elif typing.get_origin(hint) is tuple and isinstance(value, (list, tuple)):
      kwargs[name] = tuple(value)
    elif name == "kwargs":
      kwargs[name] = _freeze_lists(value)
    else:
      kwargs[name] = value
  return cls(**kwargs)


def _freeze_lists(value: Any) -> Any:
  """Lists (as JSON gives them) back to tuples, recursively, inside a kwargs mapping."""
  if isinstance(value, Mapping):
    return {k: _freeze_lists(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return tuple(_freeze_lists(v) for v in value)
  return value


def to_config_dict(options: Optional[ExperimentOptions] = None) -> ml_collections.ConfigDict:
  """The ConfigDict the config files start from: these defaults, with typed optional fields.

  Optional fields (None by default) become typed FieldReferences, so a command-line override
  such as `--config.data.data_dir=/data` still type-checks on the locked config.
  """
  options = options or ExperimentOptions()
  return _config_section(options)


def _config_section(options: Any) -> ml_collections.ConfigDict:
  hints = typing.get_type_hints(type(options))
  section = ml_collections.ConfigDict()
  for field in dataclasses.fields(options):
    value = getattr(options, field.name)
    hint = hints[field.name]
    if dataclasses.is_dataclass(value):
      section[field.name] = _config_section(value)
    elif isinstance(value, Mapping):
      section[field.name] = ml_collections.ConfigDict(dict(value))
    elif typing.get_origin(hint) is typing.Union and type(None) in typing.get_args(hint):
      field_type = next(t for t in typing.get_args(hint) if t is not type(None))
      section[field.name] = ml_collections.FieldReference(value, field_type=field_type)
    else:
      section[field.name] = value
  return section
