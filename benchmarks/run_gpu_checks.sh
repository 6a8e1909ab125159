#!/usr/bin/env bash
# GPU checks on a machine with torch + CUDA but no megatron-core: install the carried wheel,
# then the training-step benchmark (EMO vs standard), the gpu-marked tests and the router
# benchmark. Logs go to ${OUT:-runs/gpu}.  Run: bash benchmarks/run_gpu_checks.sh
set -uo pipefail
OUT=${OUT:-runs/gpu}; mkdir -p "$OUT"
PY=${PY:-python3}
if ! $PY -c "import megatron.core" 2>/dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
$PY -c "import torch, megatron.core as m; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'megatron-core', m.__version__); import importlib.util as u; print('transformer_engine', bool(u.find_spec('transformer_engine')))" | tee -a "$OUT/gpu.txt"
timeout "${TRAIN_TIMEOUT:-300}" $PY benchmarks/bench_train_step.py --preset gpu-proxy > "$OUT/bench_train.log" 2>&1; echo "bench_train rc=$?"; tail -8 "$OUT/bench_train.log"
timeout "${TEST_TIMEOUT:-150}" $PY -m pytest -q -m gpu tests/gpu -p no:cacheprovider > "$OUT/gpu_tests.log" 2>&1; echo "gpu tests rc=$?"; tail -15 "$OUT/gpu_tests.log"
timeout "${ROUTER_TIMEOUT:-90}" $PY benchmarks/bench_router.py --device cuda > "$OUT/bench_router.log" 2>&1; echo "bench_router rc=$?"; tail -12 "$OUT/bench_router.log"
