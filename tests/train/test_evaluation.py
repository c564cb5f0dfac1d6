"""nfnets/train/evaluation.py: summing the eval step's counts over a split, padding excluded."""

import jax
import numpy as np
import pytest

from nfnets.train import evaluation
from nfnets.train import mesh as mesh_lib

MESH = mesh_lib.make_mesh(jax.devices()[:2])


def _step(correct_per_batch):
  """A stand-in eval step: counts summed over the global batch, as make_eval_step."""
  calls = iter(correct_per_batch)

  def eval_step(params, state, batch):
    del params, state
    assert batch["mask"].shape == (4,)  # The global batch, split over the mesh.
    count = float(np.asarray(batch["mask"]).sum())
    top1 = next(calls)
    return {k: np.float32(v) for k, v in (("count", count), ("top_1_correct", top1),
                                          ("top_5_correct", count), ("loss_sum", 0.5 * count))}
  return eval_step


def test_counts_are_summed_over_batches_and_padding_is_excluded():
  batches = [{"mask": np.ones(4)}, {"mask": np.array([1.0, 1.0, 0.0, 0.0])}]
  out = evaluation.evaluate(_step([3, 1]), {"": (None, None)}, batches, MESH)
  assert out["num_examples"] == 6
  assert out["top_1_acc"] == pytest.approx(4 / 6) and out["top_5_acc"] == 1.0
  assert out["loss"] == pytest.approx(0.5)


def test_each_parameter_set_gets_its_prefix_and_max_batches_stops_early():
  batches = [{"mask": np.ones(4)}] * 3
  # Per batch, each set in turn: '' gets 4 of 4 right, 'ema_' none; the third batch is cut.
  out = evaluation.evaluate(_step([4, 0, 4, 0, 9, 9]), {"": (1, 1), "ema_": (2, 2)}, batches,
                            MESH, max_batches=2)
  assert out["top_1_acc"] == 1.0 and out["ema_top_1_acc"] == 0.0
  assert out["num_examples"] == 8


def test_an_empty_split_says_what_to_check():
  with pytest.raises(ValueError, match="check data.eval_split"):
    evaluation.evaluate(_step([]), {"": (None, None)}, [], MESH)
