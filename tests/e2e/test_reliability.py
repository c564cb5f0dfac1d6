"""Crash-proof training, proven end to end: kills, signals, NaNs, double launches, bad input.

Every training run here is `experiment.py` in a subprocess (2 forced CPU devices, a tiny NFNet
at 16 px, a checkpoint every step) on the same recipe with every source of randomness on (see
conftest.py), so one compiled train step from the shared compilation cache serves them all.
Bad-input checks call the library in-process or fail before anything is compiled.
"""

import os
import pickle
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from tests.e2e import e2e_helpers as rh  # pylint: disable=g-import-not-at-top

REPO = rh.REPO

from configs import fake_data  # pylint: disable=g-import-not-at-top
from nfnets.train import checkpoints  # pylint: disable=g-import-not-at-top
from nfnets.train import loop  # pylint: disable=g-import-not-at-top
from nfnets.train import reporting  # pylint: disable=g-import-not-at-top
from nfnets.train import workdir as workdir_lib  # pylint: disable=g-import-not-at-top
from nfnets.train.options import ExperimentOptions  # pylint: disable=g-import-not-at-top

STEPS = rh.STEPS


def _run(cmd, env, timeout=900):
  return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def _assert_quiet(output: str) -> None:
  """No library noise on the console: no tracebacks, no asyncio or TF warnings."""
  for noise in ("Traceback", "Event loop is closed", "FAILED_PRECONDITION"):
    assert noise not in output, output[-3000:]


# ------------------------------------------------------------------------ kills and signals
@pytest.mark.slow
def test_kills_signals_and_a_double_launch_leave_the_run_bit_identical(reference, e2e_env,
                                                                       tiny_folder, tmp_path):
  """A SIGKILL mid-save, then a SIGTERM at a random moment, each restarted with the same
  command; and a second launch on the same workdir while one runs, refused at once.

  Each interruption is a restart (~15 s of CI). A SIGKILL at a random moment is the gs://
  test's (test_cloud_workdir.py), of one host of a pod the pod test's, and
  bench/kill_resume.py runs long chains of them. SIGINT takes SIGTERM's handler (signals.py);
  it is sent during start-up below.
  """
  seed = int(os.environ.get("NFNETS_KILL_SEED") or time.time())
  print(f"kill chain seed {seed} (replay with NFNETS_KILL_SEED={seed})")
  rng = random.Random(seed)
  plan = [signal.SIGKILL, signal.SIGTERM]
  workdir = tmp_path / "chain"
  cmd = rh.train_cmd(workdir, folder=tiny_folder)
  second = {}

  def launch_again(pid):
    # The running process is paused (it keeps its lock) while the second one starts and is
    # refused: otherwise it trains on through the second's start-up, and the chain can run
    # out of steps before its kills (seen under xdist: steps 2 -> 11 during the refusal).
    os.kill(pid, signal.SIGSTOP)
    try:
      started = time.time()
      proc = _run(cmd, e2e_env, timeout=120)
      second.update(pid=pid, proc=proc, seconds=time.time() - started)
    finally:
      os.kill(pid, signal.SIGCONT)

  log = []
  for i, sig in enumerate(plan):
    result = rh.interrupt(cmd, e2e_env, workdir, sig, rng, during_save=i == 0,
                          pace=reference[2], while_running=launch_again if i == 1 else None)
    log.append((sig.name, result.step_before, result.kill_note))
    context = f"seed {seed}, interruptions so far {log}:\n{result.output[-3000:]}"
    if result.finished or (sig != signal.SIGKILL and "Stopped by" not in result.output
                           and rh.last_train_step(workdir) == STEPS):
      break  # It outran the plan (the signal came after the last step).
    # orbax renames a checkpoint into place only when complete: no restart may ever
    # find a broken newest checkpoint.
    assert "is unreadable" not in result.output, context
    if result.resume_from:
      assert f"Resumed from step {result.resume_from}" in result.output, context
    if sig == signal.SIGKILL:
      assert result.returncode == -signal.SIGKILL, context
    else:  # Graceful: checkpoint at the step reached, exit status 0.
      assert result.returncode == 0, context
      stopped = rh.last_train_step(workdir)
      assert f"Stopped by {sig.name} at step {stopped}; checkpoint saved" in result.output, context
      assert str(stopped) in os.listdir(workdir / "checkpoints"), context
  assert [name for name, _, _ in log] == [sig.name for sig in plan], log
  # The double launch (during the second run of the chain): refused at once with one line
  # naming the running process, before reading data or compiling.
  refused = second["proc"]
  assert refused.returncode == 1, refused.stdout + refused.stderr
  line = refused.stderr.strip().splitlines()[-1]
  assert line.startswith(f"error: WorkdirError: Workdir {workdir} is in use by process "
                         f"{second['pid']} on host"), line
  assert "wait for that run to finish" in line and refused.stdout == ""
  assert second["seconds"] < 60, second["seconds"]
  proc = _run(cmd, e2e_env)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  assert "is unreadable" not in proc.stdout
  _assert_quiet(proc.stdout + proc.stderr)
  # One line per step in the log: nothing of the refused run reached it.
  steps = [r["step"] for r in rh.records(workdir, "train")]
  assert steps[-1] == STEPS and sorted(set(steps)) == list(range(1, STEPS + 1))
  final = rh.read_checkpoint(workdir, STEPS)
  # Params, optimizer state, EMA copies, step and rng: every bit, although every step drew
  # crops, flips, MixUp ratios, CutMix boxes, RandAugment ops, dropout and stochastic-depth
  # masks, in bfloat16.
  rh.assert_bit_identical(final, reference[1], context=f"seed {seed}, {log}")


# ------------------------------------------------------------------------------ NaN handling
@pytest.fixture(scope="module")
def nan_cmd():
  # A different compiled step (the poisoning is in the program): both NaN tests share it
  # (the stop-or-skip decision is the loop's, not the program's). Synthetic data without
  # augmentation: what happens after a non-finite step does not depend on the data, and this
  # program compiles in a fraction of the random recipe's time.
  return lambda workdir, *extra: rh.train_cmd(workdir, "--config.train.debug_nan_step=4",
                                              "--config.checkpoint.keep=3", *extra)


@pytest.mark.slow
def test_nonfinite_stops_names_step_and_keeps_good_checkpoint(nan_cmd, e2e_env, tmp_path):
  workdir = tmp_path / "nan"
  proc = _run(nan_cmd(workdir), e2e_env)
  assert proc.returncode == 1, proc.stdout + proc.stderr
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith("error: NonFiniteError: Non-finite loss at step 4"), last
  assert "last good checkpoint: step 3" in last and "skip_nonfinite=True" in last
  assert sorted(int(s) for s in os.listdir(workdir / "checkpoints") if s.isdigit()) == [1, 2, 3]
  good = rh.read_checkpoint(workdir, 3)
  assert all(np.all(np.isfinite(x)) for x in good.values() if x.dtype.kind == "f")

  # Now also damage the newest checkpoint, as a crashed disk would: the restart names it in
  # one line, falls back to step 2 and stops again at the poisoned step 4.
  victim = rh.truncate_checkpoint(workdir, 3)
  proc = _run(nan_cmd(workdir), e2e_env)
  assert proc.returncode == 1, proc.stdout + proc.stderr
  assert f"Checkpoint {victim} is unreadable" in proc.stdout, proc.stdout
  assert "Resumed from step 2" in proc.stdout
  _assert_quiet(proc.stdout + proc.stderr)
  assert os.listdir(workdir / "unreadable_checkpoints")  # Kept for inspection, not deleted.


@pytest.mark.slow
def test_skip_nonfinite_skips_and_counts(nan_cmd, e2e_env, tmp_path):
  workdir = tmp_path / "skip"
  # Keep every checkpoint: steps 3 and 4 are compared below (keep=3 would have dropped them).
  proc = _run(nan_cmd(workdir, "--config.train.skip_nonfinite=True",
                      "--config.checkpoint.keep=100"), e2e_env)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  records = {r["step"]: r for r in rh.records(workdir, "train")}
  assert records[4]["finite"] == 0 and records[4]["skipped"] == 1
  assert [records[s]["skipped_steps"] for s in (1, 2, 3, 4, 5, STEPS)] == [0, 0, 0, 1, 1, 1]
  # The update after the skipped one is the 4th applied: it logs the 4th learning rate.
  assert records[5]["learning_rate"] == pytest.approx(records[4]["learning_rate"], rel=1e-6)
  before, after = rh.read_checkpoint(workdir, 3), rh.read_checkpoint(workdir, 4)
  for path in before:
    if path.startswith(("params/", "opt_state/", "ema_params/")):
      # The poisoned step changed nothing it trains; only the step counter moved on.
      np.testing.assert_array_equal(after[path], before[path], err_msg=path)
  assert int(after["step"]) == 4


# ----------------------------------------------------------------------------- bad input
@pytest.fixture
def in_process(monkeypatch):
  """loop.run without its JAX setup (no cache dir / distributed changes here)."""
  from nfnets.train import distributed  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(distributed, "setup_jax", lambda *args: None)

  def call(config, workdir, mode="train"):
    return loop.run(ExperimentOptions.from_config(config), str(workdir), mode)

  return call


def _tiny_config(**train):
  config = fake_data.get_config()
  config.data.image_size = config.data.eval_image_size = 16
  config.train.batch_size = config.eval.batch_size = 16
  config.tensorboard = False
  for k, v in train.items():
    config.train[k] = v
  return config


def test_unknown_variant_and_unsafe_weights_fail_before_compiling(in_process, tmp_path):
  config = _tiny_config()
  config.model.kwargs = fake_data.common.get_base_config().model.kwargs  # variant by name
  config.model.kwargs.variant = "F99"
  with pytest.raises(ValueError, match=r"Unknown NFNet variant 'F99'; use one of .*'F0'"):
    in_process(config, tmp_path / "variant")
  assert not (tmp_path / "variant").exists()  # Refused before anything was made.

  # A "weights file" whose unpickling would run a shell command: refused, never run.
  marker = tmp_path / "pwned"

  class _Payload:
    def __reduce__(self):
      return (os.system, (f"touch {marker}",))

  evil = tmp_path / "F0_haiku.npz"
  with open(evil, "wb") as f:
    pickle.dump({"NFNet/~/stem": {"w": _Payload()}}, f)
  config = _tiny_config()
  config.init.weights = str(evil)
  from nfnets import weights  # pylint: disable=g-import-not-at-top
  with pytest.raises(weights.UnsafeWeightsError, match="refused"):
    in_process(config, tmp_path / "evil")
  assert not marker.exists()
  # Not a pickle at all (e.g. an HTML error page saved under the weights' name).
  fake = tmp_path / "F1_haiku.npz"
  fake.write_text("<html>404 Not Found</html>")
  config.init.weights = str(fake)
  with pytest.raises(ValueError, match=str(fake).replace(".", r"\.")):
    in_process(config, tmp_path / "fake")


@pytest.mark.slow  # Reads the end-to-end reference run (built once: ~1 min).
def test_workdir_of_another_model_is_refused(reference, in_process, tiny_folder):
  workdir = reference[0]
  before = sorted(os.listdir(workdir / "checkpoints")), (workdir / "config.json").read_text()
  config = _tiny_config()
  config.data.name, config.data.folder, config.data.num_classes = "folder", tiny_folder, 3
  config.model.kwargs.variant.width = (16, 32, 64, 96)  # One stage wider.
  with pytest.raises(checkpoints.SignatureMismatchError,
                     match=r"holds checkpoints of a different model .*fresh --workdir"):
    in_process(config, workdir)
  # Refused means untouched: no new checkpoint, config.json of the original run kept.
  after = sorted(os.listdir(workdir / "checkpoints")), (workdir / "config.json").read_text()
  assert after == before


def test_missing_or_undecodable_data_says_what_to_do(in_process, tmp_path):
  config = _tiny_config()
  config.data.name = "imagenet2012"
  config.data.num_classes = 1000
  empty = tmp_path / "tfds"
  empty.mkdir()
  config.data.data_dir = str(empty)
  with pytest.raises(ValueError, match=str(empty)):
    in_process(config, tmp_path / "imagenet")
  # A refused run leaves nothing a rerun would mind: the (released) lock file and, when a
  # library logged while looking for the data (TFDS does), log.txt with its lines.
  left = set(os.listdir(tmp_path / "imagenet"))
  assert workdir_lib.LOCK_FILE in left and left <= {workdir_lib.LOCK_FILE, reporting.LOG_FILE}

  # A folder data set whose only images cannot be decoded.
  root = tmp_path / "images"
  for cls in ("cat", "dog"):
    (root / cls).mkdir(parents=True)
    (root / cls / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
  config = _tiny_config()
  config.data.name = "folder"
  config.data.folder = str(root)
  config.data.num_classes = 2
  with pytest.raises(ValueError, match="Class 'cat' in .* has no readable image"):
    in_process(config, tmp_path / "folder")


def test_bad_workdirs_and_weights_are_one_line_errors(in_process, tmp_path):
  a_file = tmp_path / "a_file"
  a_file.write_text("x")
  with pytest.raises(workdir_lib.WorkdirError, match="is a file, not a directory"):
    in_process(_tiny_config(), a_file)
  # NaN weights: refused by name before training or evaluating on them.
  import jax  # pylint: disable=g-import-not-at-top
  from nfnets import weights  # pylint: disable=g-import-not-at-top
  from nfnets.models import registry  # pylint: disable=g-import-not-at-top
  forward = registry.make_forward("NFNet", 10, **fake_data.get_config().model.kwargs)
  shapes, _ = jax.eval_shape(lambda: forward.init(jax.random.PRNGKey(0),
                                                  np.zeros((1, 16, 16, 3)), is_training=True))
  params = {m: {n: np.full(s.shape, 0.1, np.float32) for n, s in leaves.items()}
            for m, leaves in shapes.items()}
  params["NFNet/~/linear"]["w"][0, 0] = np.nan
  weights.save_params(tmp_path / "nan.npz", params)
  config = _tiny_config()
  config.init.weights = str(tmp_path / "nan.npz")
  with pytest.raises(ValueError, match=r"NFNet/~/linear/w holds NaN or Inf"):
    in_process(config, tmp_path / "nan_weights", mode="eval")
  # int32 weights would be cast silently: refused by name.
  params["NFNet/~/linear"]["w"] = np.ones_like(params["NFNet/~/linear"]["w"], np.int32)
  # save_params refuses to write it: craft the file as another tool would.
  np.savez(tmp_path / "int.npz", **{f"{m}::{n}": v for m, leaves in params.items()
                                     for n, v in leaves.items()})
  config.init.weights = str(tmp_path / "int.npz")
  with pytest.raises(ValueError, match=r"int.npz: NFNet/~/linear::w has dtype int32"):
    in_process(config, tmp_path / "int_weights", mode="eval")


@pytest.mark.parametrize("args,expect", [
    (["--config=configs/no_such.py"], "no such file 'configs/no_such.py'"),
    (["--config=configs/fake_data.py:F9"], "Unknown NFNet variant 'F9'"),
    (["--config=configs/demo.py:F0"], "get_config() takes 0 positional arguments"),
    (["--config=configs/fake_data.py", "--config.train.batchsize=8"], "batchsize"),
])
def test_command_line_mistakes_are_one_line(e2e_env, tmp_path, args, expect):
  proc = _run([sys.executable, "experiment.py", f"--workdir={tmp_path / 'w'}", *args],
              e2e_env, timeout=120)
  assert proc.returncode == 2, proc.stdout + proc.stderr
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: ") and expect in lines[0], lines
  assert not (tmp_path / "w").exists()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=lambda s: s.name)
def test_a_signal_in_the_first_second_exits_cleanly(e2e_env, tmp_path, sig):
  workdir = tmp_path / "early"
  proc = subprocess.Popen(rh.train_cmd(workdir), cwd=REPO, env=e2e_env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
  time.sleep(0.5)  # Still importing: Python's default handlers would end it (143, or 130).
  proc.send_signal(sig)
  out, _ = proc.communicate(timeout=300)
  assert proc.returncode == 0, out
  assert f"Stopped by {sig.name} during start-up" in out, out


# The two runs below, long enough to be read while they train: one compiled program.
LONG = 24


def _long_run(workdir):
  return rh.train_cmd(workdir, f"--config.train.num_steps={LONG}")


@pytest.mark.slow
def test_reading_a_run_while_it_trains_changes_nothing(e2e_env, tmp_path):
  # predict (and any reader) opens the checkpoints read-only: it never cleans up another
  # process's in-flight save, takes no lock, and the training run finishes untouched.
  from tests.photos import photo_path  # pylint: disable=g-import-not-at-top
  workdir = tmp_path / "run"
  cmd = _long_run(workdir)
  with open(tmp_path / "train.log", "w") as log:
    proc = subprocess.Popen(cmd, cwd=REPO, env=e2e_env, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.time() + 600
    while rh.latest_checkpoint(workdir) < 2 and proc.poll() is None and time.time() < deadline:
      time.sleep(0.05)
    reads = []
    while proc.poll() is None and len(reads) < 3:
      read = _run([sys.executable, "-m", "nfnets.predict", f"--weights={workdir}",
                   photo_path("china")], e2e_env, timeout=300)
      reads.append(read)
    proc.wait(timeout=600)
  output = (tmp_path / "train.log").read_text()
  assert proc.returncode == 0, output[-3000:]
  assert reads and all(r.returncode == 0 for r in reads), [r.stderr for r in reads]
  assert "is unreadable" not in output
  assert rh.latest_checkpoint(workdir) == LONG and rh.last_train_step(workdir) == LONG


@pytest.mark.slow
def test_a_full_disk_is_one_line_and_the_run_resumes_when_space_is_freed(e2e_env, tmp_path):
  mount = tmp_path / "small"
  mount.mkdir()
  if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mount)],
                    capture_output=True).returncode:
    pytest.skip("needs a tmpfs mount (root) to make a small disk")
  try:
    workdir = mount / "run"
    # The compilation cache on the small disk too, as by default (in the workdir), seeded
    # with the program the test above compiled.
    env = rh.seeded_cache_env(e2e_env, mount / "cache")
    cmd = _long_run(workdir)
    with open(tmp_path / "log", "w") as log:
      proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
      deadline = time.time() + 600
      while (rh.latest_checkpoint(workdir) < 2 and proc.poll() is None
             and time.time() < deadline):
        time.sleep(0.05)
      # The disk fills up: the next checkpoint cannot be written.
      with open(mount / "filler", "wb") as f:
        try:
          while True:
            f.write(b"\0" * (1 << 20))
            f.flush()
        except OSError:
          pass
      proc.wait(timeout=600)
    output = (tmp_path / "log").read_text()
    assert proc.returncode == 1, output[-3000:]
    last = output.strip().splitlines()[-1]
    assert last.startswith(f"error: no space left on the device holding {workdir}"), last
    assert "then rerun: the last checkpoint is kept" in last
    _assert_quiet(output)
    assert "Logging error" not in output and len(output.splitlines()) < 30, output[-3000:]
    # Nothing partial left behind: no empty compile-cache entries, and the newest checkpoint
    # is readable.
    cache = mount / "cache"
    assert not [n for n in os.listdir(cache) if os.path.getsize(cache / n) == 0]
    newest = rh.latest_checkpoint(workdir)
    assert newest >= 2 and rh.read_checkpoint(workdir, newest)
    os.remove(mount / "filler")
    proc = _run(cmd, env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"Resumed from step {newest}" in proc.stdout
    assert rh.latest_checkpoint(workdir) == LONG
  finally:
    if subprocess.run(["umount", str(mount)], capture_output=True).returncode:
      subprocess.run(["umount", "-l", str(mount)], capture_output=True)  # Still busy: detach.
