"""Input-pipeline throughput: images/s per CPU core, train and eval preprocessing.

Generates ImageNet-like JPEGs (~400x350, ~110 KB: smooth colour + noise), writes
them as a 'folder' data set in a temp dir, and times the real iterators
(`build_train_iterator` / `build_eval_iterator`): file read, fused JPEG
decode+crop, resize, MixUp/CutMix, RandAugment, normalisation, batching.
Throughput is divided by the number of CPU cores tf.data may use, so numbers
are comparable across machines. Prints a table and writes
bench/results/input_pipeline_<date>.json.

  python bench/input_pipeline.py [--images 96] [--batch 32] [--steps 6]

On a shared machine the load average (recorded in the JSON) matters: numbers
scale with the idle share of the cores.
"""

import argparse
import datetime
import json
import os
import platform
import tempfile
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# Runnable as a script from a checkout without installing the package.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import ml_collections  # pylint: disable=g-import-not-at-top
import numpy as np
import tensorflow as tf

from nfnets.data import mixing
from nfnets.data import pipeline
from nfnets.data import prepare_imagenet

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def write_folder(root: str, num_images: int, classes: int = 4) -> float:
  """Writes `num_images` photo-like JPEGs into class folders; returns mean KB."""
  rng = np.random.default_rng(0)
  sizes = []
  for k in range(num_images):
    class_dir = os.path.join(root, f"class_{k % classes}")
    os.makedirs(class_dir, exist_ok=True)
    data = prepare_imagenet.random_jpeg(rng, 350, 400)
    sizes.append(len(data))
    with open(os.path.join(class_dir, f"{k:05d}.jpg"), "wb") as f:
      f.write(data)
  return float(np.mean(sizes)) / 1000


def _config(root: str, **kwargs) -> ml_collections.ConfigDict:
  base = dict(name="folder", folder=root, folder_test_fraction=0.5,
              train_split="train", eval_split="test", image_size=224,
              eval_image_size=256, train_preproc="inception_crop",
              eval_preproc="resize_crop_32", randaugment=None, mixup_alpha=None,
              cutmix=False, seed=0)
  return ml_collections.ConfigDict(dict(base, **kwargs))


def _time_batches(iterator, steps: int, batch: int) -> float:
  next(iterator)  # Warm-up: graph tracing and the first prefetch.
  start = time.perf_counter()
  for _ in range(steps):
    next(iterator)
  return steps * batch / (time.perf_counter() - start)


def _time_eval(config, batch: int) -> float:
  """Eval images/s over one pass, timed from the second batch on."""
  it = pipeline.build_eval_iterator(
      config, global_batch_size=batch, host_index=0, host_count=1,
      local_device_count=1)
  next(it)  # Warm-up, as for training.
  start, count = time.perf_counter(), 0
  for b in it:
    count += int(b["mask"].sum())
  return count / (time.perf_counter() - start)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--images", type=int, default=96)
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--steps", type=int, default=6)
  args = parser.parse_args()

  randaugment_note = "nfnets.data.randaugment"
  try:
    mixing.load_randaugment()
  except ImportError:
    # Lets the benchmark run before RandAugment exists; reported in the output.
    mixing.load_randaugment = lambda: (lambda image, n, m, seed: image)
    randaugment_note = "IDENTITY FALLBACK (randaugment.py missing)"

  cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
  load_before = os.getloadavg()
  with tempfile.TemporaryDirectory() as root:
    mean_kb = write_folder(root, args.images)
    cases = [
        ("train inception_crop 224", _config(root)),
        ("train + MixUp/CutMix", _config(root, mixup_alpha=0.2, cutmix=True)),
        ("train + RandAugment 405", _config(root, randaugment="405")),
        ("train + RA 405 + MixUp/CutMix",
         _config(root, randaugment="405", mixup_alpha=0.2, cutmix=True)),
    ]
    rows = []
    for name, config in cases:
      it = pipeline.build_train_iterator(
          config, global_batch_size=args.batch, host_index=0, host_count=1,
          local_device_count=1)
      rate = _time_batches(it, args.steps, args.batch)
      rows.append({"case": name, "images_per_s": rate,
                   "images_per_s_per_core": rate / cores})
    eval_config = _config(root, folder_test_fraction=0.5)
    # The eval split is half the images; small batches give several to time.
    rate = _time_eval(eval_config, max(args.batch // 4, 1))
    rows.append({"case": "eval resize_crop_32 256", "images_per_s": rate,
                 "images_per_s_per_core": rate / cores})
  load_after = os.getloadavg()

  print(f"\nInput pipeline, {cores} cores, JPEGs 400x350 ~{mean_kb:.0f} KB, "
        f"batch {args.batch}, load avg {load_before[0]:.1f} -> {load_after[0]:.1f}")
  print(f"RandAugment: {randaugment_note}")
  print(f"{'case':34s} {'img/s':>8s} {'img/s/core':>11s}")
  for row in rows:
    print(f"{row['case']:34s} {row['images_per_s']:8.1f} "
          f"{row['images_per_s_per_core']:11.1f}")

  today = datetime.date.today().isoformat()
  os.makedirs(RESULTS_DIR, exist_ok=True)
  path = os.path.join(RESULTS_DIR, f"input_pipeline_{today}.json")
  with open(path, "w") as f:
    json.dump({
        "date": today, "machine": platform.platform(),
        "processor": platform.processor(), "cores": cores,
        "load_avg_before": load_before, "load_avg_after": load_after,
        "tensorflow": tf.__version__, "randaugment": randaugment_note,
        "jpeg_mean_kb": mean_kb, "batch": args.batch, "steps": args.steps,
        "results": rows,
    }, f, indent=2)
  print(f"Wrote {path}")


if __name__ == "__main__":
  main()
