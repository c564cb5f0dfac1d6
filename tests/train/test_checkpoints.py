"""nfnets.train.checkpoints: the named layout, keep-K, digests, the step cross-check, fallback.

Every attack here was found by an adversarial run against the checkpoint directory; each test
names what it does to the files and what the restore must do about it.
"""

import json
import os
import random
import shutil
from typing import NamedTuple

import numpy as np
import orbax.checkpoint as ocp
import pytest

from nfnets.train import checkpoints
from nfnets.train import integrity
from nfnets.train.options import CheckpointOptions

ONLY_FORCED = CheckpointOptions(every_steps=0, every_seconds=0, keep=3)


def _ckpt(directory, options=ONLY_FORCED):
  return checkpoints.Checkpointer(str(directory), options, async_save=False)


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
  import jax  # pylint: disable=g-import-not-at-top
  la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
  assert len(la) == len(lb)
  for x, y in zip(la, lb):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert np.asarray(x).dtype == np.asarray(y).dtype


def _saved(directory, steps=(1, 2), **kwargs):
  ckpt = _ckpt(directory, **kwargs)
  for step in steps:
    assert ckpt.save(step, _state(step))
  ckpt.close()


def _restore(directory):
  ckpt = _ckpt(directory)
  try:
    restored, step = ckpt.restore_latest(_state(0))
  finally:
    ckpt.close()
  return restored, step, [(os.path.basename(n), r) for n, r in ckpt.unreadable]


def test_round_trip_keep_and_the_named_layout_stock_orbax_reads(tmp_path):
  d = tmp_path / "c"
  _saved(d, (1, 2, 3), options=CheckpointOptions(every_steps=0, every_seconds=0, keep=2))
  restored, step, unreadable = _restore(d)
  assert step == 3 and not unreadable and type(restored) is _State
  _assert_equal(restored, _state(3))
  assert [s for s, _ in checkpoints.step_dirs(d)] == [2, 3]  # keep=2 dropped step 1.
  # Stock orbax, no target: a browsable dict keyed by the state's field and module names.
  stock = ocp.StandardCheckpointer().restore(str(d / "3" / "state"))
  assert sorted(stock) == ["opt_state", "params", "rng", "step"]
  np.testing.assert_array_equal(stock["params"]["Net/~/linear"]["w"],
                                _state(3).params["Net/~/linear"]["w"])
  meta = json.loads((d / "3" / "meta" / "metadata").read_text())
  assert meta["format"] == integrity.FORMAT_VERSION and meta["step"] == 3
  assert "params/Net/~/conv/w" in meta["digests"] and "opt_state/1" in meta["digests"]
  assert integrity.verify_files(d / "3")  # Sealed.


def test_empty_directory_restores_nothing(tmp_path):
  restored, step, _ = _restore(tmp_path / "c")
  assert restored is None and step == 0


def test_readers_take_weights_alone_and_write_nothing(tmp_path):
  d = tmp_path / "c"
  _saved(d)
  before = sorted((p, os.path.getmtime(os.path.join(r, p))) for r, _, ps in os.walk(d) for p in ps)
  import jax  # pylint: disable=g-import-not-at-top
  shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), _state(0).params)
  # _State has no EMA: read the raw params.
  weights = checkpoints.read_weights(d, {"params": shapes, "state": {}}, ema=False)
  assert weights.step == 2
  _assert_equal(weights.params, _state(2).params)
  after = sorted((p, os.path.getmtime(os.path.join(r, p))) for r, _, ps in os.walk(d) for p in ps)
  assert after == before


def test_a_renamed_checkpoint_is_not_trusted_for_its_name(tmp_path):
  # checkpoints/1 renamed to checkpoints/5: its files and digests are intact, but its state
  # and meta say step 1. It is set aside and the newest consistent one (2) is used.
  d = tmp_path / "c"
  _saved(d)
  os.rename(d / "1", d / "5")
  restored, step, unreadable = _restore(d)
  assert step == 2 and unreadable[0][0] == "5"
  assert "says step 1, its directory name 5" in unreadable[0][1]
  _assert_equal(restored, _state(2))
  assert os.listdir(tmp_path / checkpoints.UNREADABLE_DIR)[0].startswith("5.")
  # Two swapped: each disagrees with its name, so neither is used.
  e = tmp_path / "e"
  _saved(e)
  os.rename(e / "1", e / "tmp")
  os.rename(e / "2", e / "1")
  os.rename(e / "tmp", e / "2")
  ckpt = _ckpt(e)
  with pytest.raises(ValueError, match="All 2 checkpoints .* are unreadable"):
    ckpt.restore_latest(_state(0))
  ckpt.close()


def test_a_flipped_format_cannot_switch_off_verification(tmp_path):
  # An unsealed newest checkpoint (a kill between the commit and the seal), "format": 3 -> 1 in
  # its meta item and one changed data byte: the directory requires format 3, so it is
  # unreadable and step 1 is used.
  d = tmp_path / "c"
  _saved(d)
  os.remove(d / "2" / integrity.FILE_DIGESTS)
  meta_path = d / "2" / "meta" / "metadata"
  meta_path.write_text(meta_path.read_text().replace('"format": 3', '"format": 1'))
  restored, step, unreadable = _restore(d)
  assert step == 1 and "declares format 1" in unreadable[0][1]
  _assert_equal(restored, _state(1))


def test_an_unsealed_checkpoint_is_verified_by_its_arrays_and_sealed_on_resume(tmp_path):
  d = tmp_path / "c"
  _saved(d)
  os.remove(d / "2" / integrity.FILE_DIGESTS)
  restored, step, unreadable = _restore(d)
  assert step == 2 and not unreadable
  assert integrity.verify_files(d / "2")  # The resume finished sealing it.
  # Without the seal, a wrong array digest still makes it unreadable, naming the array.
  os.remove(d / "2" / integrity.FILE_DIGESTS)
  meta_path = d / "2" / "meta" / "metadata"
  meta = json.loads(meta_path.read_text())
  meta["digests"]["params/Net/~/conv/gain"] = "0" * 64
  meta_path.write_text(json.dumps(meta))
  restored, step, unreadable = _restore(d)
  assert step == 1
  assert "digest mismatch in 1 array(s), first params/Net/~/conv/gain" in unreadable[0][1]


@pytest.mark.parametrize("sealed", [True, False])
def test_a_flipped_bit_in_the_meta_item_falls_back_and_never_stops(tmp_path, sealed):
  pristine = tmp_path / "pristine"
  _saved(pristine)
  if not sealed:
    os.remove(pristine / "2" / integrity.FILE_DIGESTS)
  rng = random.Random(int(os.environ.get("NFNETS_FLIP_SEED", "0")))
  outcomes = []
  for trial in range(12):
    work = tmp_path / f"t{trial}"
    shutil.copytree(pristine, work)
    where = _flip_bit(str(work / "2" / "meta" / "metadata"), rng)
    restored, step, unreadable = _restore(work)  # Raises nothing.
    outcomes.append(step)
    if sealed:  # The seal covers the meta item: every flip is caught.
      assert step == 1 and unreadable, where
    # Whatever is used is an intact checkpoint.
    _assert_equal(restored, _state(step))
  assert 1 in outcomes


def test_a_layout_change_is_refused_not_mistaken_for_corruption(tmp_path):
  # A sealed checkpoint of another train-state layout (the optimizer changed): refuse, never
  # fall back and start from scratch as if nothing had been trained.
  d = tmp_path / "c"
  _saved(d, (1,))
  ckpt = _ckpt(d)
  other = _state(0)._replace(opt_state=({"nu": _state(0).params}, np.int32(0)))
  with pytest.raises(checkpoints.SignatureMismatchError, match="train-state layout"):
    ckpt.restore_latest(other)
  wider = _state(0)
  wider.params["Net/~/linear"]["w"] = np.zeros((4, 11), np.float32)
  with pytest.raises(checkpoints.SignatureMismatchError, match=r"linear/w has shape"):
    ckpt.restore_latest(wider)
  ckpt.close()


def test_signature_mismatch_refuses_to_resume(tmp_path):
  d = str(tmp_path / "c")
  sig = integrity.model_signature("NFNet", {"variant": "F0", "width": 1.0}, _state(0).params)
  ckpt = _ckpt(d)
  ckpt.check_signature(sig)
  ckpt.save(1, _state(1))
  ckpt.check_signature(sig)  # Same model: fine.
  other = integrity.model_signature("NFNet", {"variant": "F1", "width": 1.0}, _state(0).params)
  with pytest.raises(checkpoints.SignatureMismatchError, match="kwargs.variant 'F0' -> 'F1'"):
    ckpt.check_signature(other)
  wider = dict(_state(0).params)
  wider["Net/~/linear"] = {"w": np.zeros((4, 11), np.float32)}
  with pytest.raises(checkpoints.SignatureMismatchError, match=r"\[4, 10\] -> \[4, 11\]"):
    ckpt.check_signature(integrity.model_signature("NFNet", {"variant": "F0", "width": 1.0},
                                                   wider))
  ckpt.close()


def test_invalid_options_are_one_line_errors():
  with pytest.raises(ValueError, match="keep must be >= 1"):
    CheckpointOptions(keep=0)
  with pytest.raises(ValueError, match="must be >= 0"):
    CheckpointOptions(every_steps=-1)


def test_all_unreadable_refuses_and_newer_broken_ones_are_set_aside(tmp_path):
  d = tmp_path / "c"
  _saved(d, (1, 2, 3))
  for step in (2, 3):
    _truncate(d / str(step))
  ckpt = _ckpt(d)
  restored, step = ckpt.restore_latest(_state(0))
  assert step == 1 and [os.path.basename(n) for n, _ in ckpt.unreadable] == ["3", "2"]
  _assert_equal(restored, _state(1))
  # Moved next to the checkpoints (kept for inspection): steps 2 and 3 can be written again.
  assert ckpt.all_steps() == [1]
  assert sorted(n.split(".")[0] for n in os.listdir(tmp_path / "unreadable_checkpoints")) == \
      ["2", "3"]
  assert ckpt.save(2, _state(2))
  ckpt.close()
  # Only broken checkpoints left: refuse rather than silently start from scratch.
  for step in (1, 2):
    _truncate(d / str(step))
  ckpt = _ckpt(d)
  with pytest.raises(ValueError, match="All 2 checkpoints in .* are unreadable"):
    ckpt.restore_latest(_state(0))
  ckpt.close()


def _truncate(step_dir) -> None:
  count = 0
  for root, _, files in os.walk(step_dir / "state"):
    for name in files:
      if "metadata" not in name.lower():
        open(os.path.join(root, name), "wb").close()
        count += 1
  assert count


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
  # without complaint. Each trial flips one random bit in one array data file of a fresh copy
  # of checkpoint 2. Sealed, every flip is caught; unsealed, every flip that changes a value is
  # (the array digests), and a flip in bytes no value depends on leaves the values intact.
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
  for trial in range(16):
    work = tmp_path / f"trial{trial}"
    shutil.copytree(pristine, work)
    if trial % 2:
      os.remove(work / "2" / integrity.FILE_DIGESTS)
    where = _flip_bit(str(work / os.path.relpath(rng.choice(data_files), pristine)), rng)
    restored, step, unreadable = _restore(work)
    if step == 2:
      assert trial % 2, f"flip {where} (seed {seed}) went unnoticed in a sealed checkpoint"
      _assert_equal(restored, _state(2, scale=3.0))
      continue
    _assert_equal(restored, _state(1))
    assert [n for n, _ in unreadable] == ["2"]


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
  sig = integrity.model_signature("NFNet", {"variant": "F0"}, _state(0).params)
  ckpt.check_signature(sig)
  ckpt.save(1, _state(1))
  (d / integrity.SIGNATURE_FILE).write_text("{not json")
  with pytest.raises(checkpoints.SignatureMismatchError,
                     match=rf"{integrity.SIGNATURE_FILE} is unreadable .*delete it"):
    ckpt.check_signature(sig)
  ckpt.close()
