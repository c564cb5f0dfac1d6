"""What the checkpoint digests cost on an NFNet-F0-sized train state: save and restore.

  python bench/checkpoint_digest.py [--repeats 3] [--dir /tmp/ckpt_bench]

The state has F0's real parameter tree (from `jax.eval_shape`, no compute) three times over --
parameters, SGD momentum and EMA parameters, 71.5 M float32 each, ~858 MB -- filled with random
values (weights do not compress). Timed, best of --repeats, on the same files:

* save: `Checkpointer.save` as the training thread sees it (host copy, NaN check, SHA-256 of
  every array, then orbax's asynchronous write is started) and the whole write until committed
  and sealed (`wait`: orbax commit + the file digests read back from disk);
* the digest parts alone: the array digests (in the training thread) and `seal` (the file
  digests, in a background thread);
* restore: `restore_latest` (orbax read + both verifications), and the verifications alone;
* a reader's partial restore (`read_weights`: the parameters alone, verified).

Prints a table and writes bench/results/checkpoint_digest_<date>.json with the load average.
"""

import argparse
import datetime
import json
import os
import platform
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position

from nfnets.models import registry  # pylint: disable=g-import-not-at-top,wrong-import-position
from nfnets.train import checkpoints  # pylint: disable=g-import-not-at-top,wrong-import-position
from nfnets.train import integrity  # pylint: disable=g-import-not-at-top,wrong-import-position
from nfnets.train.options import CheckpointOptions  # pylint: disable=g-import-not-at-top,wrong-import-position

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def f0_state(seed: int = 0) -> dict:
  """{'params', 'momentum', 'ema_params', 'step'} with F0's parameter shapes, random values
  (the fields of a TrainState the size of F0's, saved under the same leaf paths)."""
  forward = registry.make_forward("NFNet", 1000, variant="F0")
  shapes = jax.eval_shape(lambda: forward.init(jax.random.key(0), jnp.zeros((1, 192, 192, 3)),
                                               is_training=True)[0])
  rng = np.random.default_rng(seed)
  make = lambda: jax.tree.map(lambda s: rng.standard_normal(s.shape, np.float32), shapes)
  return {"params": make(), "momentum": make(), "ema_params": make(),
          "step": np.asarray(1, np.int32)}


def best_of(repeats: int, fn) -> float:
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    best = min(best, time.perf_counter() - start)
  return best


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--dir", default="", help="Scratch directory (default: a new temp dir).")
  args = parser.parse_args()
  root = args.dir or tempfile.mkdtemp(prefix="ckpt_bench_")
  load_before = os.getloadavg()
  state = f0_state()
  leaves = jax.tree_util.tree_leaves(state)
  nbytes = sum(x.nbytes for x in leaves)
  arrays = integrity.leaves_by_path(state)
  options = CheckpointOptions(every_steps=0, every_seconds=0.0, keep=2)

  results = {"save_blocking_s": float("inf"), "save_committed_s": float("inf"),
             "restore_s": float("inf")}
  for r in range(args.repeats):
    directory = os.path.join(root, f"run{r}")
    ckpt = checkpoints.Checkpointer(directory, options)
    start = time.perf_counter()
    ckpt.save(1, state)
    blocking = time.perf_counter() - start
    ckpt.wait()
    committed = time.perf_counter() - start
    ckpt.close()
    results["save_blocking_s"] = min(results["save_blocking_s"], blocking)
    results["save_committed_s"] = min(results["save_committed_s"], committed)
    reader = checkpoints.Checkpointer(directory, options)
    start = time.perf_counter()
    restored, step = reader.restore_latest(state)
    results["restore_s"] = min(results["restore_s"], time.perf_counter() - start)
    reader.close()
    assert step == 1 and not reader.unreadable, reader.unreadable
    del restored
    shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state["params"])
    start = time.perf_counter()
    checkpoints.read_weights(directory, {"params": shapes, "state": {}}, ema=False)
    results["read_weights_s"] = min(results.get("read_weights_s", float("inf")),
                                    time.perf_counter() - start)
  step_dir = os.path.join(root, "run0", "1")
  results["array_digests_s"] = best_of(args.repeats, lambda: integrity.digests(arrays))
  results["file_digests_seal_s"] = best_of(args.repeats, lambda: integrity.seal(step_dir))
  results["verify_files_s"] = best_of(args.repeats, lambda: integrity.verify_files(step_dir))
  load_after = os.getloadavg()
  shutil.rmtree(root, ignore_errors=True)

  share = {
      "array digests / blocking save": results["array_digests_s"] / results["save_blocking_s"],
      "digests / committed save": (results["array_digests_s"] + results["file_digests_seal_s"])
                                  / results["save_committed_s"],
      "verification / restore": (results["verify_files_s"] + results["array_digests_s"])
                                / results["restore_s"],
  }
  print(f"\nF0-sized state: {len(leaves)} arrays, {nbytes / 1e6:.0f} MB; best of {args.repeats}; "
        f"{os.cpu_count()} cores; load avg {load_before[0]:.2f} -> {load_after[0]:.2f}")
  for k, v in results.items():
    print(f"  {k:24s} {v:7.2f} s")
  for k, v in share.items():
    print(f"  {k:34s} {v:6.1%}")
  today = datetime.date.today().isoformat()
  os.makedirs(RESULTS_DIR, exist_ok=True)
  path = os.path.join(RESULTS_DIR, f"checkpoint_digest_{today}.json")
  with open(path, "w") as f:
    json.dump({"date": today, "machine": platform.platform(), "cores": os.cpu_count(),
               "load_avg_before": load_before, "load_avg_after": load_after,
               "arrays": len(leaves), "bytes": nbytes, "repeats": args.repeats,
               "seconds": results, "shares": share}, f, indent=2)
  print(f"Wrote {path}")


if __name__ == "__main__":
  main()
