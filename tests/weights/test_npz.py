"""Tests for nfnets.weights.npz: our pickle-free format, its checks before reading."""

import os
import pickle

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from nfnets import weights
from tests.weights.weights_helpers import _TINY, _assert_trees_equal, _random_params, _shapes


@pytest.fixture(scope="module")
def tiny_params():
  return _random_params(_shapes(_TINY, 10))


# --- save_params / load_params -----------------------------------------------


def test_save_load_round_trip_incl_bfloat16(tmp_path, tiny_params):
  params = dict(tiny_params)
  bf16 = np.array([1.0, -2.5, np.nan, 3e38, 1e-40], dtype=ml_dtypes.bfloat16)
  params["extra"] = {"bf16": bf16, "f16": np.arange(3, dtype=np.float16),
                     "jax": jnp.ones((2,), jnp.bfloat16)}
  path = tmp_path / "params.weights"  # No .npz suffix: written to exactly this path.
  weights.save_params(path, params)
  assert os.listdir(tmp_path) == ["params.weights"]  # No temp file left behind.
  got = weights.load_params(path)
  assert got["extra"]["bf16"].dtype == ml_dtypes.bfloat16
  expected = dict(params, extra={k: np.asarray(v) for k, v in params["extra"].items()})
  _assert_trees_equal(got, expected)  # Bit-exact, NaN included.
  # The file is a pickle-free npz.
  with np.load(path, allow_pickle=False) as data:
    assert "extra::bf16::bfloat16" in data.files


def test_failed_save_keeps_old_file(tmp_path, tiny_params):
  path = tmp_path / "params.npz"
  weights.save_params(path, tiny_params)
  before = path.read_bytes()
  with pytest.raises(ValueError, match="dtype object"):
    weights.save_params(path, {"a": {"w": np.array([None])}})
  with pytest.raises(ValueError, match="contains '::'"):
    weights.save_params(path, {"a::b": {"w": np.zeros(1)}})
  assert path.read_bytes() == before and os.listdir(tmp_path) == ["params.npz"]


def test_corrupt_params_file_named_in_error(tmp_path, tiny_params):
  path = tmp_path / "params.npz"
  weights.save_params(path, tiny_params)
  data = path.read_bytes()
  path.write_bytes(data[: len(data) - 200])  # Truncated: central directory lost.
  with pytest.raises(ValueError, match="params.npz is not a readable params npz"):
    weights.load_params(path)
  # Flip bytes inside an array's data: zip's CRC check catches it.
  path.write_bytes(data[:200] + bytes(b ^ 0xFF for b in data[200:260]) + data[260:])
  with pytest.raises(ValueError, match="params.npz"):
    weights.load_params(path)
  path.write_bytes(pickle.dumps(tiny_params))
  with pytest.raises(ValueError, match="load_official"):
    weights.load_params(path)


def test_a_zip_bomb_is_refused_before_it_is_inflated(tmp_path):
  # Zeros deflate ~1000x (3.2 GB to ~3 MB in the reported case; 256 MB here, to keep the test
  # fast). Its npy header is read (a few bytes) and the member refused, never decompressed.
  import tracemalloc  # pylint: disable=g-import-not-at-top
  import zipfile  # pylint: disable=g-import-not-at-top
  path = tmp_path / "bomb.npz"
  chunk, chunks = 1 << 24, 16  # 16 x 16 MiB of float32 zeros.
  header = {"descr": "<f4", "fortran_order": False, "shape": (chunk * chunks // 4,)}
  with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
    with archive.open("NFNet/~/linear::w.npy", "w", force_zip64=True) as f:
      np.lib.format.write_array_header_1_0(f, header)
      zeros = bytes(chunk)
      for _ in range(chunks):
        f.write(zeros)
  assert path.stat().st_size < 1_000_000
  tracemalloc.start()
  with pytest.raises(ValueError, match=r"would inflate .* refused unread \(a zip bomb"):
    weights.load_params(path)
  _, peak = tracemalloc.get_traced_memory()
  tracemalloc.stop()
  assert peak < 20_000_000  # Nothing near the 256 MB was allocated.


def test_a_file_of_another_model_is_refused_before_reading(tmp_path, tiny_params):
  path = tmp_path / "params.npz"
  weights.save_params(path, tiny_params)
  expected = {m: {n: v.shape for n, v in leaves.items()} for m, leaves in tiny_params.items()}
  assert weights.load_params(path, expected).keys() == tiny_params.keys()
  wider = dict(expected, **{"NFNet/~/linear": {"w": (128, 11), "b": (11,)}})
  with pytest.raises(ValueError, match=r"NFNet/~/linear/[wb] has shape \((128, )?10,?\), the "
                                       r"model needs \((128, )?11,?\)"):
    weights.load_params(path, wider)
  fewer = {m: leaves for m, leaves in expected.items() if m != "NFNet/~/final_conv"}
  with pytest.raises(ValueError, match="final_conv/.* is not a parameter of the model"):
    weights.load_params(path, fewer)


def test_the_model_description_travels_with_the_params(tmp_path, tiny_params):
  spec = weights.ModelSpec(name="NFNet", num_classes=10, kwargs={"variant": "F0"},
                           class_names=tuple(f"class {k}" for k in range(10)),
                           eval_image_size=224)
  weights.save_params(tmp_path / "p.npz", tiny_params, model=spec)
  params, got = weights.read_npz(tmp_path / "p.npz")
  assert got == spec and params.keys() == tiny_params.keys()
  assert weights.read_npz(_saved(tmp_path, tiny_params))[1] is None  # Optional.


def _saved(tmp_path, params):
  path = tmp_path / "plain.npz"
  weights.save_params(path, params)
  return path
