"""Our params format: an `.npz` of plain numpy arrays, never a pickle.

Keys are `module_path::param_name` (bfloat16 leaves as their raw 16-bit patterns under
`module::param::bfloat16`, so the round trip is bit-exact). `save_params` may also store which
model the params belong to (`ModelSpec`: family, class count, constructor kwargs) as a JSON
string, so `nfnets.predict` and `Classifier.from_weights` need no `--model` flag for them.

Reading is defensive, because weight files come from elsewhere:
* every member's `.npy` header (shape, dtype) is read and checked before any array data is
  decompressed: a member whose header disagrees with its zip entry, an implausible compression
  ratio (a "zip bomb": 2 MB that inflates to gigabytes) or, when the caller says what it
  expects, an unknown key or a wrong shape is refused by name while the file is still unread;
* only numeric dtypes are accepted (`allow_pickle=False` throughout).
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
import zipfile
from typing import Any, Mapping, Optional

import ml_dtypes
import numpy as np

Params = dict[str, dict[str, np.ndarray]]
# Expected shapes: {module: {param: shape}} (e.g. from jax.eval_shape of the model's init).
Shapes = Mapping[str, Mapping[str, Any]]

ZIP_MAGIC = b"PK\x03\x04"
SEP = "::"
_MODEL_KEY = "__nfnets_model__"
# Extension dtypes numpy cannot describe in an .npy header without pickle.
_BITS_DTYPES: dict[str, tuple[Any, Any]] = {
    "bfloat16": (np.dtype(ml_dtypes.bfloat16), np.dtype(np.uint16)),
}
_NUMERIC_KINDS = "biufc"
# np.savez stores members uncompressed; savez_compressed deflates float weights by ~10 %.
# Anything inflating more than this (and by more than a few MB) is refused before reading.
_MAX_INFLATION = 64
_SMALL_MEMBER_BYTES = 4 << 20


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  """Which network a params file belongs to, and how it is evaluated (timm's default_cfg idea:
  the architecture apart from the weights, the preprocessing beside them).

  Attributes:
    name: A key of `nfnets.models.MODELS`, e.g. 'NFNet'.
    num_classes: Classifier outputs.
    kwargs: The family's constructor kwargs (JSON types: a variant is a name or a dict).
    class_names: Optional label names, index i for class i.
    eval_image_size: Evaluation resolution (None: the variant's test_imsize).
    eval_preproc: Evaluation protocol ('resize_crop_32' is the paper's).
    channels: Input channels (3 RGB, 1 grey).
  """
  name: str
  num_classes: int
  kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  class_names: Optional[tuple[str, ...]] = None
  eval_image_size: Optional[int] = None
  eval_preproc: str = "resize_crop_32"
  channels: int = 3

  def to_json(self) -> str:
    data = dataclasses.asdict(self)
    data["kwargs"] = _plain(self.kwargs)
    data["class_names"] = list(self.class_names) if self.class_names else None
    return json.dumps(data, sort_keys=True)

  @classmethod
  def from_json(cls, text: str) -> "ModelSpec":
    data = json.loads(text)
    known = {f.name for f in dataclasses.fields(cls)}
    data = {k: v for k, v in data.items() if k in known}
    if data.get("class_names"):
      data["class_names"] = tuple(data["class_names"])
    return cls(**data)


def _plain(value: Any) -> Any:
  """Tuples (and dataclass variants) as JSON lists and dicts."""
  if dataclasses.is_dataclass(value):
    return _plain(dataclasses.asdict(value))
  if isinstance(value, Mapping):
    return {str(k): _plain(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_plain(v) for v in value]
  return value


def save_params(path: str | os.PathLike, params: Mapping[str, Mapping[str, Any]],
                model: Optional[ModelSpec] = None) -> None:
  """Writes Haiku params to `path` as an npz, atomically (temp file + rename).

  The file is written to exactly `path` (no `.npz` suffix is appended).

  Args:
    path: Destination file.
    params: `{module_path: {param_name: array}}`; numpy or jax arrays.
    model: Optionally, which model these are; stored so loaders can rebuild it.
  """
  path = os.fspath(path)
  arrays: dict[str, np.ndarray] = {}
  for module, inner in params.items():
    for name, value in inner.items():
      if SEP in module or SEP in name:
        raise ValueError(f"param {module}/{name} contains '{SEP}'; rename the module")
      arr = np.asarray(value)
      key = f"{module}{SEP}{name}"
      for dtype_name, (dtype, bits) in _BITS_DTYPES.items():
        if arr.dtype == dtype:
          arr, key = arr.view(bits), f"{key}{SEP}{dtype_name}"
      if arr.dtype.kind not in _NUMERIC_KINDS:
        raise ValueError(f"param {module}/{name} has dtype {arr.dtype}; only numeric "
                         f"arrays and {sorted(_BITS_DTYPES)} can be saved")
      arrays[key] = arr
  if model is not None:
    arrays[_MODEL_KEY] = np.frombuffer(model.to_json().encode(), np.uint8)
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


def split_key(key: str) -> tuple[str, str, str | None]:
  """(module, param, bits dtype or None) of an npz key in any spelling we accept."""
  parts = key.split(SEP)
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


def _read_header(archive: zipfile.ZipFile, info: zipfile.ZipInfo) -> tuple[tuple, np.dtype, int]:
  """(shape, dtype, header bytes) of one `.npy` member, reading only its first bytes."""
  with archive.open(info) as f:
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
      shape, _, dtype = np.lib.format.read_array_header_1_0(f)
    elif version in ((2, 0), (3, 0)):
      shape, _, dtype = np.lib.format.read_array_header_2_0(f)
    else:
      raise ValueError(f"unsupported .npy version {version}")
    return tuple(shape), dtype, f.tell()


def _check_member(path: str, key: str, info: zipfile.ZipInfo, shape: tuple, dtype: np.dtype,
                  header: int) -> None:
  if dtype.kind not in _NUMERIC_KINDS or dtype.hasobject:
    raise ValueError(f"{path}: {key} has dtype {dtype}; only numeric arrays are accepted")
  nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
  if info.file_size != header + nbytes:
    raise ValueError(f"{path}: {key} declares shape {shape} {dtype} ({nbytes} bytes) but its "
                     f"zip entry holds {info.file_size - header}; the file is corrupt")
  if info.file_size > _SMALL_MEMBER_BYTES and info.file_size > _MAX_INFLATION * max(
      info.compress_size, 1):
    raise ValueError(f"{path}: {key} would inflate {info.compress_size} bytes to "
                     f"{info.file_size}; refused unread (a zip bomb, not saved weights)")


def read_npz(path: str | os.PathLike,
             expected: Optional[Shapes] = None) -> tuple[Params, Optional[ModelSpec]]:
  """Reads params (and the stored `ModelSpec`, if any) from an npz, checking headers first.

  Args:
    path: An npz written by `save_params` (or any npz of `module::param` float arrays).
    expected: Optional `{module: {param: shape}}` the params must match; a file that does
      not is refused before its data is read.

  Returns:
    (params, model spec or None).
  """
  path = os.fspath(path)
  try:
    with zipfile.ZipFile(path) as archive:
      plan = []
      for info in archive.infolist():
        key = info.filename[:-4] if info.filename.endswith(".npy") else info.filename
        shape, dtype, header = _read_header(archive, info)
        _check_member(path, key, info, shape, dtype, header)
        plan.append((key, info, shape))
      if expected is not None:
        _check_expected(path, [(k, s) for k, _, s in plan if k != _MODEL_KEY], expected)
      params: Params = {}
      spec = None
      for key, info, _ in plan:
        with archive.open(info) as f:
          arr = np.lib.format.read_array(f, allow_pickle=False)
        if key == _MODEL_KEY:
          spec = ModelSpec.from_json(arr.tobytes().decode())
          continue
        module, name, bits_dtype = split_key(key)
        if bits_dtype is not None:
          arr = arr.view(_BITS_DTYPES[bits_dtype][0])
        params.setdefault(module, {})[name] = arr
  except (zipfile.BadZipFile, EOFError, OSError, KeyError, json.JSONDecodeError) as e:
    raise ValueError(f"{path} is not a readable params npz ({type(e).__name__}: {e}); "
                     "it may be truncated, re-save it with save_params") from None
  if not params:
    raise ValueError(f"{path} holds no params")
  return params, spec


def _check_expected(path: str, members: list[tuple[str, tuple]], expected: Shapes) -> None:
  def shape_of(leaf: Any) -> tuple:
    # A leaf is a shape tuple, an array or a jax.ShapeDtypeStruct.
    return tuple(int(d) for d in (leaf if isinstance(leaf, tuple) else np.shape(leaf)))
  want = {(m, n): shape_of(v) for m, inner in expected.items() for n, v in inner.items()}
  for key, shape in members:
    module, name, _ = split_key(key)
    if (module, name) not in want:
      raise ValueError(f"{path}: {module}/{name} is not a parameter of the model; check "
                       "--model/--variant (or the config) against the weights")
    if tuple(shape) != want[(module, name)]:
      raise ValueError(f"{path}: {module}/{name} has shape {tuple(shape)}, the model needs "
                       f"{want[(module, name)]}; check --model/--variant against the weights")


def load_params(path: str | os.PathLike, expected: Optional[Shapes] = None) -> Params:
  """Reads a file written by `save_params` (never unpickles anything).

  Args:
    path: File written by `save_params`.
    expected: Optional `{module: {param: shape}}` to refuse a mismatched file unread.

  Returns:
    Haiku params `{module_path: {param_name: ndarray}}` with the saved dtypes.
  """
  path = os.fspath(path)
  with open(path, "rb") as f:
    if not f.read(4).startswith(ZIP_MAGIC):
      raise ValueError(f"{path} is not an npz written by save_params (no zip header); "
                       "for DeepMind's dill files use load_official")
  return read_npz(path, expected)[0]
