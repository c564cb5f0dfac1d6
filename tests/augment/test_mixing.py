"""Tests for nfnets/augment/mixing.py: MixUp and CutMix per example, as the official pipeline."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nfnets.augment import mixing

SIZE = 16


def _distinct_inputs(num):
  """num constant images, image j of value j (so every output pixel names its source)."""
  values = np.arange(num, dtype=np.uint8)
  images = np.broadcast_to(values[:, None, None, None], (num, SIZE, SIZE, 3)).copy()
  return jnp.asarray(images), jnp.arange(num, dtype=jnp.int32) + 100


@pytest.fixture(scope="module")
def paper_mix():
  images, labels = _distinct_inputs(32)  # 2 x 16: one device's batch of 16 examples.
  mix = jax.jit(lambda x, y, k: mixing.mix(x, y, k, mixup_alpha=0.2, use_cutmix=True,
                                           mode='paper'))
  return images, labels, mix(images, labels, jax.random.PRNGKey(0)), mix


def test_paper_pairs_quarters_and_both_kinds_in_every_device_batch(paper_mix):
  _, _, out, _ = paper_mix
  # First quarter with the second (MixUp), third with the fourth (CutMix).
  np.testing.assert_array_equal(out.labels, 100 + np.r_[0:8, 16:24])
  np.testing.assert_array_equal(out.mix_labels, 100 + np.r_[8:16, 24:32])
  np.testing.assert_array_equal(out.is_cutmix, np.r_[[False] * 8, [True] * 8])
  assert out.images.shape == (16, SIZE, SIZE, 3) and out.images.dtype == jnp.float32


def test_every_example_has_its_own_ratio_and_box(paper_mix):
  images, _, out, _ = paper_mix
  x, r = np.asarray(out.images), np.asarray(out.mix_ratio)
  # MixUp: x = r * first + (1 - r) * partner, with first = j and partner = j + 8.
  first, partner = np.arange(8.0), np.arange(8.0) + 8
  np.testing.assert_allclose(x[:8, 0, 0, 0], r[:8] * first + (1 - r[:8]) * partner, rtol=1e-6)
  assert len(set(np.round(r[:8], 6))) == 8  # Eight different ratios (one per batch before).
  # CutMix: pixels come from the first image inside the box and the partner outside, and the
  # first label's weight is exactly the share of pixels that show the first image.
  firsts, partners = np.arange(16.0, 24.0), np.arange(24.0, 32.0)
  for i in range(8):
    img = x[8 + i, :, :, 0]
    assert set(np.unique(img)) <= {firsts[i], partners[i]}
    np.testing.assert_allclose((img == firsts[i]).mean(), r[8 + i], atol=1e-7)
  masks = [(x[8 + i, :, :, 0] == firsts[i]).tobytes() for i in range(8)]
  assert len(set(masks)) == 8  # Eight different boxes.


def test_mixing_is_a_function_of_the_key(paper_mix):
  images, labels, out, mix = paper_mix
  again = mix(images, labels, jax.random.PRNGKey(0))
  np.testing.assert_array_equal(again.images, out.images)
  other = mix(images, labels, jax.random.PRNGKey(1))
  assert not np.array_equal(other.mix_ratio, out.mix_ratio)


def test_ratio_and_box_distributions():
  r = jax.random.beta(jax.random.PRNGKey(3), 0.2, 0.2, (20000,))
  boxes = np.asarray(mixing.cutmix_boxes(jax.random.PRNGKey(4), 20000, 100, 60))
  # Beta(0.2, 0.2) is U-shaped: ~2/3 of its mass outside [0.1, 0.9].
  assert 0.6 < float(np.mean((r < 0.1) | (r > 0.9))) < 0.72
  assert np.all((boxes[:, 0] <= boxes[:, 2]) & (boxes[:, 1] <= boxes[:, 3]))
  assert boxes[:, [0, 2]].min() >= 0 and boxes[:, [0, 2]].max() <= 100
  assert boxes[:, [1, 3]].min() >= 0 and boxes[:, [1, 3]].max() <= 60
  # Unclipped area ratio 1 - U has mean 1/2; clipping at the borders only shrinks it.
  area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]) / 6000
  assert 0.25 < area.mean() < 0.5


def test_fast_mode_pairs_neighbours_of_the_same_batch():
  images, labels = _distinct_inputs(8)
  out = mixing.mix(images, labels, jax.random.PRNGKey(5), mixup_alpha=0.2, use_cutmix=True,
                   mode='fast')
  np.testing.assert_array_equal(out.labels, 100 + np.arange(8))
  np.testing.assert_array_equal(out.mix_labels, 100 + (np.arange(8) + 1) % 8)
  # Each image is a first once and a partner once per batch.
  assert sorted(np.asarray(out.mix_labels).tolist()) == sorted(np.asarray(out.labels).tolist())
  np.testing.assert_array_equal(out.is_cutmix, np.arange(8) >= 4)


def test_only_one_kind_and_refusals():
  images, labels = _distinct_inputs(8)
  cut = mixing.mix(images, labels, jax.random.PRNGKey(0), mixup_alpha=0.0, use_cutmix=True,
                   mode='paper')
  assert bool(jnp.all(cut.is_cutmix)) and cut.images.shape[0] == 4
  up = mixing.mix(images, labels, jax.random.PRNGKey(0), mixup_alpha=0.2, use_cutmix=False,
                  mode='paper')
  assert not bool(jnp.any(up.is_cutmix))
  with pytest.raises(ValueError, match='mixup_alpha > 0 or use_cutmix'):
    mixing.mix(images, labels, jax.random.PRNGKey(0), mixup_alpha=0.0, use_cutmix=False,
               mode='paper')
  with pytest.raises(ValueError, match="'paper' or 'fast'"):
    mixing.pair(images, labels, 2, 'lazy')


def test_groups_draw_the_same_mixes_wherever_they_sit():
  # 4 groups of 2 outputs ('paper': 4 inputs each). One device holding all four draws, for each
  # group, what two devices holding two groups each draw: the key is the group's global index.
  images, labels = _distinct_inputs(16)
  key = jax.random.PRNGKey(9)
  kwargs = dict(mixup_alpha=0.2, use_cutmix=True, mode='paper', group_size=2)
  whole = mixing.mix_groups(images, labels, key, first_group=0, **kwargs)
  halves = [mixing.mix_groups(images[8 * d:8 * (d + 1)], labels[8 * d:8 * (d + 1)], key,
                              first_group=2 * d, **kwargs) for d in range(2)]
  for field in ('images', 'labels', 'mix_labels', 'mix_ratio', 'is_cutmix'):
    np.testing.assert_array_equal(
        np.asarray(getattr(whole, field)),
        np.concatenate([np.asarray(getattr(h, field)) for h in halves]))
  # Pairs stay inside their group: group g's outputs mix inputs [4g, 4g + 4) only.
  for g in range(4):
    members = set((100 + np.arange(4 * g, 4 * g + 4)).tolist())
    got = set(np.asarray(whole.labels[2 * g:2 * g + 2]).tolist())
    got |= set(np.asarray(whole.mix_labels[2 * g:2 * g + 2]).tolist())
    assert got <= members
  # Groups draw different ratios from each other.
  assert len(set(np.asarray(whole.mix_ratio).round(6).tolist())) > 2
  with pytest.raises(ValueError, match='groups of data.mix_group_size=3'):
    mixing.mix_groups(images, labels, key, first_group=0, mixup_alpha=0.2, use_cutmix=True,
                      mode='paper', group_size=3)
