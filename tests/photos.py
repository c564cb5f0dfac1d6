"""Real photographs that ship inside installed wheels, for tests that need natural images.

No machine here reaches the internet, so data sets cannot be downloaded; matplotlib and
scikit-learn each install a few JPEGs with their package data.
"""

import importlib.util
import os

import numpy as np
from PIL import Image

PHOTOS = ("grace_hopper", "china", "flower")


def photo_path(name: str) -> str:
  """Path of 'grace_hopper' (matplotlib's sample data), 'china' or 'flower' (scikit-learn's)."""
  if name not in PHOTOS:
    raise ValueError(f"unknown photograph {name!r}; choose one of {PHOTOS}")
  # Found without importing matplotlib or scikit-learn, which take seconds.
  if name == "grace_hopper":
    package_dir = importlib.util.find_spec("matplotlib").submodule_search_locations[0]
    return os.path.join(package_dir, "mpl-data", "sample_data", "grace_hopper.jpg")
  package_dir = importlib.util.find_spec("sklearn").submodule_search_locations[0]
  return os.path.join(package_dir, "datasets", "images", f"{name}.jpg")


def photo(name: str) -> np.ndarray:
  """The photograph `name` as uint8 RGB [H, W, 3]."""
  with Image.open(photo_path(name)) as image:
    return np.asarray(image.convert("RGB"))


def write_tiny_folder(root: str) -> str:
  """An image-folder data set of real photographs: 3 classes x (8 train + 4 test) JPEG crops.

  Class c holds crops of photograph c at seeded random places, 48x40 px, so the set is
  learnable and every image is distinct. Returns `root`.
  """
  rng = np.random.default_rng(0)
  for c, name in enumerate(PHOTOS):
    image = photo(name)
    for split, count in (("train", 8), ("test", 4)):
      os.makedirs(os.path.join(root, split, name), exist_ok=True)
      for k in range(count):
        y = rng.integers(0, image.shape[0] - 200)
        x = rng.integers(0, image.shape[1] - 240)
        crop = Image.fromarray(image[y:y + 200, x:x + 240]).resize((48, 40), Image.BILINEAR)
        crop.save(os.path.join(root, split, name, f"{k}.jpg"), quality=90)
  return root
