#!/usr/bin/env bash
# The prepared GPU check, in two parts that each fit one ~10-minute run; results as JSON and
# logs under $OUT (each record written as soon as it exists, so a time limit keeps what finished).
#
#   bash bench/gpu_check.sh          speed: bench/benchmark.py at F0's training setting (batch 256,
#                                    192 px train / 256 px eval, bfloat16, on-device MixUp/CutMix +
#                                    RandAugment) and timm's dm_nfnet_f0, torch.compile'd, at the
#                                    same settings in the same process (~7 min on an H200: each
#                                    train program compiles in ~75 s)
#   bash bench/gpu_check.sh memory   the train step at k = 4 with remat none / block (each
#                                    program's own peak memory), then --mode=plan of F0 on this
#                                    GPU's compiler, to set against the CPU estimates (~8 min)
#
# Prepare once on a machine with package access, for a GPU host whose Python environment lacks
# dm-haiku, jmp and ml-collections (pure-Python wheels, installed from .whl/ at start; the
# benchmark and --mode=plan need neither TensorFlow nor TFDS):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#       --implementation cp --platform manylinux2014_x86_64 -d .whl \
#       dm-haiku==0.0.17 jmp==0.0.4 ml-collections==1.1.0
# Then, on the GPU host, with .whl/ copied next to the checkout: bash bench/gpu_check.sh [memory]
set -uo pipefail
cd "$(dirname "$0")/.."
part="${1:-speed}"
if [[ "$part" != speed && "$part" != memory ]]; then
  echo "usage: bash bench/gpu_check.sh [speed|memory]" >&2; exit 2
fi
OUT="${OUT:-/tmp/gpu_check_out}"
mkdir -p "$OUT"
if [[ -d .whl ]]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2
{ date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; uptime; } \
    | tee "$OUT/machine.txt"
python3 -c "import jax; print(jax.__version__, jax.devices())" | tee -a "$OUT/machine.txt"

case "$part" in
  speed)
    timeout 500 python3 bench/benchmark.py --variant=F0 --batch=256 --image_size=192 \
        --eval_image_size=256 --dtype=bfloat16 --steps=10 --warmup=2 --timm --timm_compile \
        --out="$OUT" 2>&1 | tee "$OUT/benchmark.log"
    ;;
  memory)
    timeout 220 python3 bench/benchmark.py --variant=F0 --batch=256 --image_size=192 \
        --dtype=bfloat16 --modes=train --accum=4 --remat=none,block --steps=5 --warmup=1 \
        --out="$OUT" 2>&1 | tee "$OUT/benchmark_memory.log"
    timeout 260 python3 experiment.py --config=configs/nfnet.py:F0 --workdir=/tmp/plan_f0 \
        --mode=plan --config.plan.num_devices=8 --config.plan.device_memory_gb=80 2>&1 \
        | tee "$OUT/plan_f0.txt"
    ;;
esac
exit 0
