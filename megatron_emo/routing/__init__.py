"""EMO routing math: pure torch on one device (no megatron, no torch.distributed).

Collectives are injected as ``reduce_fn`` callables by ``megatron_emo.parallel``. The fused
Triton path (``megatron_emo.routing.fused``) is imported on demand, never by this package.
"""

from megatron_emo.routing.documents import (
    DocumentBatch,
    doc_ids_from_cu_seqlens,
    doc_ids_from_eod,
    segment_sum,
)
from megatron_emo.routing.losses import expert_load, load_balancing_loss, z_loss
from megatron_emo.routing.metrics import ROUTING_METRIC_NAMES, routing_metrics
from megatron_emo.routing.pool import (
    document_pool_mask,
    document_pools,
    eval_pool_sizes,
    pool_mask_from_scores,
    sample_pool_sizes,
)
from megatron_emo.routing.ranking import descending_keys, topk_lowest_index
from megatron_emo.routing.route import EMORouting, emo_route, route_within_pools

__all__ = [
    "DocumentBatch",
    "EMORouting",
    "ROUTING_METRIC_NAMES",
    "descending_keys",
    "doc_ids_from_cu_seqlens",
    "doc_ids_from_eod",
    "document_pool_mask",
    "document_pools",
    "emo_route",
    "eval_pool_sizes",
    "expert_load",
    "load_balancing_loss",
    "pool_mask_from_scores",
    "route_within_pools",
    "routing_metrics",
    "sample_pool_sizes",
    "segment_sum",
    "topk_lowest_index",
    "z_loss",
]
