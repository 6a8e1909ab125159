#!/usr/bin/env bash
# The flag arrays of a tiny EMO model trained with --cpu (gloo), EP=2 and the distributed
# optimizer: train_emo.sbatch sources this file instead of the 1B14B recipe to run the SLURM
# launch for real on a machine without GPUs (tests/training/test_slurm.py does; a local cluster
# comes from tools/local_slurm.sh):
#   bash examples/01_preprocess.sh && sudo bash tools/local_slurm.sh && mkdir -p logs
#   RECIPE=examples/slurm/cpu_tiny_args.sh NGPU=2 PATH=$PWD/.venv/bin:$PATH \
#     sbatch --nodes 1 --gpus-per-node 0 --cpus-per-task 2 examples/slurm/train_emo.sbatch
# Env: DATA_PATH (preprocessed prefix; default 01_preprocess.sh's), TOKENIZER_TYPE
# (SentencePieceTokenizer; or NullTokenizer with VOCAB_SIZE), TOKENIZER_MODEL, RUN_DIR,
# TRAIN_ITERS, SAVE_INTERVAL, EP, EXIT_INTERVAL (stop and save after that many iterations, like a
# job reaching its time limit; resubmit to resume).
if [ "${BASH_SOURCE[0]}" = "$0" ]; then
    echo "source this file (train_emo.sbatch does)" >&2
    exit 1
fi

RUN_DIR=${RUN_DIR:-runs/cpu_tiny}
DATA_PATH=${DATA_PATH:-runs/data/emo_sample_text_document}
TOKENIZER_TYPE=${TOKENIZER_TYPE:-SentencePieceTokenizer}
TRAIN_ITERS=${TRAIN_ITERS:-20}
SAVE_INTERVAL=${SAVE_INTERVAL:-$TRAIN_ITERS}

source "$(dirname "${BASH_SOURCE[0]}")/../cpu_args.sh"   # CPU_ARGS (model arrays replaced below)
MODEL_ARGS=(
    --num-layers 2 --hidden-size 64 --num-attention-heads 4 --ffn-hidden-size 128
    --seq-length 64 --max-position-embeddings 64
    --normalization RMSNorm --swiglu --position-embedding-type rope
    --untie-embeddings-and-output-weights --disable-bias-linear
    --hidden-dropout 0 --attention-dropout 0
)
# The recipe's EP-balanced layout: 7 routed + 1 never-routed padding expert (8 divide EP 2, 4,
# 8) + Megatron's SharedExpertMLP; top-2 routed + shared; pools 2..7 in training, 4 in evaluation.
MOE_ARGS=(
    --num-experts 8 --moe-ffn-hidden-size 64 --moe-router-topk 2
    --moe-shared-expert-intermediate-size 64
    --moe-router-load-balancing-type aux_loss --moe-aux-loss-coeff 0.01 --moe-z-loss-coeff 1e-3
    --moe-router-dtype fp32 --moe-token-dispatcher-type alltoall
    --expert-model-parallel-size "${EP:-2}"
)
EMO_ARGS=(
    --emo-routing "${ROUTING:-emo}" --emo-num-shared-experts 0 --emo-num-padding-experts 1
    --emo-pool-size-min 2 --emo-pool-size-max 7 --emo-pool-size-eval 4
)
DATA_ARGS=(
    --data-path "$DATA_PATH" --split 98,1,1 --tokenizer-type "$TOKENIZER_TYPE"
    --dataloader-inter-document-masking --data-cache-path "$RUN_DIR/data_cache"
)
if [ "$TOKENIZER_TYPE" = NullTokenizer ]; then
    DATA_ARGS+=(--vocab-size "${VOCAB_SIZE:?NullTokenizer needs VOCAB_SIZE}")
else
    DATA_ARGS+=(--tokenizer-model "${TOKENIZER_MODEL:-runs/data/tokenizer.model}")
fi
TRAINING_ARGS=(
    --micro-batch-size 2 --global-batch-size 4 --train-iters "$TRAIN_ITERS"
    --lr 3e-3 --min-lr 3e-4 --lr-decay-style cosine --lr-warmup-iters 2
    --weight-decay 0.1 --seed 1234
    --use-distributed-optimizer
)
LOGGING_ARGS=(
    --save "$RUN_DIR/checkpoints" --load "$RUN_DIR/checkpoints" --save-interval "$SAVE_INTERVAL"
    --ckpt-format torch_dist --dist-ckpt-optim-fully-reshardable
    --log-interval 1 --eval-interval 1000 --eval-iters 1
    --tensorboard-dir "$RUN_DIR/tensorboard"
)
if [ -n "${EXIT_INTERVAL:-}" ]; then
    LOGGING_ARGS+=(--exit-interval "$EXIT_INTERVAL")
fi
ARGS=("${CPU_ARGS[@]}" "${MODEL_ARGS[@]}" "${MOE_ARGS[@]}" "${EMO_ARGS[@]}" "${DATA_ARGS[@]}"
      "${TRAINING_ARGS[@]}" "${LOGGING_ARGS[@]}")
