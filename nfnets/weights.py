"""NFNet weight files: DeepMind's released checkpoints, a safe native format, timm.

* `load_official` reads DeepMind's `F0_haiku.npz` ... `F6_haiku.npz`. Despite the
  name these are dill pickles of a Haiku params tree, and unpickling an untrusted
  file can run arbitrary code. They are read with a restricted unpickler that can
  only rebuild numpy arrays, dtypes and scalars: every other global is refused
  *before* anything is called, with `UnsafeWeightsError`.
* `save_params` / `load_params`: our own format, an `.npz` read with
  `allow_pickle=False` (keys `module_path::param_name`), written atomically.
* `haiku_to_timm` / `timm_to_haiku`: the parameter mapping to timm's
  `dm_nfnet_f*` state_dict (conv kernels HWIO <-> OIHW, gains (O,) <-> (O,1,1,1),
  SE linears <-> 1x1 convs, classifier transpose). Both directions use one table,
  so they are exact inverses.

Arrays come back as numpy; Haiku and jax accept them as params directly.
"""

from __future__ import annotations

import os
import pickle
import re
import tempfile
import zipfile
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import ml_dtypes
import numpy as np

Params = dict[str, dict[str, np.ndarray]]

_ZIP_MAGIC = b"PK\x03\x04"
_NPY_MAGIC = b"\x93NUMPY"
_SEP = "::"
# Extension dtypes numpy cannot describe in an .npy header without pickle: they are
# stored as their raw bits (same itemsize) under `key::<dtype name>`, so the round
# trip is bit-exact (bf16 params/EMA copies from mixed-precision training).
_BITS_DTYPES: dict[str, tuple[Any, Any]] = {
    "bfloat16": (np.dtype(ml_dtypes.bfloat16), np.dtype(np.uint16)),
}
_NUMERIC_KINDS = "biufc"


class UnsafeWeightsError(ValueError):
  """A weights file asked for something other than numpy arrays/dicts/scalars."""


# Restricted unpickling of DeepMind's dill files.


def _check_dtype(dtype: Any) -> np.dtype:
  # Object dtypes could carry any Python object; void/structured are never params.
  if not isinstance(dtype, np.dtype) or dtype.kind not in _NUMERIC_KINDS:
    raise UnsafeWeightsError(f"refused dtype {dtype!r}: only numeric numpy dtypes")
  return dtype


def _reconstruct(subtype: Any, shape: Any, typecode: Any) -> np.ndarray:
  # numpy pickles an array as `_reconstruct(ndarray, (0,), b'b')` + __setstate__;
  # the placeholder it builds is tiny, so anything larger is not numpy's output.
  if subtype is not _NDARRAY:
    raise UnsafeWeightsError("refused _reconstruct of a non-ndarray type")
  if (not isinstance(shape, tuple) or not all(type(d) is int and d >= 0 for d in shape)
      or int(np.prod(shape)) > 1024 or not isinstance(typecode, (bytes, str))):
    raise UnsafeWeightsError(f"refused _reconstruct arguments {shape!r}, {typecode!r}")
  code = typecode.decode("ascii") if isinstance(typecode, bytes) else typecode
  return np.ndarray(shape, dtype=_check_dtype(np.dtype(code)))


def _create_array(f: Any, args: Any, state: Any, npdict: Any = None) -> np.ndarray:
  # dill wraps every ndarray as `_create_array(_reconstruct, args, state, __dict__)`.
  if f is not _RECONSTRUCT:
    raise UnsafeWeightsError("refused dill _create_array with a non-numpy constructor")
  if npdict:  # A plain ndarray has no __dict__; a subclass's attributes are not params.
    raise UnsafeWeightsError("refused dill _create_array with instance attributes")
  array = f(*args)
  # State is (version, shape, dtype, is_fortran, raw) or, pre-version, without version.
  if not isinstance(state, tuple) or len(state) not in (4, 5):
    raise UnsafeWeightsError("refused a malformed ndarray state")
  _check_dtype(state[-3])
  array.__setstate__(state)
  return array


def _scalar(dtype: Any, data: Any) -> np.generic:
  _check_dtype(dtype)
  if not isinstance(data, bytes) or len(data) != dtype.itemsize:
    raise UnsafeWeightsError("refused a numpy scalar whose payload is not raw bytes")
  return np.frombuffer(data, dtype=dtype)[0]


def _frombuffer(buf: Any, dtype: Any, shape: Any, order: Any) -> np.ndarray:
  # Pickle protocol 5 spelling of an ndarray.
  _check_dtype(dtype)
  if not isinstance(buf, (bytes, bytearray, memoryview)) or order not in ("C", "F"):
    raise UnsafeWeightsError("refused a numpy _frombuffer with a non-bytes buffer")
  return np.frombuffer(buf, dtype=dtype).reshape(shape, order=order).copy()


def _make_dtype(obj: Any, align: Any = False, copy: Any = False) -> np.dtype:
  if not isinstance(obj, str) or not re.fullmatch(r"[<>|=]?[a-zA-Z]\d{0,2}", obj):
    raise UnsafeWeightsError(f"refused dtype spec {obj!r}")
  return _check_dtype(np.dtype(obj, align=bool(align), copy=bool(copy)))


def _latin1_encode(text: Any, encoding: Any = "latin1") -> bytes:
  # Protocol-2 pickles spell bytes as `_codecs.encode(str, 'latin1')`.
  if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
    raise UnsafeWeightsError("refused _codecs.encode other than str -> latin1 bytes")
  return text.encode("latin1")


def _haiku_mapping(data: Any) -> dict:
  # Haiku's params containers (frozendict, FlatMapping) pickle as `Class(dict)`;
  # the released files need them, so they are rebuilt as plain dicts.
  if not isinstance(data, dict):
    raise UnsafeWeightsError("refused a Haiku mapping built from a non-dict")
  return dict(data)


class _SafeGlobal:
  """What `find_class` hands the unpickler: an inert callable wrapper.

  Returning our module functions directly would let a BUILD opcode set attributes
  (e.g. `__defaults__`) on them; this wrapper refuses any state, and `None` as the
  function makes it a pure token (numpy.ndarray is only ever an argument).
  """

  __slots__ = ("_name", "_fn")

  def __init__(self, name: str, fn: Callable[..., Any] | None):
    self._name, self._fn = name, fn

  def __call__(self, *args: Any) -> Any:
    if self._fn is None:
      raise UnsafeWeightsError(f"refused a call of {self._name}")
    return self._fn(*args)

  def __setstate__(self, state: Any) -> None:
    raise UnsafeWeightsError(f"refused setting state on {self._name}")


_NDARRAY = _SafeGlobal("numpy.ndarray", None)
_RECONSTRUCT = _SafeGlobal("numpy _reconstruct", _reconstruct)
_SAFE_GLOBALS: dict[tuple[str, str], _SafeGlobal] = {
    ("numpy", "ndarray"): _NDARRAY,
    ("numpy", "dtype"): _SafeGlobal("numpy.dtype", _make_dtype),
}
for _core in ("numpy.core", "numpy._core"):  # numpy 1.x and 2.x module names.
  _SAFE_GLOBALS[(f"{_core}.multiarray", "_reconstruct")] = _RECONSTRUCT
  _SAFE_GLOBALS[(f"{_core}.multiarray", "scalar")] = _SafeGlobal("numpy scalar", _scalar)
  _SAFE_GLOBALS[(f"{_core}.numeric", "_frombuffer")] = _SafeGlobal(
      "numpy _frombuffer", _frombuffer)
for _dill in ("dill._dill", "dill.dill"):  # dill >= 0.3 and its older module name.
  _SAFE_GLOBALS[(_dill, "_create_array")] = _SafeGlobal("dill _create_array",
                                                        _create_array)
for _hk_name in ("FlatMapping", "FlatMap", "frozendict"):
  _SAFE_GLOBALS[("haiku._src.data_structures", _hk_name)] = _SafeGlobal(
      f"haiku {_hk_name}", _haiku_mapping)
for _codecs in ("_codecs", "codecs"):
  _SAFE_GLOBALS[(_codecs, "encode")] = _SafeGlobal("codecs.encode", _latin1_encode)


class _RestrictedUnpickler(pickle.Unpickler):
  """Resolves only `_SAFE_GLOBALS`; refuses everything else before it is called."""

  def find_class(self, module: str, name: str) -> Any:
    safe = _SAFE_GLOBALS.get((module, name))
    if safe is None:
      raise UnsafeWeightsError(
          f"refused global {module}.{name}: not a numpy array/dtype constructor")
    return safe

  def persistent_load(self, pid: Any) -> Any:
    raise UnsafeWeightsError("refused a pickle persistent id")


def _validate_tree(tree: Any, source: str) -> Params:
  """Checks dict[str, dict[str, float array]] and returns it with ndarray leaves."""
  if not isinstance(tree, dict) or not tree:
    raise ValueError(f"{source}: expected a non-empty dict of modules, got "
                     f"{type(tree).__name__}; is this a Haiku params file?")
  out: Params = {}
  for module, inner in tree.items():
    if not isinstance(module, str) or not isinstance(inner, dict):
      raise ValueError(f"{source}: entry {module!r} is not a str -> dict of params; "
                       "expected Haiku's {module_path: {param_name: array}}")
    out[module] = {}
    for name, value in inner.items():
      if isinstance(value, np.generic):
        value = np.asarray(value)
      if (not isinstance(name, str) or not isinstance(value, np.ndarray)
          or value.dtype.kind != "f"):
        raise ValueError(f"{source}: {module}/{name} is {type(value).__name__} "
                         f"{getattr(value, 'dtype', '')}, expected a float numpy array")
      out[module][name] = value
  return out


def load_official(path: str | os.PathLike) -> Params:
  """Loads DeepMind's released `F*_haiku.npz` (a dill pickle) without running code.

  A genuine `.npz` zip (sniffed by its magic bytes) is read with
  `np.load(allow_pickle=False)` instead; its keys may be `module::param`,
  `module/param` or the official flattened `NFNet.stem_conv0.w` form.

  Args:
    path: The weights file.

  Returns:
    Haiku params `{module_path: {param_name: float ndarray}}`.

  Raises:
    UnsafeWeightsError: The pickle references anything beyond numpy arrays,
      dtypes, scalars and dicts. It is refused before that thing is called.
    ValueError: The file is not a params tree of float arrays, or is corrupt.
  """
  path = os.fspath(path)
  with open(path, "rb") as f:
    head = f.read(8)
    if head.startswith(_ZIP_MAGIC):
      return _validate_tree(_load_npz(path), path)
    if head.startswith(_NPY_MAGIC):
      raise ValueError(f"{path} is a single-array .npy, not a params tree; "
                       "pass the F*_haiku.npz file or a save_params file")
    f.seek(0)
    try:
      tree = _RestrictedUnpickler(f).load()
    except UnsafeWeightsError as e:
      raise UnsafeWeightsError(f"{path}: {e}; nothing from the file was executed") from None
    except Exception as e:  # Truncated, or not a pickle at all.
      detail = f"{type(e).__name__}: {e}".replace("\n", " ")
      raise ValueError(f"{path} is not a readable weights pickle ({detail}); "
                       "re-download it") from None
  return _validate_tree(tree, path)


# Native format: npz, no pickle.


def save_params(path: str | os.PathLike, params: Mapping[str, Mapping[str, Any]]) -> None:
  """Writes Haiku params to `path` as an npz, atomically (temp file + rename).

  bfloat16 leaves are stored as their raw 16-bit patterns and restored bit-exactly.
  The file is written to exactly `path` (no `.npz` suffix is appended).

  Args:
    path: Destination file.
    params: `{module_path: {param_name: array}}`; numpy or jax arrays.
  """
  path = os.fspath(path)
  arrays: dict[str, np.ndarray] = {}
  for module, inner in params.items():
    for name, value in inner.items():
      if _SEP in module or _SEP in name:
        raise ValueError(f"param {module}/{name} contains '{_SEP}'; rename the module")
      arr = np.asarray(value)
      key = f"{module}{_SEP}{name}"
      for dtype_name, (dtype, bits) in _BITS_DTYPES.items():
        if arr.dtype == dtype:
          arr, key = arr.view(bits), f"{key}{_SEP}{dtype_name}"
      if arr.dtype.kind not in _NUMERIC_KINDS:
        raise ValueError(f"param {module}/{name} has dtype {arr.dtype}; only numeric "
                         f"arrays and {sorted(_BITS_DTYPES)} can be saved")
      arrays[key] = arr
  directory = os.path.dirname(os.path.abspath(path))
  fd, tmp = tempfile.mkstemp(dir=directory, prefix=".params-", suffix=".tmp")
  try:
    with os.fdopen(fd, "wb") as f:
      np.savez(f, **arrays)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)  # Readers see the old file or the whole new one.
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def _split_key(key: str) -> tuple[str, str, str | None]:
  parts = key.split(_SEP)
  if len(parts) == 2:
    return parts[0], parts[1], None
  if len(parts) == 3 and parts[2] in _BITS_DTYPES:
    return parts[0], parts[1], parts[2]
  if len(parts) == 1 and "/" in key:  # `module/param`, Haiku's own path spelling.
    return (*key.rsplit("/", 1), None)
  if len(parts) == 1 and "." in key:
    # The official flatten_haiku_tree form: every '/~/' became '.', which NFNet
    # modules only ever used as separators.
    module, name = key.rsplit(".", 1)
    return module.replace(".", "/~/"), name, None
  raise ValueError(f"key {key!r} is not 'module_path::param_name'")


def _load_npz(path: str) -> Params:
  params: Params = {}
  try:
    with np.load(path, allow_pickle=False) as data:
      for key in data.files:
        module, name, bits_dtype = _split_key(key)
        arr = data[key]
        if bits_dtype is not None:
          arr = arr.view(_BITS_DTYPES[bits_dtype][0])
        params.setdefault(module, {})[name] = arr
  except (zipfile.BadZipFile, EOFError, OSError, ValueError, KeyError) as e:
    raise ValueError(f"{path} is not a readable params npz ({type(e).__name__}: {e}); "
                     "it may be truncated, re-save it with save_params") from None
  if not params:
    raise ValueError(f"{path} holds no params")
  return params


def load_params(path: str | os.PathLike) -> Params:
  """Reads a file written by `save_params` (never unpickles anything).

  Args:
    path: File written by `save_params`.

  Returns:
    Haiku params `{module_path: {param_name: ndarray}}` with the saved dtypes.
  """
  path = os.fspath(path)
  with open(path, "rb") as f:
    if not f.read(4).startswith(_ZIP_MAGIC):
      raise ValueError(f"{path} is not an npz written by save_params (no zip header); "
                       "for DeepMind's dill files use load_official")
  return _load_npz(path)


# Haiku <-> timm dm_nfnet_f* mapping (one table, used both ways).


class _Entry(NamedTuple):
  module: str  # Haiku module path.
  name: str    # Haiku param name.
  key: str     # timm state_dict key.
  kind: str    # Key of _TO_TIMM / _TO_HAIKU.


# Haiku -> timm and back, each with the ndim its input must have.
_BOTH_WAYS = {"fc": (2, lambda w: w.T),  # (I,O) <-> (O,I)
              "vector": (1, lambda b: b), "scalar": (0, lambda s: s)}
_TO_TIMM: dict[str, tuple[int, Callable[[np.ndarray], np.ndarray]]] = {
    "conv": (4, lambda w: w.transpose(3, 2, 0, 1)),  # HWIO -> OIHW
    "gain": (1, lambda g: g.reshape(-1, 1, 1, 1)),   # (O,) -> (O,1,1,1)
    "se": (2, lambda w: w.T[:, :, None, None]),      # (I,O) -> 1x1 conv (O,I,1,1)
    **_BOTH_WAYS}
_TO_HAIKU: dict[str, tuple[int, Callable[[np.ndarray], np.ndarray]]] = {
    "conv": (4, lambda w: w.transpose(2, 3, 1, 0)),  # OIHW -> HWIO
    "gain": (4, lambda g: g.reshape(-1)),
    "se": (4, lambda w: w[:, :, 0, 0].T),
    **_BOTH_WAYS}


def _block_module(name: str, k: int) -> str:
  # Haiku names repeated modules nf_block, nf_block_1, nf_block_2, ...
  return f"{name}/~/nf_block" + (f"_{k}" if k else "")


def _conv(module: str, key: str) -> list[_Entry]:
  # Entries follow timm's state_dict order, so converted dicts list like timm's.
  return [_Entry(module, "w", f"{key}.weight", "conv"),
          _Entry(module, "bias", f"{key}.bias", "vector"),
          _Entry(module, "gain", f"{key}.gain", "gain")]


def _layout(name: str, depths: Sequence[int], shortcut: Sequence[bool]) -> list[_Entry]:
  """All (Haiku, timm) param pairs of an NFNet with these depths."""
  entries: list[_Entry] = []
  for i in range(4):
    entries += _conv(f"{name}/~/stem_conv{i}", f"stem.conv{i + 1}")
  k = 0
  for s, depth in enumerate(depths):
    for b in range(depth):
      p, t = _block_module(name, k), f"stages.{s}.{b}"
      entries.append(_Entry(p, "skip_gain", f"{t}.skipinit_gain", "scalar"))
      if shortcut[k]:
        entries += _conv(f"{p}/~/conv_shortcut", f"{t}.downsample.conv")
      for hk_conv, timm_conv in (("conv0", "conv1"), ("conv1", "conv2"),
                                 ("conv1b", "conv2b"), ("conv2", "conv3")):
        entries += _conv(f"{p}/~/{hk_conv}", f"{t}.{timm_conv}")
      for hk_lin, timm_fc in (("linear", "fc1"), ("linear_1", "fc2")):
        se = f"{p}/~/squeeze_excite/~/{hk_lin}"
        entries += [_Entry(se, "w", f"{t}.attn_last.{timm_fc}.weight", "se"),
                    _Entry(se, "b", f"{t}.attn_last.{timm_fc}.bias", "vector")]
      k += 1
  entries += _conv(f"{name}/~/final_conv", "final_conv")
  entries += [_Entry(f"{name}/~/linear", "w", "head.fc.weight", "fc"),
              _Entry(f"{name}/~/linear", "b", "head.fc.bias", "vector")]
  return entries


def _check_keys(have: set[str], want: set[str], what: str) -> None:
  missing, unknown = sorted(want - have), sorted(have - want)
  if missing or unknown:
    raise ValueError(
        f"{what} does not match an NFNet (timm dm_nfnet_f*) layout: missing "
        f"{len(missing)} {missing[:4]}, unknown {len(unknown)} {unknown[:4]}; "
        "pass the right depths or an NFNet/dm_nfnet params tree")


def _convert(value: np.ndarray, kind: str, table: dict, where: str) -> np.ndarray:
  ndim, fn = table[kind]
  if value.ndim != ndim:
    raise ValueError(f"{where} has shape {value.shape}, expected {ndim} dims "
                     f"for a {kind} param")
  # A C-ordered copy (np.ascontiguousarray would turn 0-d skip gains into 1-d).
  return np.array(fn(value), order="C")


def _haiku_name(params: Mapping[str, Any]) -> str:
  for module in params:
    if module.endswith("/~/stem_conv0"):
      return module[: -len("/~/stem_conv0")]
  raise ValueError("params have no '<name>/~/stem_conv0' module; not NFNet params")


def haiku_to_timm(params: Mapping[str, Mapping[str, Any]],
                  depths: Sequence[int] | None = None) -> dict[str, np.ndarray]:
  """Converts NFNet Haiku params to a timm `dm_nfnet_f*` state_dict (numpy).

  Load it with `model.load_state_dict({k: torch.from_numpy(v) ...})`.

  Args:
    params: Haiku params of `nfnets.nfnet.NFNet` (or DeepMind's released ones).
    depths: Blocks per stage; default: inferred (each stage starts with the only
      block that has a `conv_shortcut`).

  Returns:
    `{timm_key: ndarray}` with the same number of values as `params`.
  """
  name = _haiku_name(params)
  block = re.compile(re.escape(name) + r"/~/nf_block(?:_(\d+))?")
  indices = sorted(int(m.group(1) or 0) for p in params if (m := block.fullmatch(p)))
  if indices != list(range(len(indices))):
    raise ValueError(f"NFNet blocks are not numbered 0..N-1 (got {indices[:6]}...)")
  shortcut = [f"{_block_module(name, k)}/~/conv_shortcut" in params for k in indices]
  if depths is None:
    starts = [k for k in indices if shortcut[k]]
    if not starts or starts[0] != 0:
      raise ValueError("cannot infer depths (block 0 has no conv_shortcut); pass depths")
    depths = [b - a for a, b in zip(starts, starts[1:] + [len(indices)])]
  if sum(depths) != len(indices):
    raise ValueError(f"depths {list(depths)} sum to {sum(depths)} but params have "
                     f"{len(indices)} blocks")
  entries = _layout(name, depths, shortcut)
  have = {f"{m}/{n}" for m, inner in params.items() for n in inner}
  _check_keys(have, {f"{e.module}/{e.name}" for e in entries}, "Haiku params")
  return {e.key: _convert(np.asarray(params[e.module][e.name]), e.kind, _TO_TIMM,
                          f"{e.module}/{e.name}") for e in entries}


def _to_numpy(value: Any) -> np.ndarray:
  # Torch tensors without importing torch: detach and move to host; bf16 has no
  # numpy twin in torch, so it is upcast to float32 (exact).
  if hasattr(value, "detach"):
    value = value.detach().cpu()
    try:
      return value.numpy()
    except TypeError:
      return value.float().numpy()
  return np.asarray(value)


def timm_to_haiku(state_dict: Mapping[str, Any], depths: Sequence[int] | None = None,
                  *, name: str = "NFNet") -> Params:
  """Converts a timm `dm_nfnet_f*` state_dict to `nfnets.nfnet.NFNet` Haiku params.

  Args:
    state_dict: timm keys -> torch tensors or numpy arrays.
    depths: Blocks per stage; default: inferred from the `stages.{s}.{b}` keys.
    name: Haiku name of the NFNet module (the top of every module path).

  Returns:
    Haiku params `{module_path: {param_name: ndarray}}`.
  """
  per_stage: dict[int, set[int]] = {}
  for m in filter(None, (re.match(r"stages\.(\d+)\.(\d+)\.", k) for k in state_dict)):
    per_stage.setdefault(int(m.group(1)), set()).add(int(m.group(2)))
  inferred = [len(per_stage.get(s, ())) for s in range(len(per_stage))]
  if depths is None:
    if sorted(per_stage) != list(range(len(per_stage))) or any(
        per_stage[s] != set(range(d)) for s, d in enumerate(inferred)):
      raise ValueError("timm state_dict has gaps in its stages.{s}.{b} keys; pass depths")
    depths = inferred
  if sum(depths) != sum(inferred):
    raise ValueError(f"depths {list(depths)} sum to {sum(depths)} but the state_dict "
                     f"has {sum(inferred)} blocks")
  shortcut = []
  for s, depth in enumerate(depths):
    shortcut += [f"stages.{s}.{b}.downsample.conv.weight" in state_dict
                 for b in range(depth)]
  entries = _layout(name, depths, shortcut)
  _check_keys(set(state_dict), {e.key for e in entries}, "timm state_dict")
  params: Params = {}
  for e in entries:
    value = _convert(_to_numpy(state_dict[e.key]), e.kind, _TO_HAIKU, e.key)
    params.setdefault(e.module, {})[e.name] = value
  return params
