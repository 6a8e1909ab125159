#!/usr/bin/env bash
# Fine-tune an expert subset briefly on a task and score it before and after (the reference's
# select -> fine-tune -> evaluate; emo_spec.md 5.3). Default: the quickstart model, 4 of its 16
# experts selected from 16 prompts of the offline task emo_mc_math, fine-tuned on the task's
# 200 training prompts through Megatron (`python -m megatron_emo.train --finetune` on the subset's
# torch_dist checkpoint), exported with to-hf, and scored with lm-eval (tools/evaluate.py).
#   bash examples/05_finetune_subset.sh                 # after bash examples/00_quickstart_cpu.sh
#   ROUTE=hf bash examples/05_finetune_subset.sh        # transformers Trainer on the pruned export
#   RUN=runs/qs TASK=emo_mc_code KEEP=8 FT_ITERS=50 bash examples/05_finetune_subset.sh
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PY:-.venv/bin/python}
RUN=${RUN:-runs/quickstart}
CHECKPOINT=${CHECKPOINT:-$RUN/hf}
TOKENIZER_MODEL=${TOKENIZER_MODEL:-$RUN/data/tokenizer.model}
TASK=${TASK:-emo_mc_math}
KEEP=${KEEP:-4}                 # experts kept per layer, shared expert included
NUM_EXAMPLES=${NUM_EXAMPLES:-16}
ROUTE=${ROUTE:-megatron}        # megatron | hf
FT_ITERS=${FT_ITERS:-25}        # Megatron route: about one epoch of the task's train split
FT_LR=${FT_LR:-3e-4}
EVAL_LIMIT=${EVAL_LIMIT:-100}   # test items scored before and after
OUT=${OUT:-$RUN/finetune/$TASK-keep$KEEP}
TASK_DIR=${TASK_DIR:-$RUN/lm_eval_tasks}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
mkdir -p "$OUT"

# 1. The subset: selection from the task's validation prompts -> $OUT/subset/{hf,megatron}.
SELECT_ARGS=(--task "$TASK" --num-examples "$NUM_EXAMPLES" --task-dir "$TASK_DIR"
             --keep "$KEEP" --output "$OUT/subset" --tokenizer "$TOKENIZER_MODEL")
[ "$ROUTE" = hf ] && SELECT_ARGS+=(--no-megatron)
"$PY" tools/select_experts.py "$CHECKPOINT" "${SELECT_ARGS[@]}" | tail -3

# 2. Fine-tune it on the task's training documents.
if [ "$ROUTE" = hf ]; then
    "$PY" tools/finetune_subset.py hf "$OUT/subset/hf" "$OUT/hf" --task "$TASK" \
        --task-dir "$TASK_DIR" --tokenizer "$TOKENIZER_MODEL" --epochs 1 --lr "$FT_LR"
else
    "$PY" tools/finetune_subset.py task-data "$TASK" "$OUT/data/train.jsonl" --task-dir "$TASK_DIR"
    "$PY" tools/preprocess_data.py --input "$OUT/data/train.jsonl" \
        --tokenizer-type SentencePieceTokenizer --tokenizer-model "$TOKENIZER_MODEL" \
        --output-prefix "$OUT/data/train" --workers 1 > "$OUT/data/preprocess.log"
    source examples/cpu_args.sh   # CPU_ARGS; the subset's own model flags replace the rest
    read -r -a MODEL_ARGS <<< "$("$PY" tools/finetune_subset.py megatron-flags "$OUT/subset/hf")"
    MOE_ARGS=(   # the subset routes like the HF model: no document pools (its own fixed pool)
        --moe-router-load-balancing-type aux_loss --moe-aux-loss-coeff 0.01 --moe-z-loss-coeff 1e-3
        --moe-router-dtype fp32 --moe-token-dispatcher-type alltoall --emo-routing standard
        --hidden-dropout 0 --attention-dropout 0
    )
    DATA_ARGS=(
        --data-path "$OUT/data/train_text_document" --split 100,0,0
        --tokenizer-type SentencePieceTokenizer --tokenizer-model "$TOKENIZER_MODEL"
        --dataloader-inter-document-masking --data-cache-path "$OUT/data/cache"
    )
    TRAINING_ARGS=(   # weights only (a from-hf release checkpoint): --finetune
        --load "$OUT/subset/megatron" --finetune
        --micro-batch-size 4 --global-batch-size 8 --train-iters "$FT_ITERS"
        --lr "$FT_LR" --min-lr 0 --lr-decay-style linear --lr-warmup-fraction 0.1
        --weight-decay 0 --adam-beta1 0.9 --adam-beta2 0.95 --seed "${SEED:-1234}"
    )
    LOGGING_ARGS=(
        --save "$OUT/checkpoints" --save-interval "$FT_ITERS" --ckpt-format torch_dist
        --log-interval 1 --eval-iters 0 --eval-interval "$FT_ITERS"
    )
    RANK=0 WORLD_SIZE=1 LOCAL_RANK=0 MASTER_ADDR=127.0.0.1 MASTER_PORT=${MASTER_PORT:-29537} \
        "$PY" -m megatron_emo.train "${CPU_ARGS[@]}" "${MODEL_ARGS[@]}" "${MOE_ARGS[@]}" \
        "${DATA_ARGS[@]}" "${TRAINING_ARGS[@]}" "${LOGGING_ARGS[@]}" \
        > "$OUT/train.log" 2>&1 || { tail -40 "$OUT/train.log"; exit 1; }
    grep -E "iteration +[0-9]+/" "$OUT/train.log" \
        | sed -E 's/.*(iteration +[0-9]+\/ *[0-9]+).*(lm loss: [^|]*).*/\1 | \2/'
    "$PY" tools/convert_checkpoint.py to-hf "$OUT/checkpoints" "$OUT/hf" \
        --tokenizer "$TOKENIZER_MODEL" | tail -1
fi

# 3. Before / after on the task's test split (lm-eval, offline).
"$PY" tools/evaluate.py "$OUT/subset/hf" "$OUT/hf" --tasks "$TASK" --task-dir "$TASK_DIR" \
    --tokenizer "$TOKENIZER_MODEL" --limit "$EVAL_LIMIT" --device cpu \
    --output "$OUT/scores.json" 2> "$OUT/evaluate.log" | grep -E "^\|"
echo "before: $OUT/subset/hf  after: $OUT/hf  scores: $OUT/scores.json"
