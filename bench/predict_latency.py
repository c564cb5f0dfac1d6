"""One image through `python -m nfnets.predict`, cold and warm, against timm in a fresh process.

  python bench/predict_latency.py [--variant F0] [--repeats 3] [--out bench/results/x.json]

What a user waits for when classifying one photo from the command line, process start to
exit, on this machine's CPU:
  ours, cold   `python -m nfnets.predict --weights=<F0 npz> photo.jpg` with an empty
               compilation cache (the first call on a model: imports, load, compile, run);
  ours, warm   the same command again: the compiled network comes from the persistent cache;
  timm         a fresh `python -c` that imports torch and timm, builds `dm_nfnet_f0`
               (pretrained=False), preprocesses the photo with timm's own eval transform at
               its test size (256 px for F0, as ours) and classifies it: the same work, the
               way a timm user does it.
The weights are random (no trained F0 file is available offline), saved as our npz with the
model described, at the variant's test resolution (256 px for F0): latency and memory do not
depend on the values. The photo is matplotlib's grace_hopper.jpg. The three are run
alternately (cold, warm, timm; then timm, cold, warm; ...) and the best of --repeats is kept;
peak memory is each command's own peak resident set (`ru_maxrss`). The load average before and
after is printed and saved: numbers from a busy machine are pessimistic and noisy. Writes
bench/results/<time>_predict_latency_<variant>.json. Not part of CI: a minute or more of CPU.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # The test helpers are the `tests` package at the repository root.

TIMM_SCRIPT = """
import sys
import torch, timm
from PIL import Image
model = timm.create_model({name!r}, pretrained=False).eval()
config = timm.data.resolve_data_config({{}}, model=model, use_test_size=True)
transform = timm.data.create_transform(**config)
with Image.open(sys.argv[1]) as image:
  x = transform(image.convert('RGB')).unsqueeze(0)
with torch.no_grad():
  probs = model(x).softmax(-1)[0]
top = probs.topk(5)
print(sys.argv[1] + ': ' + ' | '.join(f'{{p:.3f}} {{i}}' for p, i in zip(top.values.tolist(),
                                                                    top.indices.tolist())))
"""


def write_random_weights(variant: str, path: str) -> int:
  """Random params of NFNet `variant` (1000 classes) as our npz; returns its test resolution."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from nfnets import weights  # pylint: disable=g-import-not-at-top
  from nfnets.models import registry  # pylint: disable=g-import-not-at-top
  from nfnets.models.nfnet import NFNet  # pylint: disable=g-import-not-at-top
  from nfnets.weights.npz import ModelSpec  # pylint: disable=g-import-not-at-top
  size = NFNet.VARIANTS[variant].test_imsize
  forward = registry.make_forward("NFNet", 1000, variant=variant)
  shapes, _ = jax.eval_shape(lambda: forward.init(
      jax.random.PRNGKey(0), np.zeros((1, size, size, 3), np.float32), is_training=True))
  rng = np.random.default_rng(0)
  params = {}
  for module, leaves in shapes.items():
    params[module] = {}
    for name, leaf in leaves.items():
      fan_in = int(np.prod(leaf.shape[:-1])) or 1
      value = (1.0 + 0.1 * rng.standard_normal(leaf.shape) if name == "gain"
               else rng.standard_normal(leaf.shape) / np.sqrt(fan_in))
      params[module][name] = value.astype(np.float32)
  weights.save_params(path, params, model=ModelSpec("NFNet", 1000, {"variant": variant},
                                                    eval_image_size=size))
  return size


def _measure(argv: list[str], env: dict[str, str]) -> dict:
  from tests.command_helpers import run  # pylint: disable=g-import-not-at-top
  result = run(argv, env=env, timeout=1800)
  if result.returncode != 0:
    raise RuntimeError(f"{' '.join(argv)} failed ({result.returncode}):\n{result.stderr[-3000:]}")
  return {"seconds": round(result.seconds, 3), "peak_rss_mb": round(result.peak_rss_mb, 1)}


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--variant", default="F0", help="NFNet variant (timm: dm_nfnet_<variant>)")
  parser.add_argument("--repeats", type=int, default=3, help="alternated rounds; best is kept")
  parser.add_argument("--out", default=None, help="JSON path (default: bench/results/...)")
  parser.add_argument("--skip-timm", action="store_true", help="time ours only")
  args = parser.parse_args(argv)

  from tests.photos import photo_path  # pylint: disable=g-import-not-at-top
  image = photo_path("grace_hopper")
  work = tempfile.mkdtemp(prefix="nfnets_predict_latency_")
  weights_path = os.path.join(work, f"{args.variant}.npz")
  size = write_random_weights(args.variant, weights_path)
  timm_name = f"dm_nfnet_{args.variant.lower()}"
  base_env = {k: v for k, v in os.environ.items()
              if k not in ("XLA_FLAGS", "NFNETS_COMPILATION_CACHE", "JAX_COMPILATION_CACHE_DIR")}
  ours = ["-m", "nfnets.predict", f"--weights={weights_path}", image]
  timm = ["-c", TIMM_SCRIPT.format(name=timm_name), image]

  load_before = os.getloadavg()
  print(f"load average before: {load_before[0]:.2f} {load_before[1]:.2f} {load_before[2]:.2f} "
        f"({os.cpu_count()} CPUs)", flush=True)
  runs: dict[str, list[dict]] = {"ours_cold": [], "ours_warm": [], "timm": []}
  start = time.time()
  for r in range(args.repeats):
    cache = os.path.join(work, f"cache_{r}")  # Empty: this round's cold call compiles.
    env = dict(base_env, NFNETS_COMPILATION_CACHE=cache)
    order = ["ours_cold", "ours_warm", "timm"] if r % 2 == 0 else ["timm", "ours_cold",
                                                                     "ours_warm"]
    for kind in order:
      if kind == "timm" and args.skip_timm:
        continue
      runs[kind].append(_measure(timm if kind == "timm" else ours, env))
      print(f"round {r + 1}: {kind:9s} {runs[kind][-1]['seconds']:7.2f} s "
            f"{runs[kind][-1]['peak_rss_mb']:7.0f} MB", flush=True)
  load_after = os.getloadavg()

  best = {kind: min(rs, key=lambda m: m["seconds"]) for kind, rs in runs.items() if rs}
  peak = {kind: min(m["peak_rss_mb"] for m in rs) for kind, rs in runs.items() if rs}
  print(f"\n{args.variant} at {size} px, one image, best of {args.repeats} "
        f"(load average after: {load_after[0]:.2f} {load_after[1]:.2f} {load_after[2]:.2f})")
  for kind in best:
    print(f"  {kind:9s} {best[kind]['seconds']:7.2f} s   peak {peak[kind]:6.0f} MB")
  ratios = {}
  if "timm" in best:
    ratios = {"warm_over_timm_seconds": best["ours_warm"]["seconds"] / best["timm"]["seconds"],
              "cold_over_timm_seconds": best["ours_cold"]["seconds"] / best["timm"]["seconds"],
              "warm_over_timm_peak_rss": peak["ours_warm"] / peak["timm"],
              "cold_over_timm_peak_rss": peak["ours_cold"] / peak["timm"]}
    print("  " + ", ".join(f"{k} {v:.2f}" for k, v in ratios.items()))

  from importlib import metadata  # pylint: disable=g-import-not-at-top
  versions = {"python": platform.python_version()}
  for package in ("jax", "jaxlib", "dm-haiku", "numpy", "pillow", "torch", "timm"):
    try:
      versions[package] = metadata.version(package)
    except metadata.PackageNotFoundError:
      versions[package] = None
  record = {
      "variant": args.variant, "image_size": size, "image": os.path.basename(image),
      "repeats": args.repeats, "runs": runs, "best_seconds": {k: v["seconds"]
                                                             for k, v in best.items()},
      "best_peak_rss_mb": peak, "ratios": ratios,
      "load_avg_before": load_before, "load_avg_after": load_after,
      "seconds": round(time.time() - start, 1),
      "machine": {"platform": platform.platform(), "processor": platform.machine(),
                  "cpus": os.cpu_count()},
      "versions": versions,
      "date": datetime.datetime.now().isoformat(timespec="seconds"),
  }
  out = args.out or os.path.join(
      REPO, "bench", "results",
      f"{datetime.datetime.now():%Y-%m-%dT%H%M%S}_predict_latency_{args.variant}.json")
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  with open(out, "w") as f:
    json.dump(record, f, indent=1)
  print(f"wrote {out}")


if __name__ == "__main__":
  main()
