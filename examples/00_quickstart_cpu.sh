#!/usr/bin/env bash
# Quickstart on a CPU-only machine (the README's main command): installs the pinned environment,
# preprocesses the embedded 5-domain corpus, trains a tiny EMO model with `--cpu` through
# megatron.training.pretrain (a few minutes on 2 cores), saves a checkpoint and TensorBoard
# events, exports the model to Hugging Face format, writes the modularity report and selects a
# math expert subset (examples/04_select_experts.sh).
#   bash examples/00_quickstart_cpu.sh [OUTPUT_DIR]          # default runs/quickstart
#   TRAIN_ITERS=50 SKIP_REPORT=1 bash examples/00_quickstart_cpu.sh /tmp/qs   # faster
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT=${1:-runs/quickstart}
TRAIN_ITERS=${TRAIN_ITERS:-300}
ROUTING=${ROUTING:-emo}
PY=${PY:-.venv/bin/python}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}

[ "${SKIP_INSTALL:-0}" = 1 ] || bash tools/bootstrap.sh
OUT_DIR=$OUT/data VOCAB_SIZE=${VOCAB_SIZE:-4096} WORKERS=${WORKERS:-2} PY=$PY \
    bash examples/01_preprocess.sh

# CPU_ARGS and the model: MODEL_ARGS, MOE_ARGS, EMO_ARGS (15 routed + 1 padding expert +
# SharedExpertMLP, pools 3..15).
source examples/cpu_args.sh
DATA_ARGS=(
    --data-path "$OUT/data/emo_sample_text_document" --split 95,5,0
    --tokenizer-type SentencePieceTokenizer --tokenizer-model "$OUT/data/tokenizer.model"
    --dataloader-inter-document-masking --data-cache-path "$OUT/data/cache"
)
TRAINING_ARGS=(
    --micro-batch-size 4 --global-batch-size 8 --train-iters "$TRAIN_ITERS"
    --lr 3e-3 --min-lr 3e-4 --lr-decay-style cosine --lr-warmup-iters 20
    --adam-beta1 0.9 --adam-beta2 0.95 --weight-decay 0.1 --seed "${SEED:-1234}"
)
LOGGING_ARGS=(
    --save "$OUT/checkpoints" --save-interval "$TRAIN_ITERS" --ckpt-format torch_dist
    --log-interval 10 --eval-interval "$TRAIN_ITERS" --eval-iters 4
    --tensorboard-dir "$OUT/tensorboard"
)
RANK=0 WORLD_SIZE=1 LOCAL_RANK=0 MASTER_ADDR=127.0.0.1 MASTER_PORT=${MASTER_PORT:-29517} \
    "$PY" -m megatron_emo.train "${CPU_ARGS[@]}" "${MODEL_ARGS[@]}" "${MOE_ARGS[@]}" \
    "${EMO_ARGS[@]}" "${DATA_ARGS[@]}" "${TRAINING_ARGS[@]}" "${LOGGING_ARGS[@]}" \
    2>&1 | tee "$OUT/train.log" | grep -E "iteration +[0-9]+/|EMO routing|validation loss|saved checkpoint|Error"

# eos/pad ids come from the training tokenizer recorded in the checkpoint (sentencepiece: 2, 3).
"$PY" tools/convert_checkpoint.py to-hf "$OUT/checkpoints" "$OUT/hf"
if [ "${SKIP_REPORT:-0}" != 1 ]; then
    "$PY" tools/modularity_report.py "$OUT/hf" --data-prefix "$OUT/data/emo_sample_text_document" \
        --output "$OUT/report" --max-docs "${REPORT_DOCS:-40}" --device cpu
    # A task's expert subset (4 of 16 experts) from 4 math documents, pruned HF + Megatron.
    RUN=$OUT PY=$PY bash examples/04_select_experts.sh
fi

echo
echo "quickstart done:"
echo "  data         $OUT/data/emo_sample_text_document.{bin,idx}  (summary.json, metadata.jsonl)"
echo "  training log $OUT/train.log"
echo "  checkpoint   $OUT/checkpoints  (iteration $(cat "$OUT/checkpoints/latest_checkpointed_iteration.txt"))"
echo "  tensorboard  $OUT/tensorboard  (.venv/bin/tensorboard --logdir $OUT/tensorboard)"
echo "  HF export    $OUT/hf"
[ "${SKIP_REPORT:-0}" = 1 ] || echo "  report       $OUT/report/report.html"
[ "${SKIP_REPORT:-0}" = 1 ] || echo "  subset       $OUT/subsets/math-keep4/{selection.json,hf,megatron}"
