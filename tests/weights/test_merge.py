"""Tests for nfnets.weights.merge: loaded weights into a fresh model, refused when unfit."""

import ml_dtypes
import numpy as np
import pytest

from nfnets import weights

PATTERN = r"^[^/]+/~/linear$"


def _fresh():
  return {"Net/~/conv": {"w": np.zeros((3, 3, 1, 4), np.float32)},
          "Net/~/linear": {"w": np.zeros((4, 5), np.float32), "b": np.zeros(5, np.float32)}}


def test_bf16_weights_load_as_float32_and_wrong_kinds_are_named():
  loaded = {"Net/~/conv": {"w": np.ones((3, 3, 1, 4), ml_dtypes.bfloat16)},
            "Net/~/linear": {"w": np.ones((4, 5), np.float32), "b": np.ones(5, np.float32)}}
  merged = weights.merge_params(_fresh(), loaded, drop_head=False, head_pattern=PATTERN)
  assert merged["Net/~/conv"]["w"].dtype == np.float32 and merged["Net/~/conv"]["w"].min() == 1
  loaded["Net/~/conv"]["w"] = np.ones((3, 3, 1, 4), np.int32)
  with pytest.raises(ValueError, match="Net/~/conv/w has dtype int32, model needs float32"):
    weights.merge_params(_fresh(), loaded, drop_head=False, head_pattern=PATTERN)


def test_non_finite_weights_are_named():
  loaded = {"Net/~/conv": {"w": np.full((3, 3, 1, 4), np.inf, np.float32)},
            "Net/~/linear": {"w": np.ones((4, 5), np.float32), "b": np.ones(5, np.float32)}}
  with pytest.raises(ValueError, match="F.npz: Net/~/conv/w holds NaN or Inf"):
    weights.merge_params(_fresh(), loaded, drop_head=False, head_pattern=PATTERN,
                         source="F.npz")
