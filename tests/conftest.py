"""Test-wide setup: eight virtual CPU devices, so sharding logic is exercised on CI.

XLA reads the flag once, when the backend starts, so it must be set before any test
module imports JAX. TensorFlow (used by the input pipeline) is kept off any GPU.
"""

import os

import pytest

from tests.command_helpers import FAST_XLA_FLAGS  # pylint: disable=g-import-not-at-top
from tests.photos import write_tiny_folder  # pylint: disable=g-import-not-at-top
from tests.shared_dirs import build_once  # pylint: disable=g-import-not-at-top

_FLAGS = ("--xla_force_host_platform_device_count=8",) + FAST_XLA_FLAGS
for _flag in _FLAGS:
  if _flag.split("=")[0] not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _flag).strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# JAX puts the path of a GPU autotuning cache inside the compilation cache into every program's
# cache key (on CPU too), so a copied cache would miss everywhere; without it (CPU has nothing
# to autotune), a test can seed a cache of its own with the suite's programs.
os.environ.setdefault("JAX_PERSISTENT_CACHE_ENABLE_XLA_CACHES", "none")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

# Non-partitionable threefry compiles its random-bit kernels 2-4x faster on XLA:CPU
# (measured: a tiny NFNet's init 39 s vs 93 s on the loaded 2-core CI machine); the tests
# only need *some* fixed random stream, and pmap does not rely on partitionable keys.
import jax  # pylint: disable=g-import-not-at-top,wrong-import-position

jax.config.update("jax_threefry_partitionable", False)

# One persistent compilation cache for the whole run (all xdist workers and the experiment.py
# subprocesses of the end-to-end tests): a program compiled by one test module is loaded, not
# recompiled, by any other that builds the same one (e.g. the legacy-checkpoint resume and the
# loop test share a train step).
import tempfile  # pylint: disable=g-import-not-at-top,wrong-import-position

CACHE_DIR = os.environ.get("NFNETS_TEST_JAX_CACHE") or os.path.join(
    tempfile.gettempdir(), f"nfnets_test_jax_cache_{os.environ.get('PYTEST_XDIST_TESTRUNUID', os.getpid())}")
os.makedirs(CACHE_DIR, exist_ok=True)
# Child processes (tests/e2e) find it here: importing "conftest" by name is ambiguous, since
# pytest loads every conftest.py of the tree under that one module name.
os.environ["NFNETS_TEST_JAX_CACHE"] = CACHE_DIR
jax.config.update("jax_compilation_cache_dir", CACHE_DIR)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


_TIMM_MODULE = "test_timm_crosscheck.py"


def pytest_ignore_collect(collection_path, config):
  """Collects the timm cross-check only when it is named on the command line.

  torch's bundled triton and TensorFlow segfault when both are loaded into one process
  (seen with torch 2.14.1 + tensorflow-cpu 2.21), and importing the module imports torch.
  `bash run.sh test` therefore runs it in a second pytest process of its own.
  """
  if collection_path.name != _TIMM_MODULE:
    return None
  named = any(_TIMM_MODULE in str(arg) for arg in config.args)
  return None if named else True


# The longest modules first (the end-to-end ones are minutes of subprocesses each on the
# 2-core CI machine). With `--dist=loadscope --no-loadscope-reorder` (pytest.ini) each xdist worker
# takes the next module when it is nearly done with one, so the run ends soon after its last
# long module only if those start first.
_LONGEST_FIRST = ("test_reliability.py", "test_pod.py", "test_finetune.py",
                  "test_cloud_workdir.py", "test_experiment.py",
                  "test_benchmark.py", "test_loop.py", "test_scan.py")


def pytest_collection_modifyitems(config, items):
  """Runs the modules of _LONGEST_FIRST first, in that order, then the rest as collected."""
  del config

  def rank(item):
    name = item.path.name
    return _LONGEST_FIRST.index(name) if name in _LONGEST_FIRST else len(_LONGEST_FIRST)

  items.sort(key=rank)  # Stable: collection order within a module.


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory):
  """A folder data set of 3 x (8 train + 4 test) crops of real photographs (tests/photos.py),
  one for all workers (the end-to-end reference runs read it by path)."""
  return str(build_once(tmp_path_factory, "tiny_folder", lambda d: write_tiny_folder(str(d))))


@pytest.fixture(scope="session")
def tiny_imagenet(tmp_path_factory):
  """(manual_dir, data_dir): a 3-class ImageNet (12 train, 6 validation JPEGs) in the official
  tar layout, prepared into TFDS by the real `prepare_imagenet` path, once per session."""
  from nfnets.data import prepare_imagenet  # pylint: disable=g-import-not-at-top  (TensorFlow)
  base = tmp_path_factory.getbasetemp() / "tiny_imagenet"
  manual_dir, data_dir = str(base / "tars"), str(base / "tfds")
  prepare_imagenet.write_fake_imagenet_tars(manual_dir, num_synsets=3, per_synset=4, num_val=6)
  prepare_imagenet.prepare_imagenet(manual_dir, data_dir)
  return manual_dir, data_dir
