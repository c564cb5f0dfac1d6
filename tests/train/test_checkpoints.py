"""Tests for nfnets.train.checkpoints: round trip, keep-K, policies, digests, signatures, fallback."""

import json
import os
import random
import shutil
from typing import NamedTuple

import numpy as np
import orbax.checkpoint as ocp
import pytest

from nfnets.train import checkpoints
from nfnets.train.options import CheckpointOptions

ONLY_FORCED = CheckpointOptions(every_steps=0, every_seconds=0, keep=3)


def _ckpt(directory, options=ONLY_FORCED, **kwargs):
  return checkpoints.Checkpointer(str(directory), options, async_save=False, **kwargs)


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
  ckpt = _ckpt(tmp_path / "c", CheckpointOptions(every_steps=0, every_seconds=0, keep=2))
  for step in (1, 2, 3):
    assert ckpt.save(step, _state(step))
  assert ckpt.all_steps() == [2, 3]  # keep=2 dropped step 1.
  restored, step = ckpt.restore_latest(_state(0))
  assert step == 3
  assert type(restored) is _State
  _assert_equal(restored, _state(3))
  ckpt.close()


def test_empty_directory_restores_nothing(tmp_path):
  ckpt = _ckpt(tmp_path / "c")
  state, step = ckpt.restore_latest(_state(0))
  assert state is None and step == 0
  ckpt.close()


def test_should_save_by_steps_and_seconds(tmp_path):
  # orbax's policies decide: every N steps (FixedIntervalPolicy: multiples of N) ...
  ckpt = _ckpt(tmp_path / "c", CheckpointOptions(every_steps=5, every_seconds=0))
  assert not ckpt.should_save(4)
  assert ckpt.should_save(5)
  ckpt.save(5, _state(5))
  assert not ckpt.should_save(5) and not ckpt.should_save(9) and ckpt.should_save(10)
  ckpt.close()
  # ... and/or at least M seconds after the last checkpoint (ContinuousCheckpointingPolicy).
  timed = _ckpt(tmp_path / "t", CheckpointOptions(every_steps=0, every_seconds=3600))
  assert timed.should_save(1)  # No checkpoint yet.
  timed.save(1, _state(1))
  assert not timed.should_save(2)  # An hour has not passed.
  timed.close()
  never = _ckpt(tmp_path / "n", ONLY_FORCED)
  assert not never.should_save(1) and not never.should_save(1000)
  never.close()


def test_corrupt_latest_falls_back_to_previous(tmp_path, caplog):
  d = tmp_path / "c"
  ckpt = _ckpt(d)
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
  ckpt = _ckpt(d)
  with caplog.at_level("INFO"):
    restored, step = ckpt.restore_latest(_state(0))
  assert step == 1
  _assert_equal(restored, _state(1))
  assert any(str(d / "2") in r.getMessage() for r in caplog.records)
  ckpt.close()


def test_signature_mismatch_refuses_to_resume(tmp_path):
  d = str(tmp_path / "c")
  sig = checkpoints.model_signature("NFNet", {"variant": "F0", "width": 1.0}, _state(0).params)
  ckpt = _ckpt(d)
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
  ckpt = _ckpt(tmp_path / "c")
  ckpt.save(1, _state(1))
  other = _state(0)._replace(opt_state=({"nu": other_params()}, np.int32(0)))
  with pytest.raises(checkpoints.SignatureMismatchError, match="train-state layout"):
    ckpt.restore_latest(other)
  ckpt.close()


def other_params():
  return {"Net/~/conv": {"gain": np.ones(4, np.float32), "w": np.zeros((3, 3, 2, 4), np.float32)},
          "Net/~/linear": {"w": np.zeros((4, 10), np.float32)}}


def test_invalid_options_are_one_line_errors():
  with pytest.raises(ValueError, match="keep must be >= 1"):
    CheckpointOptions(keep=0)
  with pytest.raises(ValueError, match="must be >= 0"):
    CheckpointOptions(every_steps=-1)


def test_other_shapes_are_refused_not_mistaken_for_corruption(tmp_path):
  # Same layout, one wider layer, and no signature file to catch it: restoring must refuse,
  # never treat the checkpoint as corrupt (which would fall back and, with nothing left,
  # start from scratch as if nothing had been trained).
  ckpt = _ckpt(tmp_path / "c")
  ckpt.save(1, _state(1))
  wider = _state(0)
  wider.params["Net/~/linear"]["w"] = np.zeros((4, 11), np.float32)
  with pytest.raises(checkpoints.SignatureMismatchError, match=r"linear.*different shape"):
    ckpt.restore_latest(wider)
  ckpt.close()


def test_all_unreadable_refuses_and_newer_broken_ones_are_set_aside(tmp_path):
  d = tmp_path / "c"
  ckpt = _ckpt(d)
  for step in (1, 2, 3):
    ckpt.save(step, _state(step))
  ckpt.close()
  for step in (2, 3):
    for root, _, files in os.walk(d / str(step) / "state"):
      for name in files:
        if "metadata" not in name:
          open(os.path.join(root, name), "wb").close()
  ckpt = _ckpt(d)
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
  ckpt = _ckpt(d)
  with pytest.raises(ValueError, match="All 2 checkpoints in .* are unreadable"):
    ckpt.restore_latest(_state(0))
  ckpt.close()


def _flip_bit(path: str, rng: random.Random) -> str:
  with open(path, "r+b") as f:
    data = bytearray(f.read())
    byte, bit = rng.randrange(len(data)), rng.randrange(8)
    data[byte] ^= 1 << bit
    f.seek(0)
    f.write(data)
  return f"{os.path.basename(path)} byte {byte} bit {bit}"


def test_every_single_bit_flip_in_the_data_is_detected(tmp_path):
  # Silent corruption, as a failing disk or a bad copy makes it: orbax reads the flipped bytes
  # without complaint (before digests, 15 of 16 flips came back as changed values). Each
  # trial flips one random bit in one array data file of a fresh copy of checkpoint 2.
  pristine = tmp_path / "pristine"
  ckpt = _ckpt(pristine)
  ckpt.save(1, _state(1))
  ckpt.save(2, _state(2, scale=3.0))
  ckpt.close()
  data_files = [os.path.join(root, name) for root, _, names in os.walk(pristine / "2" / "state")
                for name in names if os.path.basename(root) == "d"]
  assert data_files
  seed = int(os.environ.get("NFNETS_FLIP_SEED", "0"))
  rng = random.Random(seed)
  tried = 20
  for trial in range(tried):
    work = tmp_path / f"trial{trial}"
    shutil.copytree(pristine, work)
    victim = str(work / os.path.relpath(rng.choice(data_files), pristine))
    where = _flip_bit(victim, rng)
    ckpt = _ckpt(work)
    restored, step = ckpt.restore_latest(_state(0))
    ckpt.close()
    # Detected: step 2 is unreadable (set aside, named) and step 1 is used, intact.
    assert step == 1, f"flip {where} (seed {seed}) went unnoticed"
    _assert_equal(restored, _state(1))
    assert [os.path.basename(n) for n, _ in ckpt.unreadable] == ["2"]


def test_digest_mismatch_is_named_and_legacy_checkpoints_restore_unverified(tmp_path):
  d = tmp_path / "c"
  ckpt = _ckpt(d)
  ckpt.save(1, _state(1))
  ckpt.close()
  # Rewrite the meta item with one wrong digest: the restore names the array.
  meta_path = d / "1" / "meta" / "metadata"
  meta = json.loads(meta_path.read_text())
  assert meta["format"] == checkpoints.FORMAT_VERSION and len(meta["digests"]) == 9
  meta["digests"]["00001"] = "0" * 64
  meta_path.write_text(json.dumps(meta))
  # The file digests would catch the edit first; without them (a kill between the commit and
  # the file digests) the array digests still do.
  os.remove(d / "1" / checkpoints.FILE_DIGESTS)
  ckpt = _ckpt(d)
  with pytest.raises(ValueError, match="unreadable"):
    ckpt.restore_latest(_state(0))
  assert ("digest mismatch in 1 array(s), first .params['Net/~/conv']['gain']"
          in ckpt.unreadable[0][1])
  ckpt.close()
  # A checkpoint written before digests existed (format 1: no 'format', no 'digests').
  del meta["format"], meta["digests"]
  meta_path.write_text(json.dumps(meta))
  ckpt = _ckpt(d)
  restored, step = ckpt.restore_latest(_state(0))
  assert step == 1
  _assert_equal(restored, _state(1))
  ckpt.close()


def test_non_finite_state_is_never_written(tmp_path):
  ckpt = _ckpt(tmp_path / "c")
  bad = _state(1)
  bad.params["Net/~/linear"]["w"][0, 0] = np.nan
  with pytest.raises(checkpoints.NonFiniteStateError, match=r"step 1 .*Net/~/linear"):
    ckpt.save(1, bad)
  assert ckpt.all_steps() == []
  ckpt.close()


def test_unreadable_signature_file_is_named(tmp_path):
  d = tmp_path / "c"
  ckpt = _ckpt(d)
  sig = checkpoints.model_signature("NFNet", {"variant": "F0"}, _state(0).params)
  ckpt.check_signature(sig)
  ckpt.save(1, _state(1))
  (d / checkpoints.SIGNATURE_FILE).write_text("{not json")
  with pytest.raises(checkpoints.SignatureMismatchError,
                     match=rf"{checkpoints.SIGNATURE_FILE} is unreadable .*delete it"):
    ckpt.check_signature(sig)
  ckpt.close()
