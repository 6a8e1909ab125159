#!/usr/bin/env bash
# EMO 1B14B (emo_spec.md section 3): 16 MoE layers, d 2048, 16 heads, experts of 1024: 127
# routed (top-7) + 1 shared, pools 8..128 in training and 32 in evaluation, lr 4e-3
# cosine to 4e-4 after 2000 warm-up steps, AdamW 0.9/0.95, wd 0.1, clip 1.0, 1024 x 4096 tokens
# per step, RMSNorm 1e-6, RoPE 500k, untied embeddings, LB 0.1 and z 1e-3 split over the layers,
# fp32 router, bf16, Transformer Engine grouped GEMM. One node (torchrun) or many (see
# examples/slurm/train_emo.sbatch, which sources this file's arrays with DEFINE_ONLY=1).
# EP-balanced layout: the shared expert is Megatron's SharedExpertMLP (computed on every rank,
# overlapped with the token dispatch), and the 127 routed experts are padded with never-routed
# experts to a multiple of EP ((-127) mod EP: 1 at EP 8, so 128 Megatron experts). The published
# in-router layout (--emo-num-shared-experts 1, expert 127 always on) sends every token to the
# last EP rank: 1.83x the mean load per rank at EP 8 (benchmarks/bench_ep_load.py).
#   DATA_PATH=/data/olmoe_mix_text_document NGPU=8 bash examples/02_train_emo_1b14b.sh
#   DRY_RUN=1 NNODES=16 bash examples/02_train_emo_1b14b.sh     # check every flag, no GPU needed
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

ROUTING=${ROUTING:-emo}                      # emo | standard (02b_train_stdmoe_1b14b.sh)
NNODES=${NNODES:-1}
NGPU=${NGPU:-8}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-localhost}
MASTER_PORT=${MASTER_PORT:-6000}
EP=${EP:-8}
RUN_DIR=${RUN_DIR:-runs/${ROUTING}_1b14b}
DATA_PATH=${DATA_PATH:-data/olmoe_mix_text_document}
TOKENIZER_TYPE=${TOKENIZER_TYPE:-HuggingFaceTokenizer}
TOKENIZER_MODEL=${TOKENIZER_MODEL:-allenai/dolma2-tokenizer}
TRAIN_ITERS=${TRAIN_ITERS:-238419}           # 1T tokens at 4,194,304 tokens per step
PY=${PY:-python}
NUM_ROUTED=127
NUM_PADDING=$(( (EP - NUM_ROUTED % EP) % EP ))  # never-routed experts: a multiple of EP in all

DISTRIBUTED_ARGS=(
    --nproc-per-node "$NGPU" --nnodes "$NNODES" --node-rank "$NODE_RANK"
    --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT"
)
MODEL_ARGS=(
    --num-layers 16 --hidden-size 2048 --num-attention-heads 16 --ffn-hidden-size 8192
    --seq-length 4096 --max-position-embeddings 4096
    --normalization RMSNorm --norm-epsilon 1e-6 --swiglu
    --position-embedding-type rope --rotary-base 500000
    --untie-embeddings-and-output-weights --disable-bias-linear
    --hidden-dropout 0 --attention-dropout 0 --init-method-std 0.02
    --make-vocab-size-divisible-by 128
    --transformer-impl transformer_engine
)
MOE_ARGS=(
    --num-experts $((NUM_ROUTED + NUM_PADDING)) --moe-ffn-hidden-size 1024 --moe-router-topk 7
    --moe-shared-expert-intermediate-size 1024 --moe-shared-expert-overlap
    --moe-router-load-balancing-type aux_loss --moe-aux-loss-coeff 0.1 --moe-z-loss-coeff 1e-3
    --moe-router-dtype fp32 --moe-token-dispatcher-type alltoall --moe-grouped-gemm
    --expert-model-parallel-size "$EP"
)
EMO_ARGS=(
    --emo-routing "$ROUTING" --emo-num-shared-experts 0 --emo-num-padding-experts "$NUM_PADDING"
    --emo-pool-size-min 8 --emo-pool-size-max 128 --emo-pool-size-eval 32
    --emo-pool-size-seed 12536
)
DATA_ARGS=(
    --data-path "$DATA_PATH" --split 990,8,2
    --tokenizer-type "$TOKENIZER_TYPE" --tokenizer-model "$TOKENIZER_MODEL"
    --num-workers 2
)
# EMO trains with intra-document attention; the reference standard MoE does not.
[ "$ROUTING" = emo ] && DATA_ARGS+=(--dataloader-inter-document-masking)
TRAINING_ARGS=(
    --micro-batch-size 4 --global-batch-size 1024 --train-iters "$TRAIN_ITERS"
    --lr 4e-3 --min-lr 4e-4 --lr-decay-style cosine --lr-warmup-iters 2000
    --lr-decay-iters "$TRAIN_ITERS"
    --optimizer adam --adam-beta1 0.9 --adam-beta2 0.95 --weight-decay 0.1 --clip-grad 1.0
    --bf16 --use-distributed-optimizer --seed 12536
)
LOGGING_ARGS=(
    --save "$RUN_DIR/checkpoints" --load "$RUN_DIR/checkpoints" --save-interval 1000
    --ckpt-format torch_dist
    --log-interval 10 --eval-interval 2500 --eval-iters 20
    --tensorboard-dir "$RUN_DIR/tensorboard" --log-throughput --moe-per-layer-logging
)
ARGS=("${MODEL_ARGS[@]}" "${MOE_ARGS[@]}" "${EMO_ARGS[@]}" "${DATA_ARGS[@]}"
      "${TRAINING_ARGS[@]}" "${LOGGING_ARGS[@]}")

[ "${DEFINE_ONLY:-0}" = 1 ] && return 0 2>/dev/null
if [ "${DRY_RUN:-0}" = 1 ]; then
    WORLD_SIZE=$((NNODES * NGPU)) RANK=0 LOCAL_RANK=0 "$PY" -m megatron_emo.train "${ARGS[@]}" --emo-dry-run
    exit 0
fi
mkdir -p "$RUN_DIR"
torchrun "${DISTRIBUTED_ARGS[@]}" -m megatron_emo.train "${ARGS[@]}" 2>&1 | tee -a "$RUN_DIR/train.log"
