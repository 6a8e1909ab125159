#!/usr/bin/env bash
# Standard-MoE twin of 02_train_emo_1b14b.sh: same model, data, budget and load balancing, no
# document pools (--emo-routing standard) and, like the reference baseline, no intra-document
# attention masking.
#   DATA_PATH=/data/olmoe_mix_text_document NGPU=8 bash examples/02b_train_stdmoe_1b14b.sh
set -euo pipefail
ROUTING=standard exec bash "$(dirname "${BASH_SOURCE[0]}")/02_train_emo_1b14b.sh" "$@"
