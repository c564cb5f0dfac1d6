"""Tests for nfnets/data/mixing.py: MixUp/CutMix weights and RandAugment after mixing."""

import numpy as np
import pytest
import tensorflow as tf

from nfnets.data import mixing

SIZE = 16


def _pairs(num):
  """First images all 0, partners all 1, labels 0..2num-1."""
  images = tf.concat([tf.zeros([num, SIZE, SIZE, 3]), tf.ones([num, SIZE, SIZE, 3])], 0)
  return images, tf.range(2 * num, dtype=tf.int64)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_mixup_and_cutmix_halves_and_weights(seed):
  images, labels = _pairs(4)
  out = mixing.mix_batch(images, labels, tf.constant([seed, 9], tf.int64),
                         mixup_alpha=0.2, cutmix=True)
  x, ratio = out["images"].numpy(), out["mix_ratio"].numpy()
  assert x.shape == (4, SIZE, SIZE, 3)
  assert out["labels"].numpy().tolist() == [0, 1, 2, 3]
  assert out["mix_labels"].numpy().tolist() == [4, 5, 6, 7]
  assert np.all((ratio >= 0) & (ratio <= 1))
  # MixUp half: pixel = r * 0 + (1 - r) * 1, so the weight of 'labels' is 1 - x.
  np.testing.assert_allclose(1 - x[:2], ratio[:2, None, None, None] + 0 * x[:2],
                             atol=1e-6)
  # CutMix half: pixels are either first (0) or partner (1), and the weight of
  # 'labels' equals the visible fraction of the first image.
  assert set(np.unique(x[2:]).tolist()) <= {0.0, 1.0}
  np.testing.assert_allclose((x[2:] == 0).mean(axis=(1, 2, 3)), ratio[2:], atol=1e-6)
  # Weights of the two labels sum to 1 pixel-wise as well: total mass is kept.
  np.testing.assert_allclose(x.mean(axis=(1, 2, 3)) + ratio, 1.0, atol=1e-5)


def test_cutmix_only_and_mixup_only():
  images, labels = _pairs(3)
  seed = tf.constant([5, 5], tf.int64)
  cut = mixing.mix_batch(images, labels, seed, mixup_alpha=None, cutmix=True)
  assert set(np.unique(cut["images"].numpy()).tolist()) <= {0.0, 1.0}
  mix = mixing.mix_batch(images, labels, seed, mixup_alpha=0.2, cutmix=False)
  np.testing.assert_allclose(mix["images"].numpy().mean(axis=(1, 2, 3)),
                             1 - mix["mix_ratio"].numpy(), atol=1e-6)
  with pytest.raises(ValueError, match="mixup_alpha"):
    mixing.mix_batch(images, labels, seed, mixup_alpha=0.0, cutmix=False)


def test_cutmix_box_in_bounds_and_side_distribution():
  sides = []
  for i in range(300):
    y0, x0, y1, x1 = mixing.cutmix_box(tf.constant([1, i], tf.int64), 100).numpy()
    assert 0 <= y0 <= y1 <= 100 and 0 <= x0 <= x1 <= 100
    sides.append(max(y1 - y0, x1 - x0))
  # Unclipped side sqrt(1-U)*100 has mean 66.7; clipping only shrinks it.
  assert 35 < np.mean(sides) < 67


def test_beta_is_u_shaped_for_alpha_0_2():
  draws = np.array([float(mixing.sample_beta(tf.constant([3, i], tf.int64), 0.2))
                    for i in range(400)])
  assert np.all((draws >= 0) & (draws <= 1))
  assert abs(draws.mean() - 0.5) < 0.08
  # Beta(0.2, 0.2) puts ~60% of its mass outside [0.1, 0.9].
  assert 0.45 < np.mean((draws < 0.1) | (draws > 0.9)) < 0.75


@pytest.mark.parametrize("level,expected", [("405", (4, 5)), (215, (2, 15)),
                                            (None, None), ("none", None)])
def test_parse_randaugment(level, expected):
  assert mixing.parse_randaugment(level) == expected


@pytest.mark.parametrize("level", ["4", "abc", "4-5"])
def test_parse_randaugment_rejects(level):
  with pytest.raises(ValueError, match="randaugment"):
    mixing.parse_randaugment(level)


def test_apply_randaugment_clips_to_uint8_first():
  seen = {}

  def spy(image, num_layers, magnitude, seed):
    seen.update(dtype=image.dtype, args=(num_layers, magnitude))
    return image

  image = tf.constant([[[-40.0, 100.4, 300.0]]])
  out = mixing.apply_randaugment(image, tf.constant([0, 0], tf.int64), 2, 15,
                                 randaugment_fn=spy)
  assert seen == {"dtype": tf.uint8, "args": (2, 15)}
  assert out.dtype == tf.float32
  np.testing.assert_array_equal(out.numpy(), [[[0.0, 100.0, 255.0]]])


def test_apply_randaugment_gray_keeps_one_channel():
  image = tf.fill([8, 8, 1], 77.0)
  out = mixing.apply_randaugment(image, tf.constant([0, 0], tf.int64), 1, 5,
                                 randaugment_fn=lambda x, n, m, s: x)
  assert out.shape == (8, 8, 1)
  np.testing.assert_array_equal(out.numpy(), image.numpy())


def test_real_randaugment_is_deterministic_per_seed():
  pytest.importorskip("nfnets.data.randaugment")
  rng = np.random.default_rng(0)
  image = tf.constant(rng.uniform(0, 255, (24, 24, 3)), tf.float32)
  run = lambda s: mixing.apply_randaugment(
      image, tf.constant(s, tf.int64), 2, 9).numpy()
  a, b = run([1, 1]), run([1, 1])
  np.testing.assert_array_equal(a, b)
  assert a.shape == (24, 24, 3) and a.min() >= 0 and a.max() <= 255
  assert any(not np.array_equal(a, run([1, k])) for k in range(2, 6))
