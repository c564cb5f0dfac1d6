"""Smoke test of bench/benchmark.py: a tiny NFNet, a few steps, the record fields.

The train step runs without its on-device augmentation (`--augment=none`): that code is the
training loop's own (tests/augment, tests/train), and leaving it out shortens this compile.

Speed is never asserted here (CI machines vary); the benchmark's numbers live in
bench/results/. What is checked: the script runs end to end on CPU, writes one JSON
record per mode with every documented field, and the numbers are self-consistent.
"""

import importlib.util
import json
import math
import os

import pytest

pytestmark = pytest.mark.slow  # Compiles a train and an eval step (~1 min of CI).

_PATH = os.path.join(os.path.dirname(__file__), os.pardir, os.pardir, 'bench', 'benchmark.py')
_FIELDS = ('device', 'date', 'implementation', 'variant', 'mode', 'batch', 'image_size',
           'dtype', 'images_per_second', 'ms_per_step', 'mfu', 'peak_memory_gb',
           'compile_seconds', 'compile_seconds_cached', 'macs_per_image', 'compiled_temp_gb',
           'compiled_peak_gb', 'versions')


def _load_benchmark():
  spec = importlib.util.spec_from_file_location('nfnets_benchmark', _PATH)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.fixture(scope='module')
def run(tmp_path_factory):
  out = tmp_path_factory.mktemp('bench')
  records = _load_benchmark().main([
      '--variant=tiny', '--batch=4', '--steps=2', '--warmup=1', '--dtype=float32',
      '--peak_tflops=1.0', '--augment=none', f'--out={out}'])
  return records, out


def test_one_record_per_mode_with_all_fields(run):
  records, out = run
  assert [r['mode'] for r in records] == ['train', 'eval']
  for record in records:
    missing = [f for f in _FIELDS if f not in record]
    assert not missing, missing
  files = os.listdir(out)
  assert len(files) == 1 and files[0].endswith('.json')
  with open(os.path.join(out, files[0])) as f:
    assert json.load(f) == json.loads(json.dumps(records))


def test_numbers_are_consistent(run):
  records, _ = run
  for r in records:
    assert r['batch'] == 4 and r['image_size'] == 32
    assert r['ms_per_step'] > 0 and r['compile_seconds'] > 0
    # images/s is derived from the same median step time.
    assert math.isclose(r['images_per_second'], 4 / (r['ms_per_step'] / 1e3), rel_tol=1e-9)
    # MFU against the given 1 TFLOP/s peak: 2 FLOPs per MAC, x3 for a training step.
    passes = 3 if r['mode'] == 'train' else 1
    expected = r['macs_per_image'] * 2 * passes * 4 / (r['ms_per_step'] / 1e3) / 1e12
    assert math.isclose(r['mfu'], expected, rel_tol=1e-9)
    assert r['macs_per_image'] > 0
    # The program's own peak holds at least its temporaries (the process high-water mark,
    # peak_memory_gb, is not per program).
    assert r['compiled_peak_gb'] >= r['compiled_temp_gb'] > 0


def test_bad_arguments_are_refused():
  with pytest.raises(SystemExit):
    _load_benchmark().main(['--modes=train,infer'])
