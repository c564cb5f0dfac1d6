"""DeepMind's released NFNet weights (`F0_haiku.npz` ... `F6_haiku.npz`), read without running code.

Despite the name these files are dill pickles of a Haiku params tree, and unpickling an untrusted
file can run arbitrary code. `load_official` reads them with a restricted unpickler that can only
rebuild numpy arrays, dtypes, scalars and plain dicts: every other global is refused *before*
anything is called, with `UnsafeWeightsError`. A genuine `.npz` zip given under that name is read
with `nfnets.weights.npz` instead (never a pickle).

Arrays come back as numpy; Haiku and jax accept them as params directly.
"""

from __future__ import annotations

import os
import pickle
import re
from typing import Any, Callable

import numpy as np

from nfnets.weights import npz

Params = dict[str, dict[str, np.ndarray]]

_NPY_MAGIC = b"\x93NUMPY"
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
    if head.startswith(npz.ZIP_MAGIC):
      return _validate_tree(npz.read_npz(path)[0], path)
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
