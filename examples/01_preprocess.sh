#!/usr/bin/env bash
# Train a sentencepiece tokenizer on the embedded sample corpus, then tokenize the corpus into a
# Megatron .bin/.idx dataset with a per-document metadata sidecar (domain, source, id).
#   bash examples/01_preprocess.sh                       # -> runs/data/emo_sample_text_document.*
#   OUT_DIR=/data/emo VOCAB_SIZE=32000 WORKERS=8 INPUTS="/data/raw/*.jsonl.gz" \
#     bash examples/01_preprocess.sh
# Outputs: $OUT_DIR/tokenizer.{model,vocab} and $OUT_DIR/${NAME}_text_document.{bin,idx,
# metadata.jsonl,summary.json}. Train with:
#   --tokenizer-type SentencePieceTokenizer --tokenizer-model $OUT_DIR/tokenizer.model
#   --data-path $OUT_DIR/${NAME}_text_document
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT_DIR=${OUT_DIR:-runs/data}
NAME=${NAME:-emo_sample}
INPUTS=${INPUTS:-megatron_emo/preprocessing/sample_corpus/*.jsonl.gz}
VOCAB_SIZE=${VOCAB_SIZE:-8192}
WORKERS=${WORKERS:-1}
TOKENIZER_PREFIX=${TOKENIZER_PREFIX:-$OUT_DIR/tokenizer}
export PYTHONPATH=${PYTHONPATH:-.}

# shellcheck disable=SC2206  # INPUTS is a glob on purpose
INPUT_FILES=($INPUTS)
TOKENIZER_TRAIN_ARGS=(
    --input "${INPUT_FILES[@]}"
    --vocab-size "$VOCAB_SIZE"
    --model-type "${MODEL_TYPE:-bpe}"
    --output-prefix "$TOKENIZER_PREFIX"
)
TOKENIZER_ARGS=(
    --tokenizer-type SentencePieceTokenizer
    --tokenizer-model "$TOKENIZER_PREFIX.model"
)
DATA_ARGS=(
    --input "${INPUT_FILES[@]}"
    --json-keys text
    --metadata-keys domain,source,id
    --output-prefix "$OUT_DIR/$NAME"
    --on-error "${ON_ERROR:-skip}"
)
RUNTIME_ARGS=(
    --workers "$WORKERS"
    --log-interval "${LOG_INTERVAL:-1000}"
)

mkdir -p "$OUT_DIR"
if [ -f "$TOKENIZER_PREFIX.model" ] && [ "${RETRAIN_TOKENIZER:-0}" != 1 ]; then
    echo "reusing $TOKENIZER_PREFIX.model (RETRAIN_TOKENIZER=1 to retrain)"
else
    "$PY" tools/train_tokenizer.py "${TOKENIZER_TRAIN_ARGS[@]}"
fi
"$PY" tools/preprocess_data.py "${TOKENIZER_ARGS[@]}" "${DATA_ARGS[@]}" "${RUNTIME_ARGS[@]}"
echo "dataset: $OUT_DIR/${NAME}_text_document (summary: $OUT_DIR/${NAME}_text_document.summary.json)"
