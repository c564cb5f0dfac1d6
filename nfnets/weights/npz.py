"""Our params format: an `.npz` of plain numpy arrays, never a pickle.

Keys are `module_path::param_name` (bfloat16 leaves as their raw 16-bit patterns under
`module::param::bfloat16`, so the round trip is bit-exact). `save_params` may also store which
model the params belong to (`ModelSpec`: family, class count, constructor kwargs) as a JSON
string, so `nfnets.predict` and `Classifier.from_weights` need no `--model` flag for them.

Reading is defensive, because weight files come from elsewhere:
* only a regular file is opened, non-blocking (a FIFO named `F0.npz` cannot hang the reader);
* the zip directory is checked before any member is opened: the declared uncompressed total must
  stay under NFNETS_MAX_WEIGHTS_BYTES (default 8 GiB) and within a plausible inflation of the
  file's size on disk (many small members of zeros, or one member listed many times, are zip
  bombs however small each member is); each array must stay under `MAX_ARRAY_BYTES`;
* every member's `.npy` header (shape, dtype) is read and checked before any array data is
  decompressed: a member whose header disagrees with its zip entry, an implausible compression
  ratio or, when the caller says what it expects, an unknown key or a wrong shape is refused by
  name while the file is still unread. zipfile never inflates more than a member's declared
  size, and the declared size must equal what its header says, so the bytes actually
  decompressed are bounded by what was checked;
* params must be floating arrays (float16/32/64 or bfloat16): one rule for every reader
  (`allow_pickle=False` throughout);
* the stored `ModelSpec` is validated like any other (`ModelSpec.__post_init__`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from typing import Any, BinaryIO, Mapping, Optional, Sequence
import zipfile

import ml_dtypes
import numpy as np

from nfnets import files
from nfnets.files import printable

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
FLOAT_RULE = "params must be floating arrays (float16/32/64 or bfloat16)"
# np.savez stores members uncompressed; savez_compressed deflates float weights by ~10 %.
# Anything inflating more than this (and by more than a few MB) is refused before reading.
_MAX_INFLATION = 64
_SMALL_MEMBER_BYTES = 4 << 20
# A whole file may declare this much without regard to its size on disk (harmless to allocate).
_SMALL_TOTAL_BYTES = 64 << 20
# The largest real params file: NFNet-F7+ has 829,551,960 params, 3.32 GB in float32 (a
# 21k-class head adds 0.36 GB). 8 GiB admits that in float64 too.
DEFAULT_MAX_WEIGHTS_BYTES = 8 << 30
# One array: the largest NFNet-F7+ leaf is 33.5 MB, a 21k-class head 0.36 GB; 2 GiB admits a
# head of 4096 x 131072 float32.
MAX_ARRAY_BYTES = 2 << 30
MAX_IMAGE_SIZE = files.MAX_IMAGE_SIZE


def max_weights_bytes() -> int:
  """The total bytes a weights file may unpack to (NFNETS_MAX_WEIGHTS_BYTES overrides)."""
  raw = os.environ.get("NFNETS_MAX_WEIGHTS_BYTES", "")
  text = raw.strip().replace("_", "")
  if not text:
    return DEFAULT_MAX_WEIGHTS_BYTES
  if not (text.isascii() and text.isdigit()) or int(text) < 1:
    raise ValueError(f"NFNETS_MAX_WEIGHTS_BYTES must be a positive whole number of bytes, got "
                     f"{raw!r}; unset it for the default ({DEFAULT_MAX_WEIGHTS_BYTES:,})")
  return int(text)


def is_floating(dtype: np.dtype) -> bool:
  """Whether params of `dtype` are accepted: numpy floats, or ml_dtypes' bfloat16 (kind 'V')."""
  return dtype.kind == "f" or dtype == _BITS_DTYPES["bfloat16"][0]


def open_regular(path: str) -> BinaryIO:
  """`path` opened for binary reading; a FIFO, device or socket is refused in one line."""
  try:
    return files.open_regular(path, hint="; pass a weights file")
  except OSError as e:
    raise ValueError(f"{printable(path)} cannot be opened ({e.strerror or e}); pass a readable "
                     "weights file") from None


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

  def __post_init__(self):
    # A spec may come from a file someone handed us: every field is checked here, so a bad one
    # is a one-line error rather than a traceback (or a 60000 px evaluation) later.
    if not isinstance(self.name, str) or not self.name:
      raise ValueError(f"ModelSpec name must be a model family name such as 'NFNet', got "
                       f"{_shown(self.name)}")
    if not _is_whole(self.num_classes) or self.num_classes < 1:
      raise ValueError(f"ModelSpec num_classes must be a whole number >= 1, got "
                       f"{_shown(self.num_classes)}")
    object.__setattr__(self, "num_classes", int(self.num_classes))
    if not isinstance(self.kwargs, Mapping) or not all(isinstance(k, str) for k in self.kwargs):
      raise ValueError(f"ModelSpec kwargs must be a mapping of constructor argument names to "
                       f"values, got {_shown(self.kwargs)}")
    if self.class_names is not None:
      names = self.class_names
      if isinstance(names, (str, bytes)) or not isinstance(names, Sequence):
        raise ValueError(f"ModelSpec class_names must be a list of strings, got {_shown(names)}")
      if not all(isinstance(n, str) for n in names):
        raise ValueError("ModelSpec class_names must be strings, got "
                         f"{_shown(next(n for n in names if not isinstance(n, str)))}")
      if names and len(names) != self.num_classes:
        raise ValueError(f"ModelSpec has {len(names)} class_names for {self.num_classes} "
                         "classes; give one name per class, or none")
      object.__setattr__(self, "class_names", tuple(names) or None)
    if self.eval_image_size is not None:
      if not _is_whole(self.eval_image_size) or not 1 <= self.eval_image_size <= MAX_IMAGE_SIZE:
        raise ValueError(f"ModelSpec eval_image_size must be None or whole pixels, at most "
                         f"{MAX_IMAGE_SIZE} (the largest variant test resolution is 672), got "
                         f"{_shown(self.eval_image_size)}")
      object.__setattr__(self, "eval_image_size", int(self.eval_image_size))
    if not isinstance(self.eval_preproc, str) or not self.eval_preproc:
      raise ValueError(f"ModelSpec eval_preproc must be a protocol name such as "
                       f"'resize_crop_32', got {_shown(self.eval_preproc)}")
    if not _is_whole(self.channels) or self.channels not in (1, 3):
      raise ValueError(f"ModelSpec channels must be 1 (grey) or 3 (RGB), got "
                       f"{_shown(self.channels)}")
    object.__setattr__(self, "channels", int(self.channels))

  def to_json(self) -> str:
    data = dataclasses.asdict(self)
    data["kwargs"] = _plain(self.kwargs)
    data["class_names"] = list(self.class_names) if self.class_names else None
    return json.dumps(data, sort_keys=True)

  @classmethod
  def from_json(cls, text: str) -> "ModelSpec":
    """The spec `to_json` wrote.

    Raises:
      ValueError: not a JSON object, a required field missing, or a field out of range.
    """
    data = json.loads(text)
    if not isinstance(data, dict):
      raise ValueError(f"the model description is not a JSON object (got a JSON "
                       f"{type(data).__name__})")
    missing = [f.name for f in dataclasses.fields(cls)
               if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
               and f.name not in data]
    if missing:
      raise ValueError(f"the model description lacks {', '.join(map(repr, missing))}")
    known = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in data.items() if k in known})


def _is_whole(value: Any) -> bool:
  return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _shown(value: Any) -> str:
  """`value` for a one-line message: its repr, shortened, without control characters."""
  text = repr(value)
  return printable(text if len(text) <= 80 else text[:77] + "...")


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
  bits_of: dict[str, np.dtype] = {}  # Key -> the dtype its stored bit pattern stands for.
  for module, inner in params.items():
    for name, value in inner.items():
      if SEP in module or SEP in name:
        raise ValueError(f"param {module}/{name} contains '{SEP}'; rename the module")
      arr = np.asarray(value)
      key = f"{module}{SEP}{name}"
      for dtype_name, (dtype, bits) in _BITS_DTYPES.items():
        if arr.dtype == dtype:
          arr, key = arr.view(bits), f"{key}{SEP}{dtype_name}"
          bits_of[key] = dtype
      if not is_floating(np.dtype(bits_of.get(key, arr.dtype))):
        raise ValueError(f"param {module}/{name} has dtype {arr.dtype}; {FLOAT_RULE}, as "
                         "every weights reader requires")
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
  raise ValueError(f"key {printable(key)!r} is not 'module_path::param_name'")


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


def _check_directory(path: str, archive: zipfile.ZipFile, disk_bytes: int) -> None:
  """Refuses, from the zip directory alone, a file whose members would unpack to too much."""
  names, total = set(), 0
  for info in archive.infolist():
    if info.filename in names:
      raise ValueError(f"{path} lists member {info.filename!r} twice; refused unread (a zip "
                       "bomb or a corrupt file, not saved weights)")
    names.add(info.filename)
    total += info.file_size
    if info.file_size > _SMALL_MEMBER_BYTES and info.file_size > _MAX_INFLATION * max(
        info.compress_size, 1):
      raise ValueError(f"{path}: {info.filename} would inflate {info.compress_size} bytes to "
                       f"{info.file_size}; refused unread (a zip bomb, not saved weights)")
  limit = max_weights_bytes()
  if total > limit:
    raise ValueError(f"{path} declares {total:,} bytes of arrays, over the limit of {limit:,} "
                     "(NFNETS_MAX_WEIGHTS_BYTES); refused unread. Raise the limit if the file "
                     "is genuine")
  if total > max(_SMALL_TOTAL_BYTES, _MAX_INFLATION * disk_bytes):
    raise ValueError(f"{path}: its zip directory declares {total:,} uncompressed bytes in "
                     f"{disk_bytes:,} on disk; refused unread (a zip bomb, not saved weights)")


def _check_member(path: str, key: str, info: zipfile.ZipInfo, shape: tuple, dtype: np.dtype,
                  header: int) -> None:
  shown = printable(key)  # Keys come from the file: they must not forge output lines.
  if dtype.kind not in _NUMERIC_KINDS or dtype.hasobject or dtype.fields or dtype.subdtype:
    raise ValueError(f"{path}: {shown} has dtype {dtype}; only numeric arrays are accepted")
  if key == _MODEL_KEY:
    if dtype != np.uint8 or len(shape) != 1:
      raise ValueError(f"{path}: {shown} is {shape} {dtype}, not the JSON text save_params "
                       "writes; re-save the file with save_params")
  else:
    try:
      bits_dtype = split_key(key)[2]
    except ValueError as e:
      raise ValueError(f"{path}: {e}") from None
    stands_for = _BITS_DTYPES[bits_dtype] if bits_dtype else None
    if (dtype != stands_for[1]) if stands_for else not is_floating(dtype):
      what = f"{dtype} (as {bits_dtype})" if stands_for else str(dtype)
      raise ValueError(f"{path}: {shown} has dtype {what}; {FLOAT_RULE}")
  nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
  if nbytes > MAX_ARRAY_BYTES:
    raise ValueError(f"{path}: {shown} holds {nbytes:,} bytes, over the per-array limit of "
                     f"{MAX_ARRAY_BYTES:,}; refused unread")
  if info.file_size != header + nbytes:
    raise ValueError(f"{path}: {shown} declares shape {shape} {dtype} ({nbytes} bytes) but its "
                     f"zip entry holds {info.file_size - header}; the file is corrupt")


def read_npz(path: str | os.PathLike,
             expected: Optional[Shapes] = None) -> tuple[Params, Optional[ModelSpec]]:
  """Reads params (and the stored `ModelSpec`, if any) from an npz, checking headers first.

  Args:
    path: An npz written by `save_params` (or any npz of `module::param` float arrays).
    expected: Optional `{module: {param: shape}}` the params must match; a file that does
      not is refused before its data is read.

  Returns:
    (params, model spec or None).

  Raises:
    ValueError: one line naming the file: not a regular file, over a size limit, a zip bomb,
      a non-floating param, a corrupt member or an invalid model description.
  """
  path = os.fspath(path)
  with open_regular(path) as stream:
    disk_bytes = os.fstat(stream.fileno()).st_size
    try:
      with zipfile.ZipFile(stream) as archive:
        _check_directory(path, archive, disk_bytes)
        plan = []
        for info in archive.infolist():
          key = info.filename[:-4] if info.filename.endswith(".npy") else info.filename
          try:
            shape, dtype, header = _read_header(archive, info)
          except ValueError as e:  # numpy's header parser: a malformed or oversized header.
            raise ValueError(f"{path}: {printable(key)} has no valid .npy header "
                             f"({_one_line(e)}); the file is corrupt") from None
          _check_member(path, key, info, shape, dtype, header)
          plan.append((key, info, shape))
        if expected is not None:
          _check_expected(path, [(k, s) for k, _, s in plan if k != _MODEL_KEY], expected)
        params: Params = {}
        spec = None
        for key, info, _ in plan:
          # zipfile inflates at most the member's declared size, which _check_member tied to
          # the header's shape: read_array gets exactly the bytes that were checked.
          with archive.open(info) as f:
            arr = np.lib.format.read_array(f, allow_pickle=False)
          if key == _MODEL_KEY:
            spec = _stored_spec(path, arr)
            continue
          module, name, bits_dtype = split_key(key)
          if bits_dtype is not None:
            arr = arr.view(_BITS_DTYPES[bits_dtype][0])
          params.setdefault(module, {})[name] = arr
    except (zipfile.BadZipFile, EOFError, OSError, KeyError) as e:
      raise ValueError(f"{path} is not a readable params npz ({type(e).__name__}: "
                       f"{_one_line(e)}); it may be truncated, re-save it with save_params"
                       ) from None
  if not params:
    raise ValueError(f"{path} holds no params")
  return params, spec


def _stored_spec(path: str, arr: np.ndarray) -> ModelSpec:
  try:
    return ModelSpec.from_json(arr.tobytes().decode("utf-8"))
  except (ValueError, TypeError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors.
    raise ValueError(f"{path}: its stored model description is invalid ({_one_line(e)}); "
                     "re-save the file with save_params, or pass the model explicitly"
                     ) from None


def _one_line(error: BaseException) -> str:
  return printable(" ".join(str(error).split())[:300])


def _check_expected(path: str, members: list[tuple[str, tuple]], expected: Shapes) -> None:
  def shape_of(leaf: Any) -> tuple:
    # A leaf is a shape tuple, an array or a jax.ShapeDtypeStruct.
    return tuple(int(d) for d in (leaf if isinstance(leaf, tuple) else np.shape(leaf)))
  want = {(m, n): shape_of(v) for m, inner in expected.items() for n, v in inner.items()}
  for key, shape in members:
    module, name, _ = split_key(key)
    if (module, name) not in want:
      raise ValueError(f"{path}: {printable(module)}/{printable(name)} is not a parameter of "
                       "the model; check "
                       "--model/--variant (or the config) against the weights")
    if tuple(shape) != want[(module, name)]:
      raise ValueError(f"{path}: {printable(module)}/{printable(name)} has shape "
                       f"{tuple(shape)}, the model needs "
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
  with open_regular(path) as f:
    if not f.read(4).startswith(ZIP_MAGIC):
      raise ValueError(f"{path} is not an npz written by save_params (no zip header); "
                       "for DeepMind's dill files use load_official")
  return read_npz(path, expected)[0]
