"""nfnets/data/normalization.py: the constants and the one normalise function (numpy, JAX, TF)."""

import jax.numpy as jnp
import numpy as np
import pytest

from nfnets.data import normalization


def test_the_official_constants_map_the_mean_image_to_zero_and_std_to_one():
  mean, std = normalization.mean_std(3)
  assert mean == pytest.approx((123.675, 116.28, 103.53))
  assert std == pytest.approx((58.395, 57.12, 57.375))
  image = np.broadcast_to(np.asarray(mean, np.float32), (2, 4, 4, 3))
  np.testing.assert_allclose(normalization.normalize(image, 3), 0.0, atol=1e-5)
  np.testing.assert_allclose(normalization.normalize(image + np.asarray(std, np.float32), 3),
                             1.0, atol=1e-5)


def test_grayscale_uses_the_channel_averages():
  (mean,), (std,) = normalization.mean_std(1)
  assert mean == pytest.approx(np.mean(normalization.MEAN_RGB))
  assert std == pytest.approx(np.mean(normalization.STDDEV_RGB))


def test_numpy_jax_and_the_tf_data_pipeline_agree():
  from nfnets.quiet_tensorflow import tf  # pylint: disable=g-import-not-at-top
  x = np.random.default_rng(0).uniform(0, 255, (2, 5, 5, 3)).astype(np.float32)
  want = normalization.normalize(x, 3)
  np.testing.assert_allclose(np.asarray(normalization.normalize(jnp.asarray(x), 3, xp=jnp)),
                             want, rtol=1e-6)
  # As the evaluation pipeline runs it: inside a tf.data map.
  dataset = tf.data.Dataset.from_tensors(x).map(
      lambda image: normalization.normalize(image, 3, xp=tf.experimental.numpy))
  got = next(iter(dataset)).numpy()
  assert got.dtype == np.float32
  np.testing.assert_allclose(got, want, rtol=1e-6)


def test_other_channel_counts_are_refused():
  with pytest.raises(ValueError, match="1 or 3 channels, got 4"):
    normalization.mean_std(4)
