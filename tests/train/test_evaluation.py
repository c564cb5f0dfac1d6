"""nfnets/train/evaluation.py: summing the eval step's counts over a split, padding excluded."""

import numpy as np
import pytest

from nfnets.train import evaluation


def _step(correct_per_batch):
  """A stand-in eval step: replicated psum'd counts (leading device axis), as make_eval_step."""
  calls = iter(correct_per_batch)

  def eval_step(params, state, batch):
    del params, state
    count = float(batch["mask"].sum())
    top1 = next(calls)
    return {k: np.full((2,), v) for k, v in (("count", count), ("top_1_correct", top1),
                                             ("top_5_correct", count), ("loss_sum", 0.5 * count))}
  return eval_step


def test_counts_are_summed_over_batches_and_padding_is_excluded():
  batches = [{"mask": np.ones(4)}, {"mask": np.array([1.0, 1.0, 0.0, 0.0])}]
  out = evaluation.evaluate(_step([3, 1]), {"": (None, None)}, batches)
  assert out["num_examples"] == 6
  assert out["top_1_acc"] == pytest.approx(4 / 6) and out["top_5_acc"] == 1.0
  assert out["loss"] == pytest.approx(0.5)


def test_each_parameter_set_gets_its_prefix_and_max_batches_stops_early():
  batches = [{"mask": np.ones(2)}] * 3
  # Per batch, each set in turn: '' gets 2 of 2 right, 'ema_' none; the third batch is cut.
  out = evaluation.evaluate(_step([2, 0, 2, 0, 9, 9]), {"": (1, 1), "ema_": (2, 2)}, batches,
                            max_batches=2)
  assert out["top_1_acc"] == 1.0 and out["ema_top_1_acc"] == 0.0
  assert out["num_examples"] == 4


def test_an_empty_split_says_what_to_check():
  with pytest.raises(ValueError, match="check data.eval_split"):
    evaluation.evaluate(_step([]), {"": (None, None)}, [])
