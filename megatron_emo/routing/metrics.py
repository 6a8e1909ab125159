"""Routing diagnostics of one layer and micro-batch, as device tensors (no host sync).

Shape legend: T tokens, R routed experts, D documents.
"""

from __future__ import annotations

import torch

from megatron_emo.routing.documents import segment_sum

__all__ = ["ROUTING_METRIC_NAMES", "routing_metrics"]

ROUTING_METRIC_NAMES = (
    "pool_size_mean",
    "experts_per_document",
    "document_routing_entropy",
    "expert_load_max_over_mean",
    "in_pool_fraction",
)


def routing_metrics(
    scores_TR: torch.Tensor,
    routed_map_TR: torch.Tensor,
    in_pool_TR: torch.Tensor,
    doc_ids_T: torch.Tensor,
    pool_sizes_D: torch.Tensor,
) -> dict[str, torch.Tensor]:
    """EMO routing diagnostics of one layer.

    Args:
        scores_TR: ``(T, R)`` routing probabilities over the routed experts (inside the pool).
        routed_map_TR: ``(T, R)`` bool, the routed experts each token uses.
        in_pool_TR: ``(T, R)`` bool, the token's document pool.
        doc_ids_T: ``(T,)`` int64 document ids in ``[0, D)``.
        pool_sizes_D: ``(D,)`` pool sizes (all R for standard routing).

    Returns:
        0-dim float32 tensors ``pool_size_mean``, ``experts_per_document`` (distinct routed
        experts a document's tokens use, mean over documents), ``document_routing_entropy``
        (entropy in nats of a document's summed routing probabilities, mean over documents),
        ``expert_load_max_over_mean`` (tokens of the busiest expert / mean tokens per expert),
        ``in_pool_fraction`` (routed choices inside the token's pool: 1.0 unless routing is
        broken), plus ``expert_load`` ``(R,)`` token counts per expert.
    """
    num_docs = pool_sizes_D.shape[0]
    routed_f_TR = routed_map_TR.float()
    used_DR = segment_sum(routed_f_TR, doc_ids_T, num_docs) > 0
    mass_DR = segment_sum(scores_TR.float().detach(), doc_ids_T, num_docs)
    dist_DR = mass_DR / mass_DR.sum(-1, keepdim=True).clamp_min(1e-20)
    entropy_D = -(dist_DR * dist_DR.clamp_min(1e-20).log()).sum(-1)
    load_R = routed_f_TR.sum(0)
    num_choices = routed_f_TR.sum()
    return {
        "pool_size_mean": pool_sizes_D.float().mean(),
        "experts_per_document": used_DR.float().sum(-1).mean(),
        "document_routing_entropy": entropy_D.mean(),
        "expert_load_max_over_mean": load_R.max() / load_R.mean().clamp_min(1e-20),
        "in_pool_fraction": (routed_map_TR & in_pool_TR).float().sum() / num_choices.clamp_min(1),
        "expert_load": load_R,
    }
