"""nfnets/augment/batch.py: what make_augment takes and returns, checked by shapes only.

`jax.eval_shape` traces without compiling, so these checks cost no XLA compilation; the values
are tested per stage in test_mixing.py and test_randaugment.py.
"""

import jax
import jax.numpy as jnp
import pytest

from nfnets.augment.batch import make_augment
from nfnets.data.options import DataOptions

B, S = 4, 16


def _shapes(options: DataOptions, inputs: int, dtype=jnp.uint8, rank: int = 4):
  batch = {"images": jax.ShapeDtypeStruct((inputs, S, S, 3)[:rank], dtype),
           "labels": jax.ShapeDtypeStruct((inputs,), jnp.int32)}
  return jax.eval_shape(make_augment(options), batch, jax.random.key(0), 3)


@pytest.mark.parametrize("mode,inputs", [("paper", 2 * B), ("fast", B)])
def test_mixed_batches_come_out_per_example_with_their_targets(mode, inputs):
  out = _shapes(DataOptions(mix_mode=mode, randaugment="205", mix_group_size=2), inputs)
  assert out["images"].shape == (B, S, S, 3) and out["images"].dtype == jnp.float32
  for key, dtype in (("labels", jnp.int32), ("mix_labels", jnp.int32),
                     ("mix_ratio", jnp.float32)):
    assert out[key].shape == (B,) and out[key].dtype == dtype, key


def test_without_mixing_there_are_no_mix_targets():
  out = _shapes(DataOptions(mixup_alpha=0.0, cutmix=False, randaugment=""), B)
  assert sorted(out) == ["images", "labels"] and out["images"].shape == (B, S, S, 3)


def test_a_device_batch_must_hold_whole_mixing_groups():
  with pytest.raises(ValueError, match="do not split into MixUp/CutMix groups of "
                     "data.mix_group_size=32"):
    _shapes(DataOptions(), 2 * B)
  with pytest.raises(ValueError, match="mix_group_size must be a positive"):
    DataOptions(mix_group_size=3)


def test_float_images_or_a_wrong_rank_are_refused_with_the_expected_layout():
  with pytest.raises(ValueError, match="expects uint8 images from the host pipeline"):
    _shapes(DataOptions(mix_group_size=4), 2 * B, dtype=jnp.float32)
  with pytest.raises(AssertionError, match="rank"):
    _shapes(DataOptions(mix_group_size=4), 2 * B, rank=3)
