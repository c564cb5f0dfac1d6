"""Tests for nfnets.inference.folding: plain-conv networks give the same logits."""

import jax
import numpy as np
import pytest

from tests.photos import PHOTOS, photo
from tests.inference.inference_helpers import TINY, random_params
from nfnets.data.normalization import normalize
from nfnets.inference.folding import fold_weight_standardization, is_ws_conv
from nfnets.models import registry


def _photos(size):
  from PIL import Image  # pylint: disable=g-import-not-at-top
  batch = [np.asarray(Image.fromarray(photo(n)).resize((size, size), Image.BICUBIC), np.float32)
           for n in PHOTOS]
  return normalize(np.stack(batch), 3)


@pytest.mark.parametrize("name", sorted(TINY))
def test_folded_network_gives_the_same_logits_on_real_photographs(name):
  params = random_params(name)
  folded = fold_weight_standardization(params)
  # Every WS conv lost its gain; nothing else changed.
  ws = [m for m, leaves in params.items() if is_ws_conv(leaves)]
  assert ws and all("gain" not in folded[m] for m in ws)
  assert all(folded[m] == params[m] for m in params if m not in ws)
  images = _photos(32)
  plain = registry.make_forward(name, 10, **TINY[name])
  fast = registry.make_forward(name, 10, folded=True, **TINY[name])
  apply = lambda f, p: np.asarray(jax.jit(lambda p, x: f.apply(p, {}, None, x, False)[0][
      "logits"])(p, images))
  want, got = apply(plain, params), apply(fast, folded)
  assert np.std(want) > 1e-3  # The branches are on: logits vary across photographs.
  assert np.linalg.norm(got - want) / np.linalg.norm(want) <= 1e-5
  # The folded network has no standardisation left: its params have no gain at all.
  assert not any("gain" in leaves for leaves in folded.values())
