"""Tests for nfnets.weights.timm: the Haiku <-> timm dm_nfnet mapping (numpy only)."""

import numpy as np
import pytest

from nfnets import weights
from tests.weights.weights_helpers import _TINY, _assert_trees_equal, _random_params, _shapes


@pytest.fixture(scope="module")
def tiny_params():
  return _random_params(_shapes(_TINY, 10))


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
