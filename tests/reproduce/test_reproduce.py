"""Tests for the study logic of reproduce/ (no training runs, no data, no model compiles).

The AGC study's key trick is that lambda lives in the optimizer state, so one compiled train
step serves every lambda; these tests check that this optimizer is the project's own
`build_optimizer` recipe, that a single compiled update really reads lambda from the state,
and that "no AGC" (lambda = inf) is exactly plain SGD.
"""

import dataclasses
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nfnets.train import optim
from nfnets.train.options import AGCOptions, OptimizerOptions
from reproduce import agc_batch_size as agc_study
from reproduce import gamma_table
from reproduce import outputs
from reproduce import signal_propagation as spp_script
from nfnets.analysis import signal_propagation as sp

STEPS = dict(batch_size=512, steps_per_epoch=10.0, total_steps=40)


def _params_and_grads():
  rng = np.random.default_rng(0)
  params = {'net/~/conv': {'w': jnp.asarray(rng.normal(size=(3, 3, 2, 4)), jnp.float32),
                           'bias': jnp.zeros(4)},
            'net/~/linear': {'w': jnp.asarray(rng.normal(size=(4, 3)), jnp.float32),
                             'b': jnp.zeros(3)},
            'net/~/block': {'skip_gain': jnp.zeros(())}}
  # Gradients 10x the weights: far above any lambda tried, so AGC clips every unit it sees.
  grads = jax.tree.map(lambda p: 10.0 * p + 1.0, params)
  return params, grads


def _reference(name, clipping, study):
  config = OptimizerOptions(name=name, lr=study.base_lr, warmup_epochs=study.warmup_epochs,
                            weight_decay=study.weight_decay,
                            agc=AGCOptions(clipping=clipping, exclude=tuple(study.agc_exclude)))
  optimizer, _ = optim.build_optimizer(config, **STEPS)
  return optimizer


def _two_updates(optimizer, params, grads):
  """Two steps, so the lr is past 0 (warm-up starts at 0) and momentum is involved."""
  state = optimizer.init(params)
  updates = None
  for _ in range(2):
    updates, state = optimizer.update(grads, state, params)
  return updates


@pytest.mark.parametrize('clipping', [0.01, 0.16, agc_study.NO_AGC])
def test_injected_optimizer_matches_build_optimizer(clipping):
  study = dataclass_study()
  params, grads = _params_and_grads()
  ours, _ = agc_study.make_optimizer(study, clipping, **STEPS)
  if clipping is agc_study.NO_AGC:
    reference = _reference('sgd', 0.01, study)
  else:
    reference = _reference('sgd_agc', clipping, study)
  got = _two_updates(ours, params, grads)
  want = _two_updates(reference, params, grads)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-8), got, want)


def dataclass_study():
  return agc_study.StudyConfig(batch_sizes=(64, 512), clippings=(agc_study.NO_AGC, 0.01),
                               epochs=4.0, warmup_epochs=1.0, base_lr=0.4)


def test_one_compiled_update_reads_lambda_from_the_state():
  study = dataclass_study()
  params, grads = _params_and_grads()
  opt_a, _ = agc_study.make_optimizer(study, 0.01, **STEPS)
  opt_b, _ = agc_study.make_optimizer(study, 0.16, **STEPS)
  # The update compiled from optimizer A, fed B's state, must behave like B.
  update_a = jax.jit(opt_a.update)

  def two_steps(update, state):
    for _ in range(2):  # the first step has lr 0 (warm-up starts at 0)
      updates, state = update(grads, state, params)
    return updates

  out_b = two_steps(update_a, opt_b.init(params))
  out_a = two_steps(update_a, opt_a.init(params))
  want_b = _two_updates(opt_b, params, grads)
  w = 'net/~/conv'
  np.testing.assert_allclose(out_b[w]['w'], want_b[w]['w'], rtol=1e-6)
  assert not np.allclose(out_a[w]['w'], out_b[w]['w'])


def test_no_agc_is_infinite_lambda():
  study = dataclass_study()
  params, _ = _params_and_grads()
  optimizer, _ = agc_study.make_optimizer(study, agc_study.NO_AGC, **STEPS)
  assert math.isinf(float(optimizer.init(params)[0].hyperparams['clipping']))


@pytest.mark.parametrize('clip_skip_gains', [False, True])
def test_skip_gains_escape_the_clip_unless_asked(clip_skip_gains):
  study = dataclass_study()
  if clip_skip_gains:
    study = dataclasses.replace(study, agc_exclude=agc_study.PAPER_EXCLUDE)
  params, grads = _params_and_grads()
  clipped, _ = agc_study.make_optimizer(study, 0.01, **STEPS)
  unclipped, _ = agc_study.make_optimizer(study, agc_study.NO_AGC, **STEPS)
  got = _two_updates(clipped, params, grads)['net/~/block']['skip_gain']
  free = _two_updates(unclipped, params, grads)['net/~/block']['skip_gain']
  assert float(free) != 0.0
  if clip_skip_gains:
    # A zero gain's gradient is capped at lambda * eps = 1e-5 per step (grad here is 1).
    assert abs(float(got)) < 1e-4 * abs(float(free))
  else:
    np.testing.assert_allclose(got, free, rtol=1e-6)


def test_study_configs():
  assert set(agc_study.QUICK.batch_sizes) <= set(agc_study.FULL.batch_sizes)
  assert set(agc_study.QUICK.clippings) <= set(agc_study.FULL.clippings)
  assert set(agc_study.QUICK.seeds) <= set(agc_study.FULL.seeds)
  # The quick run is a subset of the full table's runs: everything else is identical.
  restricted = dataclasses.replace(agc_study.FULL, batch_sizes=agc_study.QUICK.batch_sizes,
                                   clippings=agc_study.QUICK.clippings,
                                   seeds=agc_study.QUICK.seeds)
  assert restricted == agc_study.QUICK
  assert agc_study.FULL.peak_lr(256) == pytest.approx(agc_study.FULL.base_lr)
  assert agc_study.FULL.clippings == (None, 0.01, 0.02, 0.04, 0.08, 0.16)
  assert agc_study.FULL.agc_exclude == agc_study.PAPER_EXCLUDE + (agc_study.SKIP_GAINS,)
  with pytest.raises(ValueError, match='clippings'):
    agc_study.StudyConfig(clippings=(0.0,))
  with pytest.raises(ValueError, match='warmup_epochs'):
    agc_study.StudyConfig(epochs=1.0, warmup_epochs=2.0)


def _fake_results():
  return [
      {'batch_size': 64, 'clipping': None, 'test_top1': 0.95, 'diverged': False},
      {'batch_size': 512, 'clipping': None, 'test_top1': 0.1, 'diverged': True},
      {'batch_size': 64, 'clipping': 0.01, 'test_top1': 0.9, 'diverged': False},
  ]


def test_results_table_marks_divergence_and_missing_runs():
  table = agc_study.results_table(dataclass_study(), _fake_results())
  lines = table.strip().splitlines()
  assert lines[0].startswith('| lambda | B=64 (lr 0.1) | B=512 (lr 0.8) |')
  assert lines[2] == '| no AGC | 95.0 | 10.0 (diverged) |'
  assert lines[3] == '| 0.01 | 90.0 | not run |'


def test_cells_summarise_seeds_with_spread_and_divergence_count():
  runs = [{'test_top1': 0.9, 'diverged': False}, {'test_top1': 0.1, 'diverged': True},
          {'test_top1': 0.8, 'diverged': False}]
  assert agc_study.summarise_cell(runs) == '60.0 [10.0–90.0] (1/3 diverged)'
  assert agc_study.summarise_cell(runs[::2]) == '85.0 [80.0–90.0]'
  assert agc_study.summarise_cell([]) == 'not run'


def test_saved_study_round_trips_and_reads_old_single_seed_files():
  study = dataclasses.replace(agc_study.FULL, seeds=(3, 4))
  saved = json.loads(json.dumps(dataclasses.asdict(study)))
  assert agc_study.study_from_dict(saved) == study
  old = dict(saved)
  del old['seeds']
  old['seed'] = 0
  assert agc_study.study_from_dict(old).seeds == (0,)
  with pytest.raises(ValueError, match='seeds'):
    dataclasses.replace(study, seeds=(1, 1))


def test_plots_write_png_files(tmp_path):
  agc_study.plot(dataclass_study(), _fake_results(), tmp_path / 'agc.png')
  assert (tmp_path / 'agc.png').read_bytes()[:4] == b'\x89PNG'


def test_markdown_table_rejects_ragged_rows():
  assert outputs.markdown_table(['a', 'b'], [[1, 2]]).splitlines()[2] == '| 1 | 2 |'
  with pytest.raises(ValueError, match='cells'):
    outputs.markdown_table(['a', 'b'], [[1]])


def test_gamma_rows_report_the_difference_to_the_official_literals():
  rows = gamma_table.gamma_rows(num_samples=2**12)
  assert len(rows) == 15
  by_name = {r['activation']: r for r in rows}
  for r in rows:
    assert r['difference'] == pytest.approx(r['computed'] - r['official'])
  # Even 4096 quasi-random samples pin relu's gamma to the closed form within 0.2%.
  assert by_name['relu']['computed'] == pytest.approx(by_name['relu']['analytic'], rel=2e-3)
  assert 'Largest relative difference' in gamma_table.markdown(rows, 'note')


def test_nf_check_on_synthetic_ideal_network():
  depths = (2, 3)
  ideal = sp.predicted_nf_variance(depths, spp_script.ALPHA)
  stats = sp.SignalStats(avg_sq_mean=np.zeros(6), avg_var=np.concatenate([[0.5], ideal]),
                         res_avg_var=np.ones(5))
  check = spp_script.nf_check(stats, depths, 1.0)
  assert check['mean_within_stage_increment'] == pytest.approx(0.04)
  assert check['max_abs_error_vs_prediction'] == pytest.approx(0.0, abs=1e-12)
  assert check['after_transition'] == pytest.approx([1.04, 1.04])


def test_spp_model_specs():
  specs = spp_script.model_specs(0.25)
  assert [s['family'] for s in specs] == ['ResNet', 'NF_ResNet', 'NFNet', 'NFNet']
  assert specs[0]['is_training'] and not any(s['is_training'] for s in specs[1:])
  assert tuple(specs[2]['depths']) == (1, 2, 6, 3)
  assert [s['skip_gain'] for s in specs] == [None, 1.0, 1.0, 0.0]
