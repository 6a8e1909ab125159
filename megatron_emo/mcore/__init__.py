"""Megatron-Core adapters: the only package of megatron_emo that imports ``megatron.core``.

Pinned to megatron-core 0.19.2; each module's docstring lists the Megatron symbols it uses.
"""

from megatron_emo.mcore.config import EMOTransformerConfig
from megatron_emo.mcore.router import EMORouter
from megatron_emo.mcore.routing_context import (
    RoutingMetricsTracker,
    current_context,
    routing_context,
)
from megatron_emo.mcore.specs import get_emo_layer_spec, with_emo_router

__all__ = [
    "EMORouter",
    "EMOTransformerConfig",
    "RoutingMetricsTracker",
    "current_context",
    "get_emo_layer_spec",
    "routing_context",
    "with_emo_router",
]
