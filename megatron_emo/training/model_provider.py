"""Model provider for ``pretrain()``: ``GPTModel`` with ``EMOTransformerConfig`` and the EMO spec.

The Transformer Engine spec (grouped-GEMM experts, FP8) is used with
``--transformer-impl transformer_engine`` when TE imports; the local spec otherwise. With
``--cpu`` the build gets the CPU backend's norm, RoPE and dispatcher classes
(``megatron_emo.cpu.CPU_MODEL_ADAPTER``). The model itself comes from
``megatron_emo.mcore.build_emo_gpt_model``.

Megatron symbols: ``core.models.gpt.GPTModel``, ``training.get_args``,
``training.arguments.core_transformer_config_from_args``.
"""

from __future__ import annotations

from megatron.core.models.gpt import GPTModel
from megatron.training import get_args
from megatron.training.arguments import core_transformer_config_from_args

from megatron_emo.mcore import EMOTransformerConfig, build_emo_gpt_model

__all__ = ["emo_config_from_args", "model_provider"]


def emo_config_from_args(args) -> EMOTransformerConfig:
    """``EMOTransformerConfig`` from Megatron + ``--emo-*`` arguments (its checks run here)."""
    return core_transformer_config_from_args(args, EMOTransformerConfig)


def model_provider(
    pre_process: bool = True,
    post_process: bool = True,
    vp_stage: int | None = None,
    config: EMOTransformerConfig | None = None,
    pg_collection=None,
) -> GPTModel:
    """Builds this pipeline stage's EMO ``GPTModel`` (Megatron's ``model_provider`` contract).

    Args:
        pre_process: whether this stage holds the embedding.
        post_process: whether this stage holds the output layer and loss.
        vp_stage: virtual pipeline stage.
        config: a prebuilt config; built from the arguments when None.
        pg_collection: process groups, passed down to the model.

    Returns:
        The model, on CPU classes when ``--cpu``.
    """
    args = get_args()
    if config is None:
        config = emo_config_from_args(args)
    adapter = None
    if args.cpu:  # the CPU backend is imported only for --cpu runs
        from megatron_emo.cpu import CPU_MODEL_ADAPTER

        adapter = CPU_MODEL_ADAPTER

    return build_emo_gpt_model(
        config,
        vocab_size=args.padded_vocab_size,
        max_sequence_length=args.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        fp16_lm_cross_entropy=args.fp16_lm_cross_entropy,
        parallel_output=True,
        share_embeddings_and_output_weights=not args.untie_embeddings_and_output_weights,
        position_embedding_type=args.position_embedding_type,
        rotary_percent=args.rotary_percent,
        rotary_base=args.rotary_base,
        rope_scaling=args.use_rope_scaling,
        pg_collection=pg_collection,
        vp_stage=vp_stage,
        adapter=adapter,
    )
