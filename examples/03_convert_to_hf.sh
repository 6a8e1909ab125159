#!/usr/bin/env bash
# Export a Megatron torch_dist checkpoint (any TP/EP layout) to the EmoForCausalLM HF format,
# then load it with transformers and greedily generate a few tokens as a smoke check.
#   CHECKPOINT=runs/emo/checkpoints HF_OUT=runs/emo/hf bash examples/03_convert_to_hf.sh
set -euo pipefail
cd "$(dirname "$0")/.."
CHECKPOINT=${CHECKPOINT:?set CHECKPOINT to a Megatron checkpoint directory}
HF_OUT=${HF_OUT:-${CHECKPOINT%/}-hf}
DTYPE=${DTYPE:-bfloat16}
PY=${PY:-.venv/bin/python}

CONVERT_ARGS=(--dtype "$DTYPE" --max-shard-size-mb "${MAX_SHARD_MB:-5000}")
[ -n "${TOKENIZER:-}" ] && CONVERT_ARGS+=(--tokenizer "$TOKENIZER")

"$PY" tools/convert_checkpoint.py to-hf "$CHECKPOINT" "$HF_OUT" "${CONVERT_ARGS[@]}"
"$PY" - "$HF_OUT" <<'PY'
import sys, torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True)
ids = torch.tensor([[1, 2, 3, 4]])
print("generated:", model.generate(ids, max_new_tokens=8, do_sample=False)[0].tolist())
PY
echo "HF model written to $HF_OUT"
