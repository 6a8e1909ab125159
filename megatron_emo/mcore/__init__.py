"""Megatron-Core adapters for the model.

The EMO config, router, layer specs, model factory and the process-group bootstrap.

Other packages import ``megatron.core`` only for other purposes: ``megatron_emo.cpu`` (the CPU
backend, enabled explicitly) subclasses and patches it, ``training/`` hooks into
megatron.training, and ``conversion/``, ``preprocessing/`` and ``subsets/`` use its checkpoint and
dataset IO. Pinned to megatron-core 0.19.2; each module's docstring lists the Megatron symbols
it uses.
"""

from megatron_emo.mcore.config import EMOTransformerConfig
from megatron_emo.mcore.model import ModelAdapter, build_emo_gpt_model
from megatron_emo.mcore.router import EMORouter
from megatron_emo.mcore.routing_context import (
    RoutingMetricsTracker,
    current_context,
    routing_context,
)
from megatron_emo.mcore.specs import (
    get_emo_layer_spec,
    transformer_engine_importable,
    with_emo_router,
)

__all__ = [
    "EMORouter",
    "EMOTransformerConfig",
    "ModelAdapter",
    "RoutingMetricsTracker",
    "build_emo_gpt_model",
    "current_context",
    "get_emo_layer_spec",
    "routing_context",
    "transformer_engine_importable",
    "with_emo_router",
]
