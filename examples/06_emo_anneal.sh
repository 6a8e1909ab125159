#!/usr/bin/env bash
# EMO-anneal (the paper's ablation: modularity added after pretraining): resume a checkpoint
# trained with `--emo-routing standard` (weights, optimizer state and iteration count) and continue
# it for ANNEAL_ITERS iterations under `--emo-routing emo`, the learning rate decaying linearly
# from LR to MIN_LR over the anneal (Megatron's WSD schedule; `--override-opt_param-scheduler`
# because the schedule differs from the checkpoint's). LR and MIN_LR must stay the checkpoint's:
# Megatron keys the optimizer's parameter groups by them and refuses to load the optimizer state
# otherwise (megatron/core/optimizer/optimizer.py:640). Then export to Hugging Face.
# The model flags are the quickstart's (they must match the checkpoint; Megatron checks the
# shape on load).
#   LOAD=runs/std/checkpoints DATA_DIR=runs/std/data bash examples/06_emo_anneal.sh runs/anneal
#   ROUTING=standard ...   # the control: the same continuation without EMO routing
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT=${1:-runs/emo_anneal}
LOAD=${LOAD:?set LOAD to the checkpoint directory of a --emo-routing standard run}
DATA_DIR=${DATA_DIR:?set DATA_DIR to the run data (tokenizer.model, emo_sample_text_document)}
ANNEAL_ITERS=${ANNEAL_ITERS:-100}
LR=${LR:-3e-3}          # the quickstart's --lr and --min-lr
MIN_LR=${MIN_LR:-3e-4}
ROUTING=${ROUTING:-emo}
PY=${PY:-.venv/bin/python}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
BASE_ITERS=$(cat "$LOAD/latest_checkpointed_iteration.txt")
TOTAL_ITERS=$((BASE_ITERS + ANNEAL_ITERS))
mkdir -p "$OUT"

# CPU_ARGS and the quickstart model (MODEL_ARGS, MOE_ARGS, EMO_ARGS with $ROUTING).
source examples/cpu_args.sh
DATA_ARGS=(
    --data-path "$DATA_DIR/emo_sample_text_document" --split 95,5,0
    --tokenizer-type SentencePieceTokenizer --tokenizer-model "$DATA_DIR/tokenizer.model"
    --dataloader-inter-document-masking --data-cache-path "$OUT/cache"
)
TRAINING_ARGS=(   # resume: weights, optimizer and iteration; a new LR schedule for the anneal
    --load "$LOAD" --override-opt_param-scheduler
    --micro-batch-size 4 --global-batch-size 8 --train-iters "$TOTAL_ITERS"
    --lr "$LR" --min-lr "$MIN_LR" --lr-warmup-iters 0
    --lr-decay-style WSD --lr-wsd-decay-style linear --lr-wsd-decay-iters "$ANNEAL_ITERS"
    --lr-decay-iters "$TOTAL_ITERS"
    --adam-beta1 0.9 --adam-beta2 0.95 --weight-decay 0.1 --seed "${SEED:-1234}"
)
LOGGING_ARGS=(
    --save "$OUT/checkpoints" --save-interval "$TOTAL_ITERS" --ckpt-format torch_dist
    --log-interval 10 --eval-interval "$TOTAL_ITERS" --eval-iters 4
    --tensorboard-dir "$OUT/tensorboard"
)
echo "annealing $LOAD (iteration $BASE_ITERS) for $ANNEAL_ITERS iterations," \
    "--emo-routing $ROUTING"
RANK=0 WORLD_SIZE=1 LOCAL_RANK=0 MASTER_ADDR=127.0.0.1 MASTER_PORT=${MASTER_PORT:-29527} \
    "$PY" -m megatron_emo.train "${CPU_ARGS[@]}" "${MODEL_ARGS[@]}" "${MOE_ARGS[@]}" \
    "${EMO_ARGS[@]}" "${DATA_ARGS[@]}" "${TRAINING_ARGS[@]}" "${LOGGING_ARGS[@]}" \
    > "$OUT/train.log" 2>&1 || { tail -40 "$OUT/train.log"; exit 1; }
grep -E "iteration +[0-9]+/|loading|validation loss" "$OUT/train.log" | tail -6
"$PY" tools/convert_checkpoint.py to-hf "$OUT/checkpoints" "$OUT/hf" \
    --tokenizer "$DATA_DIR/tokenizer.model"
echo "annealed model: $OUT/checkpoints (iteration $TOTAL_ITERS), HF export $OUT/hf"
