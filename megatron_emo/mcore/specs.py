"""Layer specs with ``EMORouter`` in every MoE layer, for the local and Transformer Engine specs.

Usable from our model provider and from megatron.training's
``--spec megatron_emo.mcore.specs get_emo_layer_spec``.

Megatron symbols: ``models.gpt.gpt_layer_specs.{get_gpt_decoder_block_spec,
get_gpt_layer_local_spec}``, ``transformer.moe.moe_layer.{MoELayer, MoESubmodules}``,
``transformer.spec_utils.ModuleSpec``, ``transformer.transformer_block.TransformerBlockSubmodules``.
In megatron-core 0.19 the MoE entry of a layer spec is ``functools.partial(MoELayer,
submodules=MoESubmodules(...))``; ``MoESubmodules.router`` selects the router class.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
from typing import Any

from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec
from megatron.core.transformer.moe.moe_layer import MoELayer, MoESubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules

from megatron_emo.mcore.config import EMOTransformerConfig
from megatron_emo.mcore.router import EMORouter

__all__ = [
    "get_emo_layer_spec",
    "is_moe_mlp",
    "transformer_engine_importable",
    "with_emo_router",
]


def is_moe_mlp(mlp: Any) -> bool:
    """True when a layer spec's ``mlp`` entry builds an ``MoELayer`` (or a subclass)."""
    func = mlp.func if isinstance(mlp, functools.partial) else getattr(mlp, "module", None)
    return isinstance(func, type) and issubclass(func, MoELayer)


def with_emo_router(layer_spec: ModuleSpec) -> ModuleSpec:
    """A copy of a transformer layer spec whose MoE MLP uses ``EMORouter``.

    Args:
        layer_spec: a ``ModuleSpec(TransformerLayer, ...)``, e.g. from
            ``get_gpt_layer_local_spec(num_experts=...)``; it is not modified.

    Returns:
        The new spec (dense layers come back as an unchanged copy).
    """
    layer_spec = copy.copy(layer_spec)
    layer_spec.submodules = copy.copy(layer_spec.submodules)
    mlp = layer_spec.submodules.mlp
    if not is_moe_mlp(mlp):
        return layer_spec
    if not isinstance(mlp, functools.partial):
        raise TypeError(f"expected a functools.partial(MoELayer, ...) MoE spec, got {mlp!r}")
    submodules: MoESubmodules = mlp.keywords["submodules"]
    keywords = dict(mlp.keywords, submodules=dataclasses.replace(submodules, router=EMORouter))
    layer_spec.submodules.mlp = functools.partial(mlp.func, *mlp.args, **keywords)
    return layer_spec


@functools.cache
def transformer_engine_importable() -> bool:
    """Whether Transformer Engine imports (the project's one probe; the answer is cached).

    TE is GPU-only: it is imported here, never at module import time. Any exception counts as
    "not importable": a broken TE install raises more than ``ImportError``.
    """
    try:
        import transformer_engine  # noqa: F401
    except Exception:  # noqa: BLE001
        return False
    return True


def _use_transformer_engine(config: EMOTransformerConfig) -> bool:
    return config.transformer_impl == "transformer_engine" and transformer_engine_importable()


def get_emo_layer_spec(
    config: Any,
    vp_stage: int | None = None,
    pp_rank: int | None = None,
    *,
    use_transformer_engine: bool | None = None,
) -> TransformerBlockSubmodules:
    """The GPT decoder block spec of ``config`` with ``EMORouter`` in every MoE layer.

    Args:
        config: an ``EMOTransformerConfig``, or an object holding one as ``.transformer``
            (megatron.training's ``GPTModelConfig``, as passed to ``--spec`` callables).
        vp_stage: virtual pipeline stage, forwarded to Megatron.
        pp_rank: pipeline rank, forwarded to Megatron.
        use_transformer_engine: TE spec (grouped GEMM experts, FP8) or local spec; defaults to
            TE when ``config.transformer_impl == 'transformer_engine'`` and TE is importable.

    Returns:
        ``TransformerBlockSubmodules`` for this pipeline stage.
    """
    config = getattr(config, "transformer", config)
    if not isinstance(config, EMOTransformerConfig):
        raise TypeError(
            f"get_emo_layer_spec needs an EMOTransformerConfig, got {type(config).__name__}"
        )
    if use_transformer_engine is None:
        use_transformer_engine = _use_transformer_engine(config)
    block = get_gpt_decoder_block_spec(
        config,
        use_transformer_engine=use_transformer_engine,
        normalization=config.normalization,
        vp_stage=vp_stage,
        pp_rank=pp_rank,
    )
    converted: dict[int, ModuleSpec] = {}  # Megatron shares one spec object between layers.
    layer_specs = []
    for spec in block.layer_specs:
        if id(spec) not in converted:
            converted[id(spec)] = with_emo_router(spec)
        layer_specs.append(converted[id(spec)])
    return dataclasses.replace(block, layer_specs=layer_specs)
