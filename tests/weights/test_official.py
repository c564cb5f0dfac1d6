"""Tests for nfnets.weights.official: DeepMind's pickles, read without running code."""

import os
import pickle
import subprocess

import haiku as hk
import numpy as np
import pytest

from nfnets import weights
from tests.weights.weights_helpers import _TINY, _assert_trees_equal, _random_params, _shapes


@pytest.fixture(scope="module")
def tiny_params():
  return _random_params(_shapes(_TINY, 10))


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
                     ({"a": {"w": np.zeros(2, np.int32)}}, "params must be floating"),
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


def test_deepminds_released_file_when_given():
  """Opt-in: NFNETS_OFFICIAL_WEIGHTS=/path/to/F0_haiku.npz (downloads are impossible here)."""
  path = os.environ.get("NFNETS_OFFICIAL_WEIGHTS")
  if not path:
    pytest.skip("set NFNETS_OFFICIAL_WEIGHTS=/path/to/F0_haiku.npz (DeepMind's released F0) "
                "to check the real file; it cannot be downloaded on this machine")
  params = weights.load_official(path)  # Through the restricted unpickler.
  expected = _shapes("F0", 1000)
  assert {m: {n: v.shape for n, v in leaves.items()} for m, leaves in params.items()} == {
      m: {n: v.shape for n, v in leaves.items()} for m, leaves in expected.items()}
  assert sum(v.size for leaves in params.values() for v in leaves.values()) == 71_489_284
  from tests.photos import photo  # pylint: disable=g-import-not-at-top
  from nfnets.inference import classifier, loading  # pylint: disable=g-import-not-at-top
  clf = classifier.Classifier(loading.load_model(path))
  logits = clf.logits([photo("grace_hopper")])
  assert logits.shape == (1, 1000) and np.all(np.isfinite(logits))
