"""The one EMO ``GPTModel`` factory: EMO layer spec, ``GPTModel``, and an injected adapter.

Training (``training/model_provider.py``), the tests and the benchmarks build through
``build_emo_gpt_model``. A backend that needs other module classes (the CPU backend,
``megatron_emo.cpu.CPU_MODEL_ADAPTER``) passes a ``ModelAdapter``; mcore never imports it.

Megatron symbols: ``models.gpt.GPTModel``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch
from megatron.core.models.gpt import GPTModel

from megatron_emo.mcore.config import EMOTransformerConfig
from megatron_emo.mcore.specs import get_emo_layer_spec

__all__ = ["ModelAdapter", "build_emo_gpt_model"]


def _unchanged(obj: Any) -> Any:
    return obj


@dataclasses.dataclass(frozen=True)
class ModelAdapter:
    """Hooks that adapt a build to a backend.

    Attributes:
        adapt_spec: maps the block spec to the one to build (must not modify its input).
        adapt_model: adapts the built model in place and returns it.
    """

    adapt_spec: Callable[[Any], Any] = _unchanged
    adapt_model: Callable[[torch.nn.Module], torch.nn.Module] = _unchanged


def build_emo_gpt_model(
    config: EMOTransformerConfig,
    *,
    vocab_size: int,
    max_sequence_length: int,
    pre_process: bool = True,
    post_process: bool = True,
    use_transformer_engine: bool | None = None,
    vp_stage: int | None = None,
    pg_collection: Any = None,
    adapter: ModelAdapter | None = None,
    **gpt_kwargs: Any,
) -> GPTModel:
    """This pipeline stage's ``GPTModel`` with ``EMORouter`` in every MoE layer.

    Consumes no random numbers besides ``GPTModel``'s own initialisation, so a caller's seed
    fixes the weights.

    Args:
        config: the model config.
        vocab_size: vocabulary size (padded, as Megatron expects).
        max_sequence_length: maximum sequence length (position embeddings).
        pre_process: whether this stage holds the embedding.
        post_process: whether this stage holds the output layer and loss.
        use_transformer_engine: TE or local spec; None: TE when ``config.transformer_impl`` asks
            for it and TE imports (``get_emo_layer_spec``).
        vp_stage: virtual pipeline stage.
        pg_collection: process groups, passed down to the model (None: Megatron's mpu groups).
        adapter: backend hooks for the spec and the built model (None: none).
        **gpt_kwargs: further ``GPTModel`` arguments (``position_embedding_type``,
            ``rotary_base``, ``share_embeddings_and_output_weights``, ...).

    Returns:
        The model, adapted by ``adapter``.
    """
    adapter = adapter or ModelAdapter()
    spec = get_emo_layer_spec(
        config, vp_stage=vp_stage, use_transformer_engine=use_transformer_engine
    )
    model = GPTModel(
        config=config,
        transformer_layer_spec=adapter.adapt_spec(spec),
        vocab_size=vocab_size,
        max_sequence_length=max_sequence_length,
        pre_process=pre_process,
        post_process=post_process,
        pg_collection=pg_collection,
        vp_stage=vp_stage,
        **gpt_kwargs,
    )
    return adapter.adapt_model(model)
