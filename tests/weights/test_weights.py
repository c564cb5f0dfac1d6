"""Tests for nfnets.weights: safe loading of DeepMind's pickles, our npz format,
and the Haiku <-> timm dm_nfnet mapping (numpy only: no torch needed here)."""

import os
import pickle
import subprocess

import haiku as hk
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from nfnets import weights
from nfnets.models.nfnet import NFNet, NFNetVariant

# Uneven depths so depth inference and the global block index are exercised.
_TINY = NFNetVariant(width=(16, 32, 64, 64), depth=(1, 2, 1, 2), group_width=8)


def _shapes(variant, num_classes):
  forward = hk.transform(lambda x: NFNet(num_classes, variant)(x, is_training=False))
  return jax.eval_shape(forward.init, jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)))


def _random_params(shapes, seed=0):
  rng = np.random.default_rng(seed)
  return {m: {n: rng.normal(size=s.shape).astype(np.float32) for n, s in inner.items()}
          for m, inner in shapes.items()}


@pytest.fixture(scope="module")
def tiny_params():
  return _random_params(_shapes(_TINY, 10))


def _assert_trees_equal(a, b):
  assert set(a) == set(b)
  for module in a:
    assert set(a[module]) == set(b[module]), module
    for name in a[module]:
      x, y = np.asarray(a[module][name]), np.asarray(b[module][name])
      assert x.dtype == y.dtype and x.shape == y.shape, (module, name)
      as_bytes = lambda z: z.reshape(-1).view(np.uint8)  # Bit-exact, NaNs included.
      np.testing.assert_array_equal(as_bytes(x), as_bytes(y))


# --- load_official: realistic files ------------------------------------------


def test_dill_file_round_trip(tmp_path, tiny_params):
  dill = pytest.importorskip("dill")
  path = tmp_path / "F0_haiku.npz"
  with open(path, "wb") as f:
    dill.dump(tiny_params, f)
  # The file must really use dill's array wrapper, or this test proves nothing.
  assert b"_create_array" in path.read_bytes()
  _assert_trees_equal(weights.load_official(path), tiny_params)


def test_haiku_containers_are_rebuilt_as_dicts(tmp_path, tiny_params):
  # Older Haiku params were FlatMapping/frozendict objects, pickled as
  # `haiku._src.data_structures.<Class>(dict)`; third-party loaders of the released
  # files needed Haiku installed, so the files reference these classes.
  from haiku._src import data_structures  # pylint: disable=g-import-not-at-top
  path = tmp_path / "F0_haiku.npz"
  for container in (hk.data_structures.to_immutable_dict,
                    lambda d: data_structures.frozendict(
                        {m: data_structures.frozendict(v) for m, v in d.items()})):
    data = pickle.dumps(container(tiny_params))
    assert b"haiku._src.data_structures" in data
    path.write_bytes(data)
    got = weights.load_official(path)
    assert type(got) is dict and all(type(v) is dict for v in got.values())
    _assert_trees_equal(got, tiny_params)


@pytest.mark.parametrize("protocol", [0, 1, 2, 3, 4, 5])
def test_plain_pickle_protocols(tmp_path, protocol):
  # Protocols 0-2 spell bytes via _codecs.encode; 5 spells arrays via _frombuffer.
  tree = {"NFNet/~/linear": {"w": np.arange(6, dtype=np.float32).reshape(2, 3),
                             "b": np.float32(1.5)},
          "NFNet/~/nf_block": {"skip_gain": np.array(0.25, np.float64)}}
  path = tmp_path / "p.pkl"
  path.write_bytes(pickle.dumps(tree, protocol=protocol))
  got = weights.load_official(path)
  np.testing.assert_array_equal(got["NFNet/~/linear"]["w"], tree["NFNet/~/linear"]["w"])
  assert got["NFNet/~/linear"]["b"].shape == () and got["NFNet/~/linear"]["b"] == 1.5
  assert got["NFNet/~/nf_block"]["skip_gain"].dtype == np.float64


def test_genuine_npz_is_sniffed(tmp_path):
  w = np.ones((1, 1, 3, 4), np.float32)
  path = tmp_path / "weights.npz"
  np.savez(path, **{"NFNet/~/stem_conv0/w": w, "NFNet.nf_block_3.conv1.gain": w[0, 0, 0]})
  got = weights.load_official(path)
  np.testing.assert_array_equal(got["NFNet/~/stem_conv0"]["w"], w)
  assert got["NFNet/~/nf_block_3/~/conv1"]["gain"].shape == (4,)


# --- load_official: malicious files ------------------------------------------


class _Payload:
  """Pickles as an arbitrary call: what an attacker would put in a weights file."""

  def __init__(self, fn, *args):
    self.fn, self.args = fn, args

  def __reduce__(self):
    return self.fn, self.args


def _getattr_chain_pickle(marker: str) -> bytes:
  # getattr(__import__('os'), 'system')('touch marker'), spelled with the builtin
  # getattr: a REDUCE of an innocent-looking builtin.
  def s(text):
    raw = text.encode()
    return b"\x8c" + bytes([len(raw)]) + raw
  return (b"\x80\x04" + s("builtins") + s("getattr") + b"\x93"
          + s("builtins") + s("__import__") + b"\x93" + s("os") + b"\x85R"
          + s("system") + b"\x86R" + s(f"touch {marker}") + b"\x85R" + b".")


_ATTACKS = {
    "os_system": lambda m: pickle.dumps({"a": {"w": _Payload(os.system, f"touch {m}")}}),
    "subprocess": lambda m: pickle.dumps(_Payload(subprocess.call, ["touch", m])),
    "eval": lambda m: pickle.dumps(
        {"a": _Payload(eval, f"open({m!r}, 'w').close()")}),
    "getattr": _getattr_chain_pickle,
}


@pytest.mark.parametrize("attack", sorted(_ATTACKS))
def test_code_execution_is_refused(tmp_path, attack):
  # Control: the payload is live, i.e. a plain pickle.load really runs it.
  control = tmp_path / "control_marker"
  pickle.loads(_ATTACKS[attack](str(control)))
  assert control.exists()

  marker = tmp_path / "marker"
  path = tmp_path / "evil.npz"
  path.write_bytes(_ATTACKS[attack](str(marker)))
  with pytest.raises(weights.UnsafeWeightsError) as info:
    weights.load_official(path)
  assert not marker.exists()  # Nothing ran.
  message = str(info.value)
  assert "\n" not in message and str(path) in message
  assert "refused" in message and "nothing from the file was executed" in message


def test_numpy_lookalike_tricks_are_refused(tmp_path):
  path = tmp_path / "x.pkl"
  # An object-dtype array needs only numpy globals, but could carry any object.
  path.write_bytes(pickle.dumps({"a": {"w": np.array([1, 2], dtype=object)}}))
  with pytest.raises(weights.UnsafeWeightsError, match="dtype"):
    weights.load_official(path)
  # numpy.ndarray is admitted only as an argument, never as a callable.
  path.write_bytes(pickle.dumps({"a": {"w": _Payload(np.ndarray, (2,))}}))
  with pytest.raises(weights.UnsafeWeightsError, match="numpy.ndarray"):
    weights.load_official(path)


def test_structure_is_validated(tmp_path):
  path = tmp_path / "x.pkl"
  for tree, hint in [([np.zeros(2)], "dict of modules"), ({}, "dict of modules"),
                     ({"a": np.zeros(2, np.float32)}, "dict of params"),
                     ({"a": {"w": np.zeros(2, np.int32)}}, "float numpy array"),
                     ({"a": {"w": [1.0]}}, "float numpy array")]:
    path.write_bytes(pickle.dumps(tree))
    with pytest.raises(ValueError, match=hint) as info:
      weights.load_official(path)
    assert not isinstance(info.value, weights.UnsafeWeightsError)


def test_corrupt_official_files(tmp_path, tiny_params):
  path = tmp_path / "F0_haiku.npz"
  data = pickle.dumps(tiny_params)
  path.write_bytes(data[: len(data) // 2])
  with pytest.raises(ValueError, match="F0_haiku.npz is not a readable weights pickle"):
    weights.load_official(path)
  np.save(tmp_path / "one.npy", np.zeros(3))
  with pytest.raises(ValueError, match="single-array"):
    weights.load_official(tmp_path / "one.npy")


# --- save_params / load_params -----------------------------------------------


def test_save_load_round_trip_incl_bfloat16(tmp_path, tiny_params):
  params = dict(tiny_params)
  bf16 = np.array([1.0, -2.5, np.nan, 3e38, 1e-40], dtype=ml_dtypes.bfloat16)
  params["extra"] = {"bf16": bf16, "ints": np.arange(3, dtype=np.int32),
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


# --- Haiku <-> timm ----------------------------------------------------------


def test_f0_timm_layout():
  # Expected keys/shapes are the ones documented for timm's dm_nfnet_f0.
  shapes = _shapes("F0", 1000)
  params = {m: {n: np.zeros(s.shape, np.float32) for n, s in inner.items()}
            for m, inner in shapes.items()}
  sd = weights.haiku_to_timm(params)
  assert len(sd) == 233 and sum(v.size for v in sd.values()) == 71_489_284
  expected = {"stem.conv1.weight": (16, 3, 3, 3), "stem.conv4.gain": (128, 1, 1, 1),
              "stages.0.0.downsample.conv.weight": (256, 128, 1, 1),
              "stages.2.0.conv2.weight": (768, 128, 3, 3),
              "stages.2.5.attn_last.fc1.weight": (768, 1536, 1, 1),
              "stages.3.0.downsample.conv.weight": (1536, 1536, 1, 1),
              "stages.3.2.skipinit_gain": (), "final_conv.weight": (3072, 1536, 1, 1),
              "head.fc.weight": (1000, 3072), "head.fc.bias": (1000,)}
  assert {k: sd[k].shape for k in expected} == expected
  assert "stages.1.1.downsample.conv.weight" not in sd
  assert "stages.3.3.conv1.bias" not in sd


def test_haiku_timm_transforms_and_round_trip(tiny_params):
  sd = weights.haiku_to_timm(tiny_params)
  assert "stages.1.1.conv1.weight" in sd and "stages.2.1.conv1.weight" not in sd
  assert "stages.3.1.skipinit_gain" in sd  # depths (1, 2, 1, 2) were inferred.
  hk_conv = tiny_params["NFNet/~/nf_block_2/~/conv1"]["w"]  # stages.1.1.conv2
  np.testing.assert_array_equal(sd["stages.1.1.conv2.weight"],
                                np.einsum("hwio->oihw", hk_conv))
  se = tiny_params["NFNet/~/nf_block_1/~/squeeze_excite/~/linear"]["w"]
  np.testing.assert_array_equal(sd["stages.1.0.attn_last.fc1.weight"],
                                np.einsum("io->oi", se)[:, :, None, None])
  np.testing.assert_array_equal(sd["head.fc.weight"],
                                np.einsum("io->oi", tiny_params["NFNet/~/linear"]["w"]))
  gain = tiny_params["NFNet/~/final_conv"]["gain"]
  np.testing.assert_array_equal(sd["final_conv.gain"], gain[:, None, None, None])
  _assert_trees_equal(weights.timm_to_haiku(sd), tiny_params)
  # A different module name round-trips too.
  renamed = weights.timm_to_haiku(sd, depths=(1, 2, 1, 2), name="Net")
  assert "Net/~/nf_block_5" in renamed
  assert set(weights.haiku_to_timm(renamed)) == set(sd)


class _FakeTensor:
  """Quacks like a torch tensor (detach/cpu/numpy), so no torch is needed."""

  def __init__(self, value):
    self.value = value

  def detach(self):
    return self

  def cpu(self):
    return self

  def numpy(self):
    return self.value


def test_timm_to_haiku_accepts_tensor_like(tiny_params):
  sd = {k: _FakeTensor(v) for k, v in weights.haiku_to_timm(tiny_params).items()}
  _assert_trees_equal(weights.timm_to_haiku(sd), tiny_params)


def test_conversion_errors(tiny_params):
  sd = weights.haiku_to_timm(tiny_params)
  broken = {k: v for k, v in sd.items() if k != "stages.2.0.conv1.bias"}
  broken["head.extra.weight"] = np.zeros(1)
  with pytest.raises(ValueError, match=r"missing 1 \['stages.2.0.conv1.bias'\].*"
                                       r"unknown 1 \['head.extra.weight'\]"):
    weights.timm_to_haiku(broken)
  with pytest.raises(ValueError, match="sum to 4"):
    weights.timm_to_haiku(sd, depths=(1, 1, 1, 1))
  with pytest.raises(ValueError, match="expected 4 dims"):
    weights.timm_to_haiku(dict(sd, **{"stem.conv1.weight": np.zeros((3, 3))}))
  params = {m: dict(v) for m, v in tiny_params.items()}
  del params["NFNet/~/nf_block_3/~/conv1b"]
  with pytest.raises(ValueError, match="conv1b"):
    weights.haiku_to_timm(params)
  with pytest.raises(ValueError, match="stem_conv0"):
    weights.haiku_to_timm({"x": {"w": np.zeros(1)}})
