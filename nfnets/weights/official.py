"""DeepMind's released NFNet weights (`F0_haiku.npz` ... `F6_haiku.npz`), read without running code.

Despite the name these files are dill pickles of a Haiku params tree, and unpickling an untrusted
file can run arbitrary code. `load_official` reads them with a restricted unpickler that can only
rebuild numpy arrays, dtypes, scalars and plain dicts: every other global is refused *before*
anything is called, with `UnsafeWeightsError`. A genuine `.npz` zip given under that name is read
with `nfnets.weights.npz` instead (never a pickle).

Even numpy's own constructors are not handed the file's data unchecked:
* numpy trusts the flags in a pickled dtype's state (a "float32" flagged as holding objects makes
  numpy treat raw bytes as object pointers), so dtype states are checked here and never given
  to numpy: only plain numeric dtypes are accepted;
* arrays are built here from their raw bytes (`np.frombuffer` with a checked dtype and an exact
  length), never by `ndarray.__setstate__`;
* the pickle memo lets one stored buffer be referenced any number of times, so a 4 MB file could
  build gigabytes of arrays: the arrays built may not exceed the bytes the file holds (a genuine
  file stores every array's data once) nor NFNETS_MAX_WEIGHTS_BYTES.
Only a regular file is opened (a FIFO cannot hang the reader). Params must be floating arrays,
the rule every weights reader applies (`npz.is_floating`).

Arrays come back as numpy; Haiku and jax accept them as params directly.
"""

from __future__ import annotations

import functools
import os
import pickle
import re
from typing import Any, Callable, Optional

import numpy as np

from nfnets.files import printable
from nfnets.weights import npz

Params = dict[str, dict[str, np.ndarray]]

_NPY_MAGIC = b"\x93NUMPY"
_NUMERIC_KINDS = "biufc"
_PLAIN_DTYPES = "only plain numeric dtypes"
# Haiku mapping entries a file may rebuild: NFNet-F7+ has 1,661 params in ~600 modules. Each
# rebuild copies its dict, so a memoised dict rebuilt again and again is bounded by this too.
_MAX_MAPPING_ENTRIES = 1_000_000


class UnsafeWeightsError(ValueError):
  """A weights file asked for something other than numpy arrays/dicts/scalars."""


class _LimitError(ValueError):
  """A genuine-looking file over NFNETS_MAX_WEIGHTS_BYTES or the per-array limit."""


# Restricted unpickling of DeepMind's dill files.


class _Budget:
  """What one file may build: array bytes up to its own size, and the configured limits."""

  def __init__(self, file_bytes: int):
    self.file_bytes = file_bytes
    self.limit = npz.max_weights_bytes()
    self.array_bytes = 0
    self.text_bytes = 0
    self.mapping_entries = 0

  def take_array(self, nbytes: int) -> None:
    if nbytes > npz.MAX_ARRAY_BYTES:
      raise _LimitError(f"an array of {nbytes:,} bytes is over the per-array limit of "
                        f"{npz.MAX_ARRAY_BYTES:,}")
    self.array_bytes += nbytes
    if self.array_bytes > self.limit:
      raise _LimitError(f"its arrays exceed the limit of {self.limit:,} bytes "
                        "(NFNETS_MAX_WEIGHTS_BYTES); raise the limit if the file is genuine")
    if self.array_bytes > self.file_bytes:
      raise UnsafeWeightsError(
          f"refused: the pickle builds more array bytes than the file holds ({self.file_bytes:,}):"
          " stored data reused for many arrays")

  def take_text(self, nbytes: int) -> None:
    self.text_bytes += nbytes
    if self.text_bytes > self.file_bytes:
      raise UnsafeWeightsError("refused: the pickle encodes more text than the file holds")

  def take_entries(self, count: int) -> None:
    self.mapping_entries += count
    if self.mapping_entries > _MAX_MAPPING_ENTRIES:
      raise UnsafeWeightsError(f"refused: more than {_MAX_MAPPING_ENTRIES:,} Haiku mapping "
                               "entries rebuilt")


class _Dtype:
  """A dtype named by the pickle, held apart from numpy until its state is checked.

  numpy pickles a dtype as `dtype('f4', False, True)` followed by a BUILD of its state
  (version, byte order, subarray, names, fields, item size, alignment, flags). That state is
  checked against the plain dtype here and never passed to numpy's `dtype.__setstate__`.
  """

  __slots__ = ("dtype", "_built")

  def __init__(self, dtype: np.dtype):
    self.dtype = dtype
    self._built = False

  def __setstate__(self, state: Any) -> None:
    if self._built:
      raise UnsafeWeightsError("refused a second state for one dtype")
    self._built = True
    plain = self.dtype
    if not isinstance(state, tuple) or len(state) not in (8, 9):
      raise UnsafeWeightsError(f"refused a malformed dtype state: {_PLAIN_DTYPES}")
    _, byteorder, subarray, names, fields, elsize, alignment, flags = state[:8]
    metadata = state[8] if len(state) == 9 else None
    if (subarray is not None or names is not None or fields is not None or metadata is not None
        or type(flags) is not int or flags != plain.flags
        or elsize not in (-1, plain.itemsize) or alignment not in (-1, plain.alignment)
        or byteorder not in ("<", ">", "=", "|")):
      raise UnsafeWeightsError(f"refused dtype {plain} with state flags={flags!r}, "
                               f"fields={fields is not None}, subarray={subarray is not None}: "
                               f"{_PLAIN_DTYPES}")
    if byteorder in ("<", ">") and plain.itemsize > 1:
      self.dtype = plain.newbyteorder(byteorder)


def _plain_dtype(dtype: Any) -> np.dtype:
  """The numpy dtype of a checked `_Dtype` (nothing else from the file is a dtype)."""
  if isinstance(dtype, _Dtype):
    dtype = dtype.dtype
  if (not isinstance(dtype, np.dtype) or dtype.kind not in _NUMERIC_KINDS or dtype.hasobject
      or dtype.fields is not None or dtype.subdtype is not None):
    raise UnsafeWeightsError(f"refused dtype {dtype!r}: {_PLAIN_DTYPES}")
  return dtype


def _build(budget: _Budget, raw: Any, dtype: Any, shape: Any, order: str) -> np.ndarray:
  """An array from its raw bytes, after checking dtype, shape and length."""
  dtype = _plain_dtype(dtype)
  if not isinstance(shape, tuple) or not all(type(d) is int and d >= 0 for d in shape):
    raise UnsafeWeightsError(f"refused an ndarray shape {shape!r:.80}")
  if not isinstance(raw, (bytes, bytearray)):
    raise UnsafeWeightsError("refused an ndarray whose data is not raw bytes")
  nbytes = dtype.itemsize
  for d in shape:  # Python ints: no overflow however large the declared shape.
    nbytes *= d
  if len(raw) != nbytes:
    raise UnsafeWeightsError(f"refused an ndarray of shape {shape} {dtype} with {len(raw):,} "
                             "bytes of data")
  budget.take_array(nbytes)
  if isinstance(raw, bytes):
    # numpy's own setstate, given only what was checked here (a plain dtype of ours, an exact
    # length), adopts the bytes without a copy: peak memory stays about the file's size.
    array = np.ndarray((0,), np.uint8)
    array.__setstate__((1, shape, dtype, order == "F", raw))
    return array
  return np.frombuffer(raw, dtype=dtype).reshape(shape, order=order)  # A writable bytearray.


class _Array:
  """An ndarray from the pickle: numpy's placeholder until its state arrives, then the array.

  numpy pickles an array as `_reconstruct(ndarray, (0,), b'b')` plus a BUILD of
  (version, shape, dtype, is_fortran, raw bytes); dill wraps the same in `_create_array`.
  The state is checked and the array built by `_build`; a second state is refused.
  """

  __slots__ = ("array", "_budget")

  def __init__(self, budget: _Budget, array: Optional[np.ndarray] = None):
    self._budget, self.array = budget, array

  def __setstate__(self, state: Any) -> None:
    if self.array is not None:
      raise UnsafeWeightsError("refused a second state for one ndarray")
    if (not isinstance(state, tuple) or len(state) not in (4, 5)
        or (len(state) == 5 and type(state[0]) is not int)):
      raise UnsafeWeightsError("refused a malformed ndarray state")
    shape, dtype, is_fortran, raw = state[-4:]
    if type(is_fortran) is not bool:
      raise UnsafeWeightsError("refused a malformed ndarray state")
    self.array = _build(self._budget, raw, dtype, shape, "F" if is_fortran else "C")


def _reconstruct(budget: _Budget, subtype: Any, shape: Any, typecode: Any) -> _Array:
  # numpy's placeholder is `_reconstruct(ndarray, (0,), b'b')`; anything larger is not numpy's
  # output. No array is allocated: `_Array.__setstate__` builds it from the checked state.
  if subtype is not _NDARRAY:
    raise UnsafeWeightsError("refused _reconstruct of a non-ndarray type")
  if (not isinstance(shape, tuple) or not all(type(d) is int and d >= 0 for d in shape)
      or int(np.prod(shape)) > 1024 or not isinstance(typecode, (bytes, str))):
    raise UnsafeWeightsError(f"refused _reconstruct arguments {shape!r:.80}, {typecode!r:.20}")
  code = typecode.decode("ascii", "replace") if isinstance(typecode, bytes) else typecode
  if not re.fullmatch(r"[<>|=]?[a-zA-Z]\d{0,2}", code):
    raise UnsafeWeightsError(f"refused _reconstruct typecode {typecode!r:.20}")
  _plain_dtype(np.dtype(code))
  return _Array(budget)


def _create_array(reconstruct: "_SafeGlobal", f: Any, args: Any, state: Any,
                  npdict: Any = None) -> _Array:
  # dill wraps every ndarray as `_create_array(_reconstruct, args, state, __dict__)`.
  if f is not reconstruct:
    raise UnsafeWeightsError("refused dill _create_array with a non-numpy constructor")
  if npdict:  # A plain ndarray has no __dict__; a subclass's attributes are not params.
    raise UnsafeWeightsError("refused dill _create_array with instance attributes")
  if not isinstance(args, tuple):
    raise UnsafeWeightsError("refused dill _create_array arguments")
  array = f(*args)
  array.__setstate__(state)
  return array


def _scalar(budget: _Budget, dtype: Any, data: Any) -> _Array:
  dtype = _plain_dtype(dtype)
  if not isinstance(data, bytes) or len(data) != dtype.itemsize:
    raise UnsafeWeightsError("refused a numpy scalar whose payload is not raw bytes")
  return _Array(budget, _build(budget, data, dtype, (), "C"))


def _frombuffer(budget: _Budget, buf: Any, dtype: Any, shape: Any, order: Any) -> _Array:
  # Pickle protocol 5 spelling of an ndarray.
  if isinstance(buf, memoryview):
    buf = buf.tobytes()
  if order not in ("C", "F"):
    raise UnsafeWeightsError("refused a numpy _frombuffer with an unknown order")
  return _Array(budget, _build(budget, buf, dtype, shape, order))


def _make_dtype(obj: Any, align: Any = False, copy: Any = False) -> _Dtype:
  del align, copy  # A plain numeric dtype has no alignment padding; ours is always new.
  if not isinstance(obj, str) or not re.fullmatch(r"[<>|=]?[a-zA-Z]\d{0,2}", obj):
    raise UnsafeWeightsError(f"refused dtype spec {obj!r:.40}")
  try:
    dtype = np.dtype(obj)
  except TypeError:
    raise UnsafeWeightsError(f"refused dtype spec {obj!r}") from None
  return _Dtype(_plain_dtype(dtype))


def _latin1_encode(budget: _Budget, text: Any, encoding: Any = "latin1") -> bytes:
  # Protocol-2 pickles spell bytes as `_codecs.encode(str, 'latin1')`.
  if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
    raise UnsafeWeightsError("refused _codecs.encode other than str -> latin1 bytes")
  budget.take_text(len(text))
  return text.encode("latin1")


def _haiku_mapping(budget: _Budget, data: Any) -> dict:
  # Haiku's params containers (frozendict, FlatMapping) pickle as `Class(dict)`;
  # the released files need them, so they are rebuilt as plain dicts.
  if not isinstance(data, dict):
    raise UnsafeWeightsError("refused a Haiku mapping built from a non-dict")
  budget.take_entries(len(data))
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


def _safe_globals(budget: _Budget) -> dict[tuple[str, str], _SafeGlobal]:
  """The globals one load may use, bound to that load's budget."""
  reconstruct = _SafeGlobal("numpy _reconstruct", functools.partial(_reconstruct, budget))
  table = {
      ("numpy", "ndarray"): _NDARRAY,
      ("numpy", "dtype"): _SafeGlobal("numpy.dtype", _make_dtype),
  }
  for core in ("numpy.core", "numpy._core"):  # numpy 1.x and 2.x module names.
    table[(f"{core}.multiarray", "_reconstruct")] = reconstruct
    table[(f"{core}.multiarray", "scalar")] = _SafeGlobal(
        "numpy scalar", functools.partial(_scalar, budget))
    table[(f"{core}.numeric", "_frombuffer")] = _SafeGlobal(
        "numpy _frombuffer", functools.partial(_frombuffer, budget))
  for dill in ("dill._dill", "dill.dill"):  # dill >= 0.3 and its older module name.
    table[(dill, "_create_array")] = _SafeGlobal(
        "dill _create_array", functools.partial(_create_array, reconstruct))
  for hk_name in ("FlatMapping", "FlatMap", "frozendict"):
    table[("haiku._src.data_structures", hk_name)] = _SafeGlobal(
        f"haiku {hk_name}", functools.partial(_haiku_mapping, budget))
  for codecs in ("_codecs", "codecs"):
    table[(codecs, "encode")] = _SafeGlobal("codecs.encode",
                                            functools.partial(_latin1_encode, budget))
  return table


class _RestrictedUnpickler(pickle.Unpickler):
  """Resolves only `_safe_globals`; refuses everything else before it is called."""

  def __init__(self, file: Any, budget: _Budget):
    super().__init__(file)
    self._safe = _safe_globals(budget)

  def find_class(self, module: str, name: str) -> Any:
    safe = self._safe.get((module, name))
    if safe is None:
      raise UnsafeWeightsError(
          f"refused global {printable(module)}.{printable(name)}: not a numpy "
          "array/dtype constructor")
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
      raise ValueError(f"{source}: entry {printable(repr(module)[:80])} is not a str -> dict "
                       "of params; expected Haiku's {module_path: {param_name: array}}")
    out[module] = {}
    for name, value in inner.items():
      if isinstance(value, _Array):
        value = value.array
      if isinstance(value, np.generic):
        value = np.asarray(value)
      shown = f"{printable(module)}/{printable(name)}"
      if not isinstance(name, str) or not isinstance(value, np.ndarray):
        raise ValueError(f"{source}: {shown} is {type(value).__name__}, expected a float numpy "
                         "array")
      if not npz.is_floating(value.dtype):
        raise ValueError(f"{source}: {shown} has dtype {value.dtype}; {npz.FLOAT_RULE}")
      out[module][name] = value
  return out


def load_official(path: str | os.PathLike) -> Params:
  """Loads DeepMind's released `F*_haiku.npz` (a dill pickle) without running code.

  A genuine `.npz` zip (sniffed by its magic bytes) is read with `npz.read_npz` instead; its
  keys may be `module::param`, `module/param` or the official flattened `NFNet.stem_conv0.w`.

  Args:
    path: The weights file.

  Returns:
    Haiku params `{module_path: {param_name: float ndarray}}`.

  Raises:
    UnsafeWeightsError: The pickle references anything beyond numpy arrays, dtypes, scalars
      and dicts (refused before that thing is called), a dtype with flags, fields or
      subarrays, or builds more array data than the file holds.
    ValueError: Not a regular file, over NFNETS_MAX_WEIGHTS_BYTES, not a params tree of float
      arrays, or corrupt.
  """
  path = os.fspath(path)
  with npz.open_regular(path) as f:
    head = f.read(8)
    if head.startswith(npz.ZIP_MAGIC):
      return _validate_tree(npz.read_npz(path)[0], path)
    if head.startswith(_NPY_MAGIC):
      raise ValueError(f"{path} is a single-array .npy, not a params tree; "
                       "pass the F*_haiku.npz file or a save_params file")
    budget = _Budget(os.fstat(f.fileno()).st_size)
    # Array data is at most the file's size; protocol-2 text spells each byte in 1-2.
    if budget.file_bytes > 2 * budget.limit:
      raise ValueError(f"{path}: {budget.file_bytes:,} bytes, over twice the limit of "
                       f"{budget.limit:,} (NFNETS_MAX_WEIGHTS_BYTES); raise the limit if the "
                       "file is genuine")
    f.seek(0)
    try:
      tree = _RestrictedUnpickler(f, budget).load()
    except UnsafeWeightsError as e:
      raise UnsafeWeightsError(f"{path}: {e}; nothing from the file was executed") from None
    except _LimitError as e:
      raise ValueError(f"{path}: {e}") from None
    except Exception as e:  # pylint: disable=broad-except  (truncated, or not a pickle at all)
      detail = f"{type(e).__name__}: {printable(' '.join(str(e).split())[:300])}"
      raise ValueError(f"{path} is not a readable weights pickle ({detail}); "
                       "re-download it") from None
  return _validate_tree(tree, path)
