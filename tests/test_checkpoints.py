"""Tests for nfnets.checkpoints: round trip, keep-K, signatures, corrupt fallback, signals."""

import os
import signal
from typing import NamedTuple

import numpy as np
import pytest

from nfnets import checkpoints


class _State(NamedTuple):
  step: np.ndarray
  params: dict
  opt_state: tuple
  rng: np.ndarray


def _state(step: int, scale: float = 1.0) -> _State:
  r = np.random.RandomState(step)
  params = {"Net/~/conv": {"w": (r.randn(3, 3, 2, 4) * scale).astype(np.float32),
                           "gain": np.ones(4, np.float32)},
            "Net/~/linear": {"w": r.randn(4, 10).astype(np.float32)}}
  opt = ({"mu": {k: {kk: np.zeros_like(vv) + step for kk, vv in v.items()}
                 for k, v in params.items()}}, np.int32(step))
  return _State(np.int32(step), params, opt, np.array([0, step], np.uint32))


def _assert_equal(a, b):
  import jax
  la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
  assert len(la) == len(lb)
  for x, y in zip(la, lb):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert np.asarray(x).dtype == np.asarray(y).dtype


def test_round_trip_keep_and_latest(tmp_path):
  ckpt = checkpoints.Checkpointer(str(tmp_path / "c"), every_steps=0, every_seconds=0, keep=2,
                                  async_save=False)
  for step in (1, 2, 3):
    assert ckpt.save(step, _state(step))
  assert ckpt.all_steps() == [2, 3]  # keep=2 dropped step 1.
  restored, step = ckpt.restore_latest(_state(0))
  assert step == 3
  assert type(restored) is _State
  _assert_equal(restored, _state(3))
  ckpt.close()


def test_empty_directory_restores_nothing(tmp_path):
  ckpt = checkpoints.Checkpointer(str(tmp_path / "c"), async_save=False)
  state, step = ckpt.restore_latest(_state(0))
  assert state is None and step == 0
  ckpt.close()


def test_should_save_by_steps_and_seconds(tmp_path):
  ckpt = checkpoints.Checkpointer(str(tmp_path / "c"), every_steps=5, every_seconds=0,
                                  async_save=False)
  assert not ckpt.should_save(4)
  assert ckpt.should_save(5)
  ckpt.save(5, _state(5))
  assert not ckpt.should_save(5) and not ckpt.should_save(9) and ckpt.should_save(10)
  ckpt.close()
  timed = checkpoints.Checkpointer(str(tmp_path / "t"), every_steps=0, every_seconds=1e-9,
                                   async_save=False)
  assert timed.should_save(1)
  timed.close()


def test_corrupt_latest_falls_back_to_previous(tmp_path, caplog):
  d = tmp_path / "c"
  ckpt = checkpoints.Checkpointer(str(d), every_steps=0, keep=3, async_save=False)
  ckpt.save(1, _state(1))
  ckpt.save(2, _state(2))
  ckpt.close()
  # Truncate every data file of the newest checkpoint's array store (as a crashed disk would).
  truncated = 0
  for root, _, files in os.walk(d / "2" / "state"):
    for name in files:
      if "metadata" not in name:
        with open(os.path.join(root, name), "r+b") as f:
          f.truncate(0)
        truncated += 1
  assert truncated > 0
  ckpt = checkpoints.Checkpointer(str(d), async_save=False)
  with caplog.at_level("WARNING"):
    restored, step = ckpt.restore_latest(_state(0))
  assert step == 1
  _assert_equal(restored, _state(1))
  assert any(str(d / "2") in r.getMessage() for r in caplog.records)
  ckpt.close()


def test_signature_mismatch_refuses_to_resume(tmp_path):
  d = str(tmp_path / "c")
  sig = checkpoints.model_signature("NFNet", {"variant": "F0", "width": 1.0}, _state(0).params)
  ckpt = checkpoints.Checkpointer(d, async_save=False)
  ckpt.check_signature(sig)
  ckpt.save(1, _state(1))
  ckpt.check_signature(sig)  # Same model: fine.
  other = checkpoints.model_signature("NFNet", {"variant": "F1", "width": 1.0}, _state(0).params)
  with pytest.raises(checkpoints.SignatureMismatchError, match="kwargs.variant 'F0' -> 'F1'"):
    ckpt.check_signature(other)
  wider = dict(_state(0).params)
  wider["Net/~/linear"] = {"w": np.zeros((4, 11), np.float32)}
  with pytest.raises(checkpoints.SignatureMismatchError, match=r"\[4, 10\] -> \[4, 11\]"):
    ckpt.check_signature(checkpoints.model_signature("NFNet", {"variant": "F0", "width": 1.0},
                                                     wider))
  ckpt.close()


def test_layout_change_is_refused(tmp_path):
  ckpt = checkpoints.Checkpointer(str(tmp_path / "c"), async_save=False)
  ckpt.save(1, _state(1))
  other = _state(0)._replace(opt_state=({"nu": other_params()}, np.int32(0)))
  with pytest.raises(checkpoints.SignatureMismatchError, match="train-state layout"):
    ckpt.restore_latest(other)
  ckpt.close()


def other_params():
  return {"Net/~/conv": {"gain": np.ones(4, np.float32), "w": np.zeros((3, 3, 2, 4), np.float32)},
          "Net/~/linear": {"w": np.zeros((4, 10), np.float32)}}


def test_stop_flag_catches_sigterm_and_restores_handler():
  before = signal.getsignal(signal.SIGTERM)
  with checkpoints.StopFlag() as flag:
    assert not flag
    os.kill(os.getpid(), signal.SIGTERM)
    assert flag and flag.signum == signal.SIGTERM and flag.name == "SIGTERM"
  assert signal.getsignal(signal.SIGTERM) is before


def test_invalid_keep_is_one_line_error(tmp_path):
  with pytest.raises(ValueError, match="keep must be >= 1"):
    checkpoints.Checkpointer(str(tmp_path), keep=0)


def test_other_shapes_are_refused_not_mistaken_for_corruption(tmp_path):
  # Same layout, one wider layer, and no signature file to catch it: restoring must refuse,
  # never treat the checkpoint as corrupt (which would fall back and, with nothing left,
  # start from scratch as if nothing had been trained).
  ckpt = checkpoints.Checkpointer(str(tmp_path / "c"), async_save=False)
  ckpt.save(1, _state(1))
  wider = _state(0)
  wider.params["Net/~/linear"]["w"] = np.zeros((4, 11), np.float32)
  with pytest.raises(checkpoints.SignatureMismatchError, match=r"linear.*different shape"):
    ckpt.restore_latest(wider)
  ckpt.close()


def test_all_unreadable_refuses_and_newer_broken_ones_are_set_aside(tmp_path):
  d = tmp_path / "c"
  ckpt = checkpoints.Checkpointer(str(d), every_steps=0, keep=3, async_save=False)
  for step in (1, 2, 3):
    ckpt.save(step, _state(step))
  ckpt.close()
  for step in (2, 3):
    for root, _, files in os.walk(d / str(step) / "state"):
      for name in files:
        if "metadata" not in name:
          open(os.path.join(root, name), "wb").close()
  ckpt = checkpoints.Checkpointer(str(d), async_save=False)
  restored, step = ckpt.restore_latest(_state(0))
  assert step == 1 and [os.path.basename(n) for n, _ in ckpt.unreadable] == ["3", "2"]
  # Moved next to the checkpoints (kept for inspection): steps 2 and 3 can be written again.
  assert ckpt.all_steps() == [1]
  assert sorted(n.split(".")[0] for n in os.listdir(tmp_path / "unreadable_checkpoints")) == \
      ["2", "3"]
  assert ckpt.save(2, _state(2))
  ckpt.close()
  # Only broken checkpoints left: refuse rather than silently start from scratch.
  for root, _, files in os.walk(d):
    for name in files:
      if "metadata" not in name and os.sep + "state" + os.sep in os.path.join(root, name):
        open(os.path.join(root, name), "wb").close()
  ckpt = checkpoints.Checkpointer(str(d), async_save=False)
  with pytest.raises(ValueError, match="All 2 checkpoints in .* are unreadable"):
    ckpt.restore_latest(_state(0))
  ckpt.close()
