"""Input-pipeline throughput per CPU core: the host stage and the device augmentation stage.

The host (tf.data) reads JPEGs, decodes only the Inception crop, flips and resizes, and ships
uint8 crops; MixUp/CutMix and RandAugment run inside the train step on the accelerator
(`nfnets.augment.make_augment`). So the two stages are timed apart:

* host: `build_train_iterator` / `build_eval_iterator` on a folder of real photographs (crops
  of the JPEGs that ship in matplotlib's and scikit-learn's wheels, re-encoded at ~400x350
  like an ImageNet image), per CPU core tf.data may use. With the paper's mixing
  (`data.mix_mode='paper'`) the host decodes two images per training example, with 'fast' one;
  the rate is reported per *training example*, which is what the accelerators consume.
* device: the jitted `make_augment` of the F0 recipe (MixUp + CutMix + RandAugment '405' +
  normalisation) on this machine's default JAX backend (on a CPU-only machine that is XLA:CPU,
  a pessimistic stand-in for a GPU).

Cases are alternated over `--repeats` rounds and the best round is kept (the machine is shared:
other jobs only ever slow a round down); the load average before and after is recorded. Writes
bench/results/input_pipeline_<date>.json.

  python bench/input_pipeline.py [--images 128] [--batch 64] [--steps 4] [--repeats 3]
"""

import argparse
import datetime
import io
import json
import os
import platform
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "tests"))

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position
import tensorflow as tf  # pylint: disable=g-import-not-at-top,wrong-import-position
from PIL import Image  # pylint: disable=g-import-not-at-top,wrong-import-position

from nfnets.augment.batch import make_augment  # pylint: disable=g-import-not-at-top,wrong-import-position
from nfnets.data import pipeline  # pylint: disable=g-import-not-at-top,wrong-import-position
from nfnets.data.options import DataOptions  # pylint: disable=g-import-not-at-top,wrong-import-position
from photos import PHOTOS, photo  # pylint: disable=g-import-not-at-top,wrong-import-position

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def write_photo_folder(root: str, num_images: int) -> float:
  """`num_images` JPEG crops of the shipped photographs in 3 class folders; returns mean KB."""
  rng = np.random.default_rng(0)
  sources = [photo(name) for name in PHOTOS]
  sizes = []
  for k in range(num_images):
    c = k % len(sources)
    image = sources[c]
    h, w = image.shape[:2]
    ch, cw = int(h * rng.uniform(0.6, 0.95)), int(w * rng.uniform(0.6, 0.95))
    y, x = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
    crop = Image.fromarray(image[y:y + ch, x:x + cw]).resize((400, 350), Image.BICUBIC)
    buffer = io.BytesIO()
    crop.save(buffer, format="JPEG", quality=90)
    os.makedirs(os.path.join(root, PHOTOS[c]), exist_ok=True)
    with open(os.path.join(root, PHOTOS[c], f"{k:05d}.jpg"), "wb") as f:
      f.write(buffer.getvalue())
    sizes.append(buffer.tell())
  return float(np.mean(sizes)) / 1000


def options(root: str, **overrides) -> DataOptions:
  base = dict(name="folder", folder=root, folder_test_fraction=0.5, num_classes=3,
              image_size=192, eval_image_size=256, randaugment="405", mixup_alpha=0.2,
              cutmix=True)
  return DataOptions(**dict(base, **overrides))


def time_train(opts: DataOptions, batch: int, steps: int) -> float:
  """Training examples per second of the host stage (after one warm-up batch)."""
  it = pipeline.build_train_iterator(opts, global_batch_size=batch, host_index=0,
                                     host_count=1, local_device_count=1)
  next(it)
  start = time.perf_counter()
  for _ in range(steps):
    next(it)
  return steps * batch / (time.perf_counter() - start)


def time_eval(opts: DataOptions, batch: int) -> float:
  it = pipeline.build_eval_iterator(opts, global_batch_size=batch, host_index=0, host_count=1,
                                    local_device_count=1)
  next(it)
  start, count = time.perf_counter(), 0
  for b in it:
    count += int(b["mask"].sum())
  return count / (time.perf_counter() - start)


def time_device(opts: DataOptions, batch: int, steps: int) -> float:
  """Training examples per second of the jitted device augmentation on jax's default device."""
  n = opts.inputs_per_example
  rng = np.random.default_rng(1)
  data = {"images": jax.device_put(rng.integers(0, 256, (n * batch, opts.image_size,
                                                         opts.image_size, 3), dtype=np.uint8)),
          "labels": jax.device_put(rng.integers(0, 3, (n * batch,), dtype=np.int32))}
  augment = jax.jit(make_augment(opts))
  key = jax.random.key(0)
  jax.block_until_ready(augment(data, key))
  start = time.perf_counter()
  for k in range(steps):
    out = augment(data, jax.random.fold_in(key, k))
  jax.block_until_ready(out)
  return steps * batch / (time.perf_counter() - start)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--images", type=int, default=128)
  parser.add_argument("--batch", type=int, default=64)
  parser.add_argument("--steps", type=int, default=4)
  parser.add_argument("--repeats", type=int, default=3)
  args = parser.parse_args()

  cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
  load_before = os.getloadavg()
  with tempfile.TemporaryDirectory() as root:
    mean_kb = write_photo_folder(root, args.images)
    cases = [
        ("host train: crop+flip+resize 192, no mixing", "train",
         options(root, mixup_alpha=0.0, cutmix=False)),
        ("host train: F0 recipe, mix_mode=paper (2 decodes/example)", "train",
         options(root, mix_mode="paper")),
        ("host train: F0 recipe, mix_mode=fast (1 decode/example)", "train",
         options(root, mix_mode="fast")),
        ("host eval: resize 288 + centre crop 256", "eval", options(root)),
        (f"device: MixUp+CutMix(paper)+RA 405+normalise on {jax.default_backend()}", "device",
         options(root, mix_mode="paper")),
    ]
    best = {name: 0.0 for name, _, _ in cases}
    for _ in range(args.repeats):
      for name, kind, opts in cases:
        if kind == "train":
          rate = time_train(opts, args.batch, args.steps)
        elif kind == "eval":
          rate = time_eval(opts, max(args.batch // 4, 1))
        else:
          rate = time_device(opts, args.batch // 4, args.steps)
        best[name] = max(best[name], rate)
  load_after = os.getloadavg()
  rows = [{"case": name, "examples_per_s": best[name],
           "examples_per_s_per_core": best[name] / cores} for name, _, _ in cases]

  print(f"\nInput pipeline, {cores} cores, photo JPEGs 400x350 ~{mean_kb:.0f} KB, batch "
        f"{args.batch}, best of {args.repeats}, load avg {load_before[0]:.2f} -> "
        f"{load_after[0]:.2f}")
  print(f"{'case':72s} {'ex/s':>8s} {'ex/s/core':>10s}")
  for row in rows:
    print(f"{row['case']:72s} {row['examples_per_s']:8.1f} {row['examples_per_s_per_core']:10.1f}")

  today = datetime.date.today().isoformat()
  os.makedirs(RESULTS_DIR, exist_ok=True)
  path = os.path.join(RESULTS_DIR, f"input_pipeline_{today}.json")
  with open(path, "w") as f:
    json.dump({"date": today, "machine": platform.platform(), "processor": platform.processor(),
               "cores": cores, "load_avg_before": load_before, "load_avg_after": load_after,
               "tensorflow": tf.__version__, "jax": jax.__version__,
               "jax_backend": jax.default_backend(), "jpeg_mean_kb": mean_kb,
               "batch": args.batch, "steps": args.steps, "repeats": args.repeats,
               "results": rows}, f, indent=2)
  print(f"Wrote {path}")


if __name__ == "__main__":
  main()
