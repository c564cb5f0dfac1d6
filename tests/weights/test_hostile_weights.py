"""Hostile weight files: decompression and pickle-memo amplification, object dtype flags, FIFOs,
malformed model descriptions, non-float params. Every one must be refused by name, in one line,
before it allocates more than the file holds."""

import contextlib
import io
import json
import os
import pickle
import struct
import threading
import time
import tracemalloc
import zipfile
import zlib

import numpy as np
import pytest

from nfnets import weights
from nfnets.weights import npz

_RECONSTRUCT = np.zeros(1).__reduce__()[0]  # numpy's own _reconstruct, under either module name.
_RELEASE_AFTER_S = 8.0
_NPY = {"descr": "<f4", "fortran_order": False}


def _one_line(error):
  message = str(error.value)
  assert "\n" not in message and "Traceback" not in message, message
  return message


@contextlib.contextmanager
def _peak_memory_below(limit_bytes):
  tracemalloc.start()
  try:
    yield
    _, peak = tracemalloc.get_traced_memory()
  finally:
    tracemalloc.stop()
  assert peak < limit_bytes, f"peak {peak:,} bytes"


def _small_member_bomb(path, members=64, member_bytes=(4 << 20) - 4096):
  """Members each under the per-member bomb exemption: 256 MB of zeros in ~270 KB."""
  zeros = bytes(member_bytes)
  with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
    for k in range(members):
      with archive.open(f"net/~/block_{k}::w.npy", "w") as f:
        np.lib.format.write_array_header_1_0(f, dict(_NPY, shape=(member_bytes // 4,)))
        f.write(zeros)
  return path


# --- 3. size bounds ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_member_bomb(tmp_path_factory):
  return _small_member_bomb(tmp_path_factory.mktemp("bomb") / "F0_haiku.npz")


@pytest.mark.parametrize("reader", ["load_params", "read_npz", "load_official"])
def test_many_small_members_that_inflate_to_gigabytes_are_refused_unread(small_member_bomb,
                                                                         reader):
  path = small_member_bomb
  assert path.stat().st_size < 400_000
  with _peak_memory_below(20_000_000):
    with pytest.raises(ValueError, match=r"declares .* uncompressed bytes in .* on disk") as info:
      getattr(weights, reader)(path)
  assert str(path) in _one_line(info) and "zip bomb" in str(info.value)


def test_one_member_repeated_in_the_zip_directory_is_refused(tmp_path):
  # The directory lists the same 4 MB member 100 times: 400 MB declared, one copy stored.
  path = _small_member_bomb(tmp_path / "bomb.npz", members=1)
  data = path.read_bytes()
  end = data.rfind(b"PK\x05\x06")
  size, offset = struct.unpack("<II", data[end + 12:end + 20])
  entry = data[offset:offset + size]
  copies = 100
  tail = (data[end:end + 8] + struct.pack("<HHII", copies, copies, size * copies, offset)
          + data[end + 20:])
  path.write_bytes(data[:offset] + entry * copies + tail)
  with _peak_memory_below(20_000_000):
    with pytest.raises(ValueError, match="zip bomb") as info:
      weights.load_params(path)
  assert str(path) in _one_line(info)


def test_total_size_limit_is_an_environment_variable(tmp_path, monkeypatch):
  path = tmp_path / "p.npz"
  weights.save_params(path, {"net/~/a": {"w": np.ones((500_000,), np.float32)}})  # 2 MB.
  monkeypatch.setenv("NFNETS_MAX_WEIGHTS_BYTES", "1000000")
  for reader in (weights.load_params, weights.load_official):
    with pytest.raises(ValueError, match="over the limit of 1,000,000 .*NFNETS_MAX_WEIGHTS_BYTES"
                       ) as info:
      reader(path)
    assert str(path) in _one_line(info)
  pickled = tmp_path / "F0_haiku.npz"
  pickled.write_bytes(pickle.dumps(
      {"net/~/a": {"w": np.ones((150_000,), np.float32), "v": np.ones((150_000,), np.float32)}}))
  with pytest.raises(ValueError, match="exceed the limit of 1,000,000 .*NFNETS_MAX_WEIGHTS_BYTES"
                     ) as info:
    weights.load_official(pickled)
  assert str(pickled) in _one_line(info)
  monkeypatch.setenv("NFNETS_MAX_WEIGHTS_BYTES", "3000000")
  assert weights.load_params(path)["net/~/a"]["w"].shape == (500_000,)
  assert weights.load_official(pickled)["net/~/a"]["v"].shape == (150_000,)
  monkeypatch.setenv("NFNETS_MAX_WEIGHTS_BYTES", "lots")
  with pytest.raises(ValueError, match="NFNETS_MAX_WEIGHTS_BYTES must be a positive whole number"):
    weights.load_params(path)


def test_one_member_over_the_per_array_limit_is_refused(tmp_path, monkeypatch):
  path = tmp_path / "p.npz"
  weights.save_params(path, {"net/~/a": {"w": np.ones((1000,), np.float32)},
                             "net/~/b": {"w": np.ones((10,), np.float32)}})
  monkeypatch.setattr(npz, "MAX_ARRAY_BYTES", 2000)
  with pytest.raises(ValueError, match=r"net/~/a::w holds 4,000 bytes, over the per-array limit"
                     ) as info:
    weights.load_params(path)
  assert str(path) in _one_line(info)


def test_a_member_inflating_past_its_declared_size_yields_only_what_it_declares(tmp_path):
  # The zip directory says 144 bytes; the deflate stream holds 50 MB. Only the declared bytes
  # are ever inflated (and must match the npy header), never the rest.
  buf = io.BytesIO()
  with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as archive:
    with archive.open("net/~/a::w.npy", "w") as f:
      np.lib.format.write_array_header_1_0(f, dict(_NPY, shape=(4,)))
      f.write(np.arange(4, dtype=np.float32).tobytes() + bytes(50_000_000))
  data = bytearray(buf.getvalue())
  with zipfile.ZipFile(io.BytesIO(bytes(data))) as archive:
    info = archive.infolist()[0]
    with archive.open(info) as f:
      declared = f.read(128 + 16)
  crc = struct.pack("<I", zlib.crc32(declared))
  size = struct.pack("<I", len(declared))
  local = data.find(b"PK\x03\x04")
  central = data.find(b"PK\x01\x02")
  data[local + 14:local + 18], data[local + 22:local + 26] = crc, size
  data[central + 16:central + 20], data[central + 24:central + 28] = crc, size
  path = tmp_path / "p.npz"
  path.write_bytes(bytes(data))
  with _peak_memory_below(5_000_000):
    try:
      params = weights.load_params(path)
    except ValueError as e:  # Refusing it is as good as reading only the declared bytes.
      assert str(path) in str(e) and "\n" not in str(e)
    else:
      np.testing.assert_array_equal(params["net/~/a"]["w"], np.arange(4, dtype=np.float32))


class _Array:
  """Pickles as numpy does (`_reconstruct` + state), with a chosen raw buffer and dtype."""

  def __init__(self, raw, dtype, shape):
    self.raw, self.dtype, self.shape = raw, dtype, shape

  def __reduce__(self):
    return _RECONSTRUCT, (np.ndarray, (0,), b"b"), (1, self.shape, self.dtype, False, self.raw)


class _Dtype:
  """Pickles as a numpy dtype whose state carries chosen flags."""

  def __init__(self, flags, spec="f4", byteorder="<"):
    self.flags, self.spec, self.byteorder = flags, spec, byteorder

  def __reduce__(self):
    return np.dtype, (self.spec, False, True), (3, self.byteorder, None, None, None, -1, -1,
                                                self.flags)


def test_one_buffer_shared_by_many_arrays_in_a_pickle_is_refused(tmp_path):
  # The pickle memo stores the 1 MB buffer once; 200 arrays reuse it: 200 MB from a 1 MB file.
  raw = bytes(1 << 20)
  tree = {"net/~/a": {f"w{k}": _Array(raw, np.dtype("f4"), (len(raw) // 4,)) for k in range(200)}}
  path = tmp_path / "F0_haiku.npz"
  path.write_bytes(pickle.dumps(tree, protocol=4))
  assert path.stat().st_size < 2_000_000
  with _peak_memory_below(30_000_000):
    with pytest.raises(ValueError, match=r"more array bytes than the file holds") as info:
      weights.load_official(path)
  assert str(path) in _one_line(info)


def test_an_honest_pickle_of_shared_arrays_still_loads(tmp_path):
  # One array object referenced twice is built once: no amplification, nothing to refuse.
  w = np.arange(6, dtype=np.float32)
  path = tmp_path / "p.pkl"
  path.write_bytes(pickle.dumps({"m": {"w": w, "v": w}, "n": {"b": np.float32(2)}}, protocol=2))
  got = weights.load_official(path)
  np.testing.assert_array_equal(got["m"]["v"], w)
  assert got["n"]["b"].shape == () and got["n"]["b"] == 2


# --- 4. dtype flags from pickles -----------------------------------------------------------------


@pytest.mark.parametrize("protocol", [2, 4])
@pytest.mark.parametrize("flags", [0x01, 0x08, 0x3F, 0xFF])
def test_dtype_flags_from_a_pickle_are_refused(tmp_path, flags, protocol):
  tree = {"net/~/a": {"w": _Array(bytes(8), _Dtype(flags), (2,))}}
  path = tmp_path / "F0_haiku.npz"
  path.write_bytes(pickle.dumps(tree, protocol=protocol))
  with pytest.raises(weights.UnsafeWeightsError, match="only plain numeric dtypes") as info:
    weights.load_official(path)
  assert str(path) in _one_line(info)
  assert not np.dtype("f4").hasobject  # numpy's own dtypes are untouched.


def test_dtype_flags_inside_a_dill_file_are_refused(tmp_path):
  dill = pytest.importorskip("dill")
  data = dill.dumps({"net/~/a": {"w": np.ones(2, np.float32)}})
  # The float32 dtype's state ends (..., elsize -1, alignment -1, flags 0): set the object flag.
  plain = b"J\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00"
  assert data.count(plain) == 1 and b"_create_array" in data
  path = tmp_path / "F0_haiku.npz"
  path.write_bytes(data.replace(plain, plain[:-1] + b"\x01"))
  with pytest.raises(weights.UnsafeWeightsError, match="flags=1.*only plain numeric dtypes"
                     ) as info:
    weights.load_official(path)
  assert str(path) in _one_line(info)


def test_a_plain_dtype_state_still_loads_including_big_endian(tmp_path):
  tree = {"net/~/a": {"w": _Array(np.arange(2, dtype=">f4").tobytes(), _Dtype(0, byteorder=">"),
                                  (2,)),
                      "b": _Array(np.ones(2, "<f8").tobytes(), _Dtype(0, "f8"), (2,))}}
  path = tmp_path / "p.pkl"
  path.write_bytes(pickle.dumps(tree, protocol=2))
  got = weights.load_official(path)["net/~/a"]
  np.testing.assert_array_equal(got["w"], [0.0, 1.0])
  assert got["b"].dtype == np.float64 and not got["w"].dtype.hasobject


# --- 1. non-regular files -----------------------------------------------------------------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize("reader", ["load_params", "read_npz", "load_official"])
def test_a_fifo_given_as_weights_is_refused_without_blocking(tmp_path, reader):
  path = tmp_path / "F0_haiku.npz"
  os.mkfifo(path)
  done = threading.Event()

  def release():  # Frees a reader blocked on the FIFO, so a regression fails instead of hanging.
    if done.wait(_RELEASE_AFTER_S):
      return
    while not done.is_set():
      try:
        os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
      except OSError:
        pass
      time.sleep(0.05)

  thread = threading.Thread(target=release, daemon=True)
  thread.start()
  start = time.monotonic()
  try:
    with pytest.raises(ValueError, match="a FIFO") as info:
      getattr(weights, reader)(path)
  finally:
    done.set()
    thread.join()
  assert time.monotonic() - start < _RELEASE_AFTER_S
  assert str(path) in _one_line(info)


# --- 5. model descriptions and dtypes ----------------------------------------------------------


def _npz_with_spec(path, text, params=None):
  arrays = {"net/~/a::w": np.ones(3, np.float32)} if params is None else params
  arrays["__nfnets_model__"] = np.frombuffer(text.encode() if isinstance(text, str) else text,
                                             np.uint8)
  np.savez(path, **arrays)
  return path


_GOOD_SPEC = dict(name="NFNet", num_classes=3, kwargs={"variant": "F0"})


@pytest.mark.parametrize("spec,match", [
    ([1, 2, 3], "not a JSON object"),
    ("NFNet", "not a JSON object"),
    (dict(_GOOD_SPEC, class_names=["a"]), "1 class_names for 3 classes"),
    (dict(_GOOD_SPEC, class_names=["a", "b", 7]), "class_names must be strings"),
    (dict(_GOOD_SPEC, eval_image_size=60000), "eval_image_size must be .* at most 1024"),
    (dict(_GOOD_SPEC, eval_image_size="big"), "eval_image_size must be"),
    (dict(_GOOD_SPEC, num_classes=0), "num_classes must be"),
    (dict(_GOOD_SPEC, num_classes="3"), "num_classes must be"),
    (dict(_GOOD_SPEC, kwargs=["F0"]), "kwargs must be"),
    (dict(_GOOD_SPEC, channels=7), "channels must be"),
    ({"num_classes": 3}, "lacks 'name'"),
    (dict(_GOOD_SPEC, name=["NFNet"]), "name must be"),
])
def test_malformed_model_descriptions_are_one_line_errors(tmp_path, spec, match):
  path = _npz_with_spec(tmp_path / "p.npz", json.dumps(spec))
  with pytest.raises(ValueError, match=match) as info:
    weights.read_npz(path)
  assert str(path) in _one_line(info)


def test_undecodable_model_description_is_a_one_line_error(tmp_path):
  path = _npz_with_spec(tmp_path / "p.npz", b"\xff\xfe{")
  with pytest.raises(ValueError, match="model description") as info:
    weights.read_npz(path)
  assert str(path) in _one_line(info)


def test_model_spec_checks_its_own_fields():
  with pytest.raises(ValueError, match="2 class_names for 10 classes") as info:
    weights.ModelSpec(name="NFNet", num_classes=10, class_names=("cat", "dog"))
  assert "\n" not in str(info.value)
  spec = weights.ModelSpec(name="NFNet", num_classes=2, class_names=["cat", "dog"])
  assert spec.class_names == ("cat", "dog")  # Lists are kept as tuples (hashable, frozen).


@pytest.mark.parametrize("dtype", [np.int32, np.int64, np.uint8, np.bool_, np.complex64])
@pytest.mark.parametrize("reader", ["load_params", "read_npz", "load_official"])
def test_params_must_be_floating_in_every_reader(tmp_path, dtype, reader):
  path = tmp_path / "p.npz"
  np.savez(path, **{"net/~/a::w": np.ones(3, np.float32), "net/~/b::w": np.ones(3, dtype)})
  with pytest.raises(ValueError, match=r"net/~/b::w has dtype .*params must be floating") as info:
    getattr(weights, reader)(path)
  assert str(path) in _one_line(info)


def test_saving_non_floating_params_is_refused_too(tmp_path):
  with pytest.raises(ValueError, match="params must be floating"):
    weights.save_params(tmp_path / "p.npz", {"a": {"w": np.arange(3, dtype=np.int32)}})
  assert not (tmp_path / "p.npz").exists()
