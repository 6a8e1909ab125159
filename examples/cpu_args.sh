#!/usr/bin/env bash
# Sourced by the CPU examples (00_quickstart_cpu.sh, 05_finetune_subset.sh, 06_emo_anneal.sh,
# slurm/cpu_tiny_args.sh), never run. Defines:
#   CPU_ARGS                        what every `--cpu` run needs (local spec, no CUDA fusions,
#                                   --clip-grad 0: megatron's clip_grads.py accepts CUDA only)
#   MODEL_ARGS MOE_ARGS EMO_ARGS    the quickstart model, which 06_emo_anneal.sh continues (the
#                                   flags must match the checkpoint: Megatron checks the shapes)
# EMO_ARGS reads ROUTING (emo | standard; default emo).
if [ "${BASH_SOURCE[0]}" = "$0" ]; then
    echo "source this file (the CPU examples do)" >&2
    exit 1
fi

CPU_ARGS=(
    --cpu --transformer-impl local --attention-backend local --spec local
    --use-cpu-initialization --clip-grad 0
    --no-gradient-accumulation-fusion --no-masked-softmax-fusion --no-bias-swiglu-fusion
    --no-bias-dropout-fusion --no-rope-fusion --no-persist-layer-norm
)
MODEL_ARGS=(
    --num-layers 4 --hidden-size 128 --num-attention-heads 4 --ffn-hidden-size 512
    --seq-length 256 --max-position-embeddings 256
    --normalization RMSNorm --norm-epsilon 1e-6 --swiglu
    --position-embedding-type rope --rotary-base 500000
    --untie-embeddings-and-output-weights --disable-bias-linear
    --hidden-dropout 0 --attention-dropout 0
)
# The recipe's EP-balanced layout, scaled down: 15 routed experts + 1 never-routed padding
# expert (16 divide every EP size up to 16) + Megatron's SharedExpertMLP (the shared expert,
# weight 1.0 on every token); top-3 routed + shared = 4 experts per token. Pools 3..15 in
# training, 4 (about 25%) in evaluation. The HF export has 16 experts (15 routed + 1 shared).
MOE_ARGS=(
    --num-experts 16 --moe-ffn-hidden-size 128 --moe-router-topk 3
    --moe-shared-expert-intermediate-size 128
    --moe-router-load-balancing-type aux_loss --moe-aux-loss-coeff 0.1 --moe-z-loss-coeff 1e-3
    --moe-router-dtype fp32 --moe-token-dispatcher-type alltoall
)
EMO_ARGS=(
    --emo-routing "${ROUTING:-emo}" --emo-num-shared-experts 0 --emo-num-padding-experts 1
    --emo-pool-size-min 3 --emo-pool-size-max 15 --emo-pool-size-eval 4
)
