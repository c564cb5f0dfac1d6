"""Helpers for end-to-end runs of experiment.py in subprocesses (reliability tests, bench).

Not a test module. All runs built by `train_cmd` share one config, so they share one
compiled train step through the persistent compilation cache set up by `subprocess_env`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import random
import shutil
import subprocess
import sys
import time
from typing import Optional, Union

import numpy as np

from tests.command_helpers import FAST_XLA_FLAGS

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STEPS = 16
# A tiny NFNet (fake_data's widths 16/32/64/64) at 16 px, 8 examples per device on 2
# devices, a checkpoint every step, 2 kept, on synthetic data.
TINY = ["--config.data.image_size=16", "--config.data.eval_image_size=16",
        "--config.train.batch_size=16", "--config.eval.batch_size=16",
        "--config.data.fake_num_eval=32", "--config.train.log_every_steps=1",
        "--config.optimizer.lr=2.0", "--config.tensorboard=False",
        f"--config.train.num_steps={STEPS}", "--config.checkpoint.every_steps=1",
        "--config.checkpoint.every_seconds=0", "--config.checkpoint.keep=2"]


def random_recipe(folder: str) -> list[str]:
  """TINY with every source of randomness of the paper's recipe switched on.

  Real photographs through the real tf.data pipeline (inception crop + flip), MixUp + CutMix
  per example ('paper': two decoded inputs each), RandAugment (2 layers, magnitude 5) on the
  device, dropout 0.2, stochastic depth 0.2 and bfloat16 compute.
  """
  return TINY + [
      "--config.data.name=folder", f"--config.data.folder={folder}",
      "--config.data.num_classes=3", "--config.data.train_preproc=inception_crop",
      "--config.data.eval_preproc=resize_crop_32", "--config.data.randaugment=205",
      "--config.data.mixup_alpha=0.2", "--config.data.cutmix=True",
      "--config.data.mix_group_size=4",
      "--config.model.kwargs.drop_rate=0.2", "--config.model.kwargs.stochdepth_rate=0.2",
      "--config.train.bfloat16=True", "--config.eval.batch_size=12"]


def shared_cache_dir(tmp_path_factory) -> str:
  """The run's one compilation cache (tests/conftest.py), shared with the child processes."""
  # Under pytest, tests/conftest.py's cache; elsewhere (bench/kill_resume.py) one of its own.
  return (os.environ.get("NFNETS_TEST_JAX_CACHE") or
          str(tmp_path_factory.getbasetemp() / "jax_cache"))


def subprocess_env(tmp_path_factory, devices: int) -> dict:
  """Environment of a child experiment.py: `devices` CPU devices, the shared cache."""
  env = dict(os.environ)
  env["XLA_FLAGS"] = " ".join((f"--xla_force_host_platform_device_count={devices}",)
                              + FAST_XLA_FLAGS)
  env["NFNETS_COMPILATION_CACHE"] = shared_cache_dir(tmp_path_factory)
  env["CUDA_VISIBLE_DEVICES"] = ""
  env["JAX_PLATFORMS"] = "cpu"
  env["PYTHONUNBUFFERED"] = "1"
  env["TF_CPP_MIN_LOG_LEVEL"] = "2"
  return env


def seeded_cache_env(env: dict, cache) -> dict:
  """`env` with a compilation cache of its own at `cache`, holding the suite's programs.

  Only entries written over a second ago are copied: JAX writes an entry in place.
  """
  source = env["NFNETS_COMPILATION_CACHE"]
  os.makedirs(cache, exist_ok=True)
  os.chmod(cache, 0o777)  # Also for a command run as another user.
  for name in os.listdir(source):
    path = os.path.join(source, name)
    if os.path.isfile(path) and time.time() - os.path.getmtime(path) > 1:
      shutil.copy2(path, cache)
  return dict(env, NFNETS_COMPILATION_CACHE=str(cache))


def train_cmd(workdir, *extra: str, folder: Optional[str] = None) -> list[str]:
  """experiment.py on TINY (synthetic data), or on `random_recipe(folder)` when given."""
  recipe = random_recipe(folder) if folder else TINY
  return [sys.executable, "experiment.py", "--config=configs/fake_data.py",
          f"--workdir={workdir}", "--mode=train", *recipe, *extra]


def records(workdir, split: str) -> list[dict]:
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  with open(path) as f:
    lines = f.read().splitlines()
  out = []
  for line in lines:
    try:
      out.append(json.loads(line))
    except json.JSONDecodeError:  # A line cut short by SIGKILL.
      continue
  return [r for r in out if r.get("split") == split]


def last_train_step(workdir) -> int:
  return max((r["step"] for r in records(workdir, "train")), default=0)


def latest_checkpoint(workdir) -> int:
  """Newest finished checkpoint step on disk (orbax's temporary directories excluded)."""
  root = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(root):
    return 0
  return max((int(n) for n in os.listdir(root) if n.isdigit()), default=0)


def read_checkpoint(workdir, step: int) -> dict[str, np.ndarray]:
  """All leaves of checkpoint `step` as numpy arrays, keyed by leaf path ('params/...')."""
  import jax  # pylint: disable=g-import-not-at-top
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  from nfnets.train import integrity  # pylint: disable=g-import-not-at-top
  # orbax warns on restores without a target: noise here.
  logging.getLogger("absl").setLevel(logging.ERROR)
  path = os.path.join(workdir, "checkpoints", str(step), "state")
  checkpointer = ocp.PyTreeCheckpointer()
  tree = checkpointer.metadata(path).item_metadata.tree
  args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
  out = checkpointer.restore(path, restore_args=args)
  return {k: np.asarray(v) for k, v in integrity.leaves_by_path(out).items()}


def assert_bit_identical(got: dict, want: dict, context: str = "") -> None:
  assert sorted(got) == sorted(want), context
  for k in want:
    assert got[k].dtype == want[k].dtype and got[k].shape == want[k].shape, (k, context)
    # Bytes, not values: NaN payloads and -0.0 count too.
    assert got[k].tobytes() == want[k].tobytes(), f"leaf {k} differs; {context}"


def truncate_checkpoint(workdir, step: int) -> str:
  """Empties the array files of checkpoint `step` (a crashed disk); returns its path."""
  path = os.path.join(os.path.abspath(workdir), "checkpoints", str(step))
  count = 0
  for root, _, files in os.walk(os.path.join(path, "state")):
    for name in files:
      if "metadata" not in name:
        with open(os.path.join(root, name), "r+b") as f:
          f.truncate(0)
        count += 1
  assert count, f"no array files under {path}"
  return path


@dataclasses.dataclass
class Interrupted:
  returncode: Optional[int]
  output: str
  step_before: int  # Last step logged before this process started.
  resume_from: int  # Newest checkpoint before this process started (0: none).
  finished: bool  # The run completed before it could be interrupted.
  kill_note: str


def _saving(workdir) -> bool:
  """Whether orbax is writing a checkpoint (its temporary directory exists)."""
  root = os.path.join(workdir, "checkpoints")
  return os.path.isdir(root) and any("tmp" in n for n in os.listdir(root))


def step_seconds(workdir) -> float:
  """Median seconds per step of a finished run (from its metrics.jsonl timestamps)."""
  times = [r["time"] for r in records(workdir, "train")]
  return float(np.median(np.diff(times[1:]))) if len(times) > 2 else 1.0


def interrupt(cmd: list[str], env: dict, workdir, sig: int, rng: random.Random,
              during_save: bool = False, pace: float = 1.0,
              timeout: float = 600, while_running=None, progress=None,
              poll_seconds: float = 0.02) -> Interrupted:
  """Starts a run and sends `sig` at a random moment after it has trained a new step.

  Args:
    cmd: the experiment.py command.
    env: its environment.
    workdir: its workdir (metrics.jsonl is polled for progress).
    sig: signal to send.
    rng: chooses the delay after the first new step (0 to 1.5 step times), so the signal
      lands anywhere in the step/log/save cycle.
    during_save: instead, send it the moment a checkpoint write is seen in progress.
    pace: seconds per step (see `step_seconds`).
    timeout: seconds to wait for progress.
    while_running: optional callable(pid), called once the run has trained a new step and
      before the signal is sent (e.g. to start a second run on the same workdir).
    progress: optional callable() -> the last trained step (default: read metrics.jsonl of
      a local `workdir`).
    poll_seconds: pause between progress checks (longer for a `progress` that is a request).
  """
  last_step = progress or (lambda: last_train_step(workdir))
  before = last_step()
  resume_from = latest_checkpoint(workdir)
  log_path = os.path.join(str(workdir) + ".log")
  with open(log_path, "a+") as log:
    start = log.tell()
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    note = ""
    try:
      deadline = time.time() + timeout
      progressed_at = None
      while time.time() < deadline and proc.poll() is None:
        now_step = last_step()
        if progressed_at is None and now_step > before:
          if while_running is not None:
            while_running(proc.pid)
          progressed_at = time.time()
          first_step = now_step
          delay = rng.uniform(0.0, 1.5)
        if during_save and progressed_at is not None and _saving(workdir):
          note = f"during save after step {last_step()}"
          break
        if progressed_at is not None and not during_save:
          if time.time() - progressed_at >= delay * pace:
            note = f"{delay:.2f} step-times after step {first_step} (now {now_step})"
            break
        time.sleep(0.005 if during_save else poll_seconds)
      finished = proc.poll() is not None
      if not finished:
        proc.send_signal(sig)
      proc.wait(timeout=timeout)
    finally:
      if proc.poll() is None:
        proc.kill()
        proc.wait()
    log.seek(start)
    output = log.read()
  return Interrupted(proc.returncode, output, before, resume_from,
                     finished and proc.returncode == 0, note)


def free_port() -> int:
  import socket  # pylint: disable=g-import-not-at-top
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@dataclasses.dataclass
class Job:
  """The processes of one multi-process run of experiment.py, with their logs."""
  procs: list
  logs: list
  started: float

  def wait(self, timeout: float) -> list[Optional[int]]:
    """Exit codes (None for a process still running at the deadline, then killed)."""
    deadline = time.time() + timeout
    for p in self.procs:
      try:
        p.wait(timeout=max(deadline - time.time(), 0.1))
      except subprocess.TimeoutExpired:
        pass
    codes = [p.poll() for p in self.procs]
    for p in self.procs:
      if p.poll() is None:
        p.kill()
        p.wait()
    return codes

  def output(self, index: int) -> str:
    with open(self.logs[index]) as f:
      return f.read()


def launch(cmd: Union[list[str], list[list[str]]], tmp_path_factory, processes: int,
           devices: int, log_dir, env_extra: Optional[dict] = None) -> Job:
  """Starts the processes of one jax.distributed job on this machine (gloo).

  `cmd` is every process's command, or a list of one command per process (e.g. each with a
  workdir of its own, to see which process writes).
  """
  cmds = cmd if isinstance(cmd[0], list) else [cmd] * processes
  assert len(cmds) == processes, (len(cmds), processes)
  port = free_port()
  procs, logs = [], []
  os.makedirs(log_dir, exist_ok=True)
  for index, argv in enumerate(cmds):
    env = subprocess_env(tmp_path_factory, devices)
    if processes > 1:
      env.update(NFNETS_DISTRIBUTED="1", JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
                 NFNETS_NUM_PROCESSES=str(processes), NFNETS_PROCESS_ID=str(index))
    env.update(env_extra or {})
    path = os.path.join(log_dir, f"process_{index}.log")
    with open(path, "w") as log:
      procs.append(subprocess.Popen(argv, cwd=REPO, env=env, stdout=log,
                                    stderr=subprocess.STDOUT))
    logs.append(path)
  return Job(procs, logs, time.time())


def example_log(workdir) -> dict[int, list[int]]:
  """{step: the data set indices of its global batch} from train.record_examples' files."""
  folder = os.path.join(workdir, "examples")
  rows: dict[int, list] = {}
  for name in sorted(os.listdir(folder)):
    with open(os.path.join(folder, name)) as f:
      for line in f:
        try:
          r = json.loads(line)
        except json.JSONDecodeError:
          continue
        rows.setdefault(r["step"], {})[tuple(r["rows"])] = r["examples"]
  return {step: [i for _, ids in sorted(parts.items()) for i in ids]
          for step, parts in rows.items()}
