"""Tests for nfnets.train.loop: one in-process run exercises the loop's promises.

A tiny NFNet on synthetic data, 8 steps on 8 virtual devices, with a periodic evaluation,
checkpoints, interval logging and a profiler window. One compiled train step serves it all.
"""

import json
import os

import chex
import numpy as np
import pytest

from configs import fake_data
from nfnets.train import distributed
from nfnets.train import loop
from nfnets.train import metrics as metrics_lib
from nfnets.train import workdir as workdir_lib
from nfnets.train.options import ExperimentOptions


def _options(**train):
  config = fake_data.get_config()
  config.data.image_size = config.data.eval_image_size = 16
  config.train.batch_size = config.eval.batch_size = 16
  config.train.num_steps = 8
  config.train.log_every_steps = 4
  config.eval.every_steps = 4
  config.checkpoint.every_steps = 3
  config.checkpoint.every_seconds = 0
  config.profile.start_step = 2
  config.profile.num_steps = 2
  config.tensorboard = False
  for k, v in train.items():
    config.train[k] = v
  return ExperimentOptions.from_config(config)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("loop")
  mp = pytest.MonkeyPatch()
  mp.setattr(distributed, "setup_jax", lambda *args: None)
  traced = []
  real = loop.make_augment

  def counted(options):
    # The augmentation runs inside the train step only: one trace of it is one trace (and one
    # compilation) of the step. Eval, checkpoints, logging and profiling must not add any.
    augment = real(options)
    def once(batch, key, device):
      traced.append(1)
      return augment(batch, key, device)
    return chex.assert_max_traces(once, n=1)

  mp.setattr(loop, "make_augment", counted)
  try:
    results = loop.run(_options(), str(workdir), "train_and_eval")
  finally:
    mp.undo()
  return workdir, results, traced


def test_the_train_step_compiles_once_per_run(run):
  _, _, traced = run
  assert len(traced) == 1


def test_metrics_are_interval_means_and_the_workdir_is_complete(run):
  workdir, results, _ = run
  records = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
  train = [r for r in records if r["split"] == "train"]
  assert [r["step"] for r in train] == [4, 8]
  # Means over the 4 steps of each interval, not the last step's values.
  assert all(r["steps_in_interval"] == 4 for r in train)
  assert all(0 < r["learning_rate"] < 0.01 and r["skipped_steps"] == 0 for r in train)
  assert train[0]["core_hours"] < train[1]["core_hours"]
  evals = [r for r in records if r["split"] == "eval"]
  assert [r["step"] for r in evals] == [4, 8] and results["num_examples"] == 256
  assert sorted(int(s) for s in os.listdir(workdir / "checkpoints") if s.isdigit()) == [3, 6, 8]
  assert workdir_lib.saved_options(str(workdir)) == _options()
  info = workdir_lib.saved_dataset_info(str(workdir))
  assert (info.num_train, info.num_classes, info.channels) == (1024, 10, 3)


def test_the_profiler_wrote_a_trace_and_training_went_on(run):
  workdir, _, _ = run
  traces = [os.path.join(r, f) for r, _, fs in os.walk(workdir / "profile") for f in fs]
  assert any(t.endswith((".xplane.pb", ".trace.json.gz")) for t in traces), traces
  assert max(r["step"] for r in map(json.loads, open(workdir / "metrics.jsonl"))) == 8


def test_metric_sums_merge_intervals_and_find_the_first_bad_step():
  one = {"loss": 1.0, "skipped": 0.0, "steps_in_interval": 3.0, "first_bad_step": -1.0}
  two = {"loss": 3.0, "skipped": 1.0, "steps_in_interval": 1.0, "first_bad_step": 7.0}
  merged = metrics_lib.merge_intervals([one, two])
  assert merged == {"loss": 1.5, "skipped": 0.25, "steps_in_interval": 4.0}
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  sums = metrics_lib.MetricSums()
  for step, loss in ((1, 1.0), (2, float("nan")), (3, float("inf"))):
    m = {k: jnp.full((), v, jnp.float32) for k, v in dict(
        loss=loss, grad_norm=1.0, update_norm=1.0, param_norm=1.0, skipped=0.0,
        finite=float(np.isfinite(loss))).items()}
    sums.add(m, step)
  fetched = sums.fetch()
  assert fetched["first_bad_step"] == 2 and np.isnan(fetched["first_bad_loss"])
  assert fetched["steps_in_interval"] == 3 and sums.fetch() is None


@pytest.mark.parametrize("fixture,last", [("legacy_workdir", 6), ("format2_workdir", 6)])
def test_workdirs_of_earlier_checkpoint_formats_still_resume(tmp_path, monkeypatch, fixture,
                                                             last):
  # tests/fixtures: 6 steps of this config, checkpoint 6 kept. legacy_workdir was written by
  # format 1 (arrays under index keys, no digests), format2_workdir by format 2 (index keys,
  # array and file digests).
  import shutil  # pylint: disable=g-import-not-at-top
  source = os.path.join(os.path.dirname(os.path.dirname(__file__)), "fixtures", fixture)
  workdir = tmp_path / fixture
  shutil.copytree(source, workdir)
  monkeypatch.setattr(distributed, "setup_jax", lambda *args: None)
  loop.run(_options(), str(workdir), "train")
  records = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
  resumed = [r for r in records if r["split"] == "train" and r["step"] > last]
  assert [r["step"] for r in resumed] == [8] and np.isfinite(resumed[0]["loss"])
  assert sorted(int(s) for s in os.listdir(workdir / "checkpoints") if s.isdigit())[-1] == 8
  signature = json.loads((workdir / "checkpoints" / "model_signature.json").read_text())
  assert signature["checkpoint_format"] == 3 and signature["legacy_steps"] == [last]
