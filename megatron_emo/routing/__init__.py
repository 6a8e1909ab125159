"""EMO routing math: pure torch on one device (no megatron, no torch.distributed).

Collectives are injected as ``reduce_fn`` callables by ``megatron_emo.parallel``.
"""

from megatron_emo.routing.documents import (
    DocumentBatch,
    doc_ids_from_cu_seqlens,
    doc_ids_from_eod,
    segment_sum,
)
from megatron_emo.routing.losses import expert_load, load_balancing_loss, z_loss
from megatron_emo.routing.metrics import ROUTING_METRIC_NAMES, routing_metrics
from megatron_emo.routing.pool import document_pool_mask, eval_pool_sizes, sample_pool_sizes
from megatron_emo.routing.route import EMORouting, emo_route, route_within_pools

__all__ = [
    "DocumentBatch",
    "EMORouting",
    "ROUTING_METRIC_NAMES",
    "doc_ids_from_cu_seqlens",
    "doc_ids_from_eod",
    "document_pool_mask",
    "emo_route",
    "eval_pool_sizes",
    "expert_load",
    "load_balancing_loss",
    "route_within_pools",
    "routing_metrics",
    "sample_pool_sizes",
    "segment_sum",
    "z_loss",
]
