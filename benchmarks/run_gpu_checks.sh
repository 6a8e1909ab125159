#!/usr/bin/env bash
# GPU checks on a machine with torch + CUDA but no megatron-core: install the carried wheel
# (.whl/, see README), then run the parts named in PARTS (default: all) with their logs in
# ${OUT:-runs/gpu}.   Run: bash benchmarks/run_gpu_checks.sh
#   PARTS="train tests fused router moe"   train: bench_train_step.py (EMO vs standard through
#   the entry point); tests: gpu-marked tests; fused: the fused-routing unit tests on CUDA
#   (compiled Triton kernels); router: bench_router.py (issue 13 table); moe: bench_moe_layer.py
#   Issue 13 alone: PARTS="fused router" bash benchmarks/run_gpu_checks.sh
set -uo pipefail
OUT=${OUT:-runs/gpu}; mkdir -p "$OUT"
PY=${PY:-python3}
PARTS=${PARTS:-train tests fused router moe}
if ! $PY -c "import megatron.core" 2>/dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
$PY -c "import torch, megatron.core as m; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'megatron-core', m.__version__); import importlib.util as u; print('transformer_engine', bool(u.find_spec('transformer_engine')))" 2>/dev/null | tee -a "$OUT/gpu.txt"
run() {  # name timeout command...
  local name=$1 limit=$2; shift 2
  case " $PARTS " in *" $name "*) ;; *) return 0 ;; esac
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1; echo "$name rc=$?"; grep -v -i warn "$OUT/$name.log" | tail -14
}
run moe "${MOE_TIMEOUT:-150}" $PY benchmarks/bench_moe_layer.py
run train "${TRAIN_TIMEOUT:-300}" $PY benchmarks/bench_train_step.py --preset gpu-proxy ${TRAIN_FLAGS:-}
run tests "${TEST_TIMEOUT:-150}" $PY -m pytest -q -m gpu tests/gpu tests/subsets -p no:cacheprovider
run fused "${FUSED_TIMEOUT:-150}" $PY -m pytest -q -p no:cacheprovider \
  tests/unit/test_fused_routing.py tests/unit/test_routing_math.py
run router "${ROUTER_TIMEOUT:-420}" $PY benchmarks/bench_router.py --device cuda ${ROUTER_FLAGS:-}
