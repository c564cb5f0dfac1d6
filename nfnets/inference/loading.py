"""A trained model from whatever the user has: DeepMind's file, our npz, or a run's workdir.

`load_model(path)` returns the network's description (`ModelSpec`: family, class count, constructor
kwargs, class names, evaluation resolution and protocol), its parameters and its Haiku state:

* a workdir (a directory): its saved config.json and dataset.json describe the model; the
  parameters come from its newest readable checkpoint (the EMA copy by default, the weights
  the paper evaluates);
* our `.npz` (`nfnets.weights.save_params`): the ModelSpec stored in it, if any;
* DeepMind's `F*_haiku.npz` pickle: an NFNet whose variant is read off the parameter tree
  (blocks per stage and widths), checked against that variant's shapes.

`model=`/`variant=` (or a whole `ModelOptions`) override or supply what a file does not say;
`load_described` lets an experiment config (a configs/*.py file, loaded by ml_collections as
`experiment.py` loads it) say it, with the config's evaluation resolution and protocol. Weights
that are not floating point (refused by the readers in `nfnets.weights`) or hold NaN/Inf are
refused by name: they would evaluate to garbage without an error.
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Any, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np

from nfnets import weights as weights_lib
from nfnets.inference import inputs
from nfnets.models import registry
from nfnets.models.nfnet import NFNet
from nfnets.weights.npz import ModelSpec

IMAGENET_CLASSES = 1000


@dataclasses.dataclass(frozen=True)
class LoadedModel:
  """A model ready to evaluate.

  Attributes:
    spec: The network and its evaluation protocol.
    params: Haiku params (numpy).
    state: Haiku state (empty for NF models).
    source: Where they came from, for messages.
  """
  spec: ModelSpec
  params: dict
  state: dict
  source: str


def _is_zip(path: str) -> bool:
  with weights_lib.npz.open_regular(path) as f:  # A FIFO or device is refused, not read.
    return f.read(4) == weights_lib.npz.ZIP_MAGIC


def _read(path: str, ema: bool) -> tuple[Optional[ModelSpec], dict, dict, str, bool]:
  """(the spec the source records or None, params, state, description, whether a workdir).

  A workdir (local or gs://) gives its config's spec; our npz its stored ModelSpec (or None);
  DeepMind's pickle None (the caller may infer the variant). A weights file on cloud storage is
  copied to a local temporary file first (the readers check local files).
  """
  from nfnets import paths  # pylint: disable=g-import-not-at-top
  if paths.is_url(path):
    where = paths.resolve(path)
    if not where.exists():
      raise ValueError(f"{path} does not exist; pass a weights file (.npz) or a run's workdir.")
    if where.is_dir():
      loaded = _from_workdir(os.fspath(where), ema)
      return loaded.spec, loaded.params, loaded.state, loaded.source, True
    import tempfile  # pylint: disable=g-import-not-at-top
    with tempfile.NamedTemporaryFile(suffix=where.suffix) as local:
      local.write(where.read_bytes())
      local.flush()
      spec, params, state, _, _ = _read(local.name, ema)
    return spec, params, state, path, False
  path = inputs.check_weights_path(path)
  if os.path.isdir(path):
    loaded = _from_workdir(path, ema)
    return loaded.spec, loaded.params, loaded.state, loaded.source, True
  if _is_zip(path):
    params, stored = weights_lib.read_npz(path)
    return stored, params, {}, path, False
  return None, weights_lib.load_official(path), {}, path, False


def infer_nfnet_spec(params: dict, source: str) -> ModelSpec:
  """The NFNet-F variant of a released parameter tree (F0..F7, F0+..F7+), from its shapes."""
  tops = {m.split("/", 1)[0] for m in params}
  if len(tops) != 1 or f"{next(iter(tops))}/~/stem_conv0" not in params:
    raise ValueError(f"{source} is not an NFNet parameter tree (no '<name>/~/stem_conv0'); pass "
                     "--model and --variant (or --config) for other families.")
  name = next(iter(tops))
  blocks = [m for m in params if re.fullmatch(re.escape(name) + r"/~/nf_block(_\d+)?", m)]
  width = int(params[f"{name}/~/final_conv"]["w"].shape[2])
  num_classes = int(params[f"{name}/~/linear"]["w"].shape[1])
  multiple, rest = divmod(len(blocks), 12)  # F0 has 1 + 2 + 6 + 3 blocks; Fk has k + 1 times that.
  variant = f"F{multiple - 1}" + {1536: "", 2048: "+"}.get(width, "?")
  if rest or variant not in NFNet.VARIANTS:
    raise ValueError(f"{source}: {len(blocks)} blocks of width {width} match no NFNet variant; "
                     "pass --variant (or --config).")
  spec = ModelSpec(name="NFNet", num_classes=num_classes, kwargs={"variant": variant},
                   eval_image_size=NFNet.VARIANTS[variant].test_imsize)
  _check_shapes(spec, params, source)
  return spec


def _expected_shapes(spec: ModelSpec) -> dict:
  forward = registry.make_forward(spec.name, spec.num_classes, **spec.kwargs)
  size = spec.eval_image_size or 32
  shapes, _ = jax.eval_shape(
      lambda: forward.init(jax.random.PRNGKey(0), jnp.zeros((1, size, size, spec.channels)),
                           is_training=True))
  return shapes


def _check_shapes(spec: ModelSpec, params: dict, source: str) -> None:
  want = _expected_shapes(spec)
  have = {(m, n): tuple(np.shape(v)) for m, leaves in params.items() for n, v in leaves.items()}
  need = {(m, n): tuple(v.shape) for m, leaves in want.items() for n, v in leaves.items()}
  if have != need:
    diff = sorted(set(have.items()) ^ set(need.items()))[:2]
    raise ValueError(f"{source} does not fit {spec.name} {spec.kwargs} ({diff}); check "
                     "--model/--variant against the weights.")


def _from_workdir(workdir: str, ema: bool) -> LoadedModel:
  """A run's newest verified checkpoint, read only: params and model state, no optimizer.

  config.json and dataset.json describe the model and its classes; both are checked against the
  model signature the run stored beside its checkpoints, so an edited file is refused by name
  instead of silently running another model or printing other names.
  """
  from nfnets.train import checkpoints  # pylint: disable=g-import-not-at-top
  from nfnets.train import integrity  # pylint: disable=g-import-not-at-top
  from nfnets.train import workdir as workdir_lib  # pylint: disable=g-import-not-at-top
  from nfnets import paths  # pylint: disable=g-import-not-at-top
  options = workdir_lib.saved_options(workdir)
  info = workdir_lib.saved_dataset_info(workdir)
  num_classes = info.num_classes if info else (options.data.num_classes or IMAGENET_CLASSES)
  channels = info.channels if info else 3
  spec = ModelSpec(name=options.model.name, num_classes=num_classes,
                   kwargs=dict(options.model.kwargs),
                   class_names=info.class_names if info else None,
                   eval_image_size=options.data.eval_image_size,
                   eval_preproc=options.data.eval_preproc, channels=channels)
  forward = registry.make_forward(spec.name, num_classes, **spec.kwargs)
  size = options.data.image_size
  shapes, state_shapes = jax.eval_shape(lambda: forward.init(
      jax.random.PRNGKey(0), jnp.zeros((1, size, size, channels)), is_training=True))
  ckpt_dir = paths.resolve(workdir) / "checkpoints"
  saved = integrity.read_signature(ckpt_dir)
  if saved is not None:
    described = integrity.model_signature(spec.name, spec.kwargs, shapes, info)
    if not integrity.same_model(saved, described):
      raise ValueError(
          f"{workdir}: config.json / dataset.json no longer describe its checkpoints "
          f"({integrity.signature_diff(saved, described)}, per {ckpt_dir}/"
          f"{integrity.SIGNATURE_FILE}); restore the original files.")
  weights = checkpoints.read_weights(ckpt_dir, {"params": shapes, "state": state_shapes},
                                     ema=ema)
  which = "EMA weights" if ema else "weights"
  return LoadedModel(spec, weights.params, weights.state,
                     f"{workdir} (step {weights.step}, {which})")


def load_model(path: str, *, model: Optional[str] = None, variant: Optional[str] = None,
               model_kwargs: Optional[dict] = None, num_classes: Optional[int] = None,
               ema: bool = True) -> LoadedModel:
  """The model and parameters at `path` (a workdir, our npz, or DeepMind's pickle).

  Args:
    path: The weights.
    model: A family of `nfnets.models.MODELS`, when the file does not say.
    variant: The family's variant name (e.g. 'F0'), when the file does not say.
    model_kwargs: Other constructor kwargs (override the file's).
    num_classes: Classifier outputs, when the file does not say (read off the params else).
    ema: For a workdir: the EMA weights (True, what the paper evaluates) or the raw ones.

  Returns:
    The `LoadedModel`.
  """
  spec, params, state, source, _ = _read(os.fspath(path), ema)
  if spec is None and model is None and variant is None:
    spec = infer_nfnet_spec(params, source)
  if model is not None or variant is not None or model_kwargs or spec is None:
    name = model or (spec.name if spec else "NFNet")
    kwargs = dict(spec.kwargs) if spec and spec.name == name else {}
    kwargs.update(model_kwargs or {})
    if variant is not None:
      kwargs["variant"] = variant
    classes = num_classes or (spec.num_classes if spec else _head_classes(params, path))
    named = kwargs.get("variant")
    test_size = (registry.model_class(name).VARIANTS[named].test_imsize
                 if isinstance(named, str) and named in registry.model_class(name).VARIANTS
                 else None)
    spec = ModelSpec(name=name, num_classes=classes, kwargs=kwargs,
                     class_names=spec.class_names if spec else None,
                     eval_image_size=test_size or (spec.eval_image_size if spec else None))
    _check_shapes(spec, params, source)
  weights_lib.check_finite(params, source)
  return LoadedModel(spec, params, state, source)


def read_config(path: str) -> Any:
  """The ConfigDict of a configs/*.py file ('file.py' or 'file.py:arg'), as experiment.py reads it.

  Loaded by ml_collections' config-file parser (what `config_flags.DEFINE_config_file` runs),
  and locked, as experiment.py's. The config files import their shared defaults as
  `configs.common`, so the repository root must be importable: the current directory when
  commands run from it, else PYTHONPATH.
  """
  # The parser class behind DEFINE_config_file (public, in the package's own module).
  from ml_collections.config_flags import config_flags  # pylint: disable=g-import-not-at-top
  inputs.check_config_path(path)
  try:
    return config_flags.ConfigFileFlagParser("config", lock_config=True).parse(path)
  except ImportError as e:
    raise ValueError(inputs.config_import_message(path, e)) from None


def load_described(weights: str, *, model: Optional[str] = None,
                   variant: Optional[str] = None, config: Union[None, str, Any] = None,
                   ema: bool = True) -> LoadedModel:
  """`load_model`, told the model and evaluation protocol by an experiment config if given.

  Args:
    weights: DeepMind's file, our npz or a run's workdir.
    model: A family of `nfnets.models.MODELS` (overrides the config's and the file's).
    variant: The family's variant (overrides the config's and the file's).
    config: None, a configs/*.py path ('file.py[:arg]') or its loaded ConfigDict: its
      config.model gives the network, its config.data.eval_image_size / eval_preproc the
      evaluation, as that run would have evaluated. The class count is read off the weights'
      classifier, not the config's data set.
    ema: For a workdir: the EMA weights (else the raw ones).

  Returns:
    The `LoadedModel`.
  """
  options = None
  if config is not None:
    from nfnets.train.options import ExperimentOptions  # pylint: disable=g-import-not-at-top
    options = ExperimentOptions.from_config(read_config(config) if isinstance(config, str)
                                            else config)
  loaded = load_model(weights, model=model or (options.model.name if options else None),
                      variant=variant,
                      model_kwargs=dict(options.model.kwargs) if options else None, ema=ema)
  if options is not None:
    loaded = dataclasses.replace(loaded, spec=dataclasses.replace(
        loaded.spec, eval_image_size=options.data.eval_image_size,
        eval_preproc=options.data.eval_preproc))
  return loaded


def eval_size(spec: ModelSpec) -> int:
  """The evaluation resolution: the spec's, else its variant's test_imsize."""
  if spec.eval_image_size:
    return int(spec.eval_image_size)
  variant = registry.resolve_kwargs(spec.name, spec.kwargs).get("variant")
  size = getattr(variant, "test_imsize", None)
  if size is None:
    raise ValueError(f"{spec.name} {spec.kwargs} has no evaluation resolution; pass --config "
                     "(its data.eval_image_size) or save the weights with a ModelSpec.")
  return int(size)


def _head_classes(params: dict, source: str) -> int:
  heads = [m for m in params if re.fullmatch(r"[^/]+/~/linear", m)]
  if len(heads) != 1:
    raise ValueError(f"{source}: cannot tell the class count; pass --num_classes.")
  return int(params[heads[0]]["w"].shape[1])


def workdir_params(workdir: str, ema: bool = True) -> tuple[dict, ModelSpec]:
  """A run's (EMA) parameters and its ModelSpec, ready for `nfnets.weights.save_params`."""
  loaded = load_model(workdir, ema=ema)
  return loaded.params, loaded.spec


def read_source(path: str, ema: bool = True) -> tuple[Optional[ModelSpec], dict, dict, str]:
  """(spec or None, params, state, description) of any weights source, nothing assumed.

  The spec is what the source itself records: a workdir's config, our npz's ModelSpec, or the
  NFNet variant read off DeepMind's parameter tree; None when it records nothing (then the
  caller's config describes the model).
  """
  spec, params, state, source, _ = _read(os.fspath(path), ema)
  if spec is None:
    try:
      spec = infer_nfnet_spec(params, source)
    except ValueError:
      spec = None
  return spec, params, state, source
