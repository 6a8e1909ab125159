#!/usr/bin/env bash
# Select a task's expert subset from a few examples (emo_spec.md 5.1, greedy layerwise by mean
# routing probability) and write the pruned HF model plus a Megatron checkpoint of the subset.
# Defaults use the quickstart's model and tokenizer, and the embedded corpus' math documents as
# the "task".
#   bash examples/04_select_experts.sh
#   CHECKPOINT=runs/emo_1b14b/hf TOKENIZER_MODEL=... EXAMPLES=task.jsonl KEEP=32 \
#     bash examples/04_select_experts.sh
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PY:-.venv/bin/python}
RUN=${RUN:-runs/quickstart}
CHECKPOINT=${CHECKPOINT:-$RUN/hf}
TOKENIZER_MODEL=${TOKENIZER_MODEL:-$RUN/data/tokenizer.model}
DOMAIN=${DOMAIN:-math}
NUM_EXAMPLES=${NUM_EXAMPLES:-4}
KEEP=${KEEP:-4}                     # experts kept per layer, shared expert included
METHOD=${METHOD:-greedy-layerwise}
OUT=${OUT:-$RUN/subsets/$DOMAIN-keep$KEEP}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
mkdir -p "$OUT"

if [ -z "${EXAMPLES:-}" ]; then
    # A few documents of one corpus domain, tokenised with the training tokenizer (+ EOD = 2).
    EXAMPLES=$OUT/examples.jsonl
    "$PY" - "$TOKENIZER_MODEL" "$DOMAIN" "$NUM_EXAMPLES" "$EXAMPLES" <<'PY'
import gzip, json, sys
import sentencepiece as spm
from megatron_emo.preprocessing import sample_corpus_files
model, domain, num, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
sp = spm.SentencePieceProcessor(model_file=model)
records = []
for path in sample_corpus_files():
    with gzip.open(path, "rt") as f:
        records += [r for r in map(json.loads, f) if r["domain"] == domain]
if not records:
    sys.exit(f"no documents of domain {domain!r} in the sample corpus")
with open(out, "w") as f:
    for r in records[-num:]:  # the last ones: the report uses the first ones for its own splits
        f.write(json.dumps({"tokens": sp.encode(r["text"])[:255] + [sp.eos_id()]}) + "\n")
print(f"{min(num, len(records))} {domain} examples -> {out}")
PY
fi
SELECT_ARGS=(--keep "$KEEP" --method "$METHOD" --output "$OUT" --ep "${EP:-1}")
"$PY" tools/select_experts.py "$CHECKPOINT" "$EXAMPLES" "${SELECT_ARGS[@]}"
echo "selection: $OUT/selection.json; pruned HF model: $OUT/hf; Megatron subset: $OUT/megatron"
