"""Routing diagnostics of one layer and micro-batch, as device tensors (no host sync).

Shape legend: T tokens, R routed experts, D documents.
"""

from __future__ import annotations

from collections.abc import Callable

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
    *,
    reduce_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """EMO routing diagnostics of one layer.

    The per-document statistics are of whole documents: when a document's tokens are spread
    over SP/CP shards, ``reduce_fn`` sums the ``(D, R)`` partial sums over the shards (a shard
    alone would count a document without tokens on it as using no expert).

    Args:
        scores_TR: ``(T, R)`` routing probabilities over the routed experts (inside the pool).
        routed_map_TR: ``(T, R)`` bool, the routed experts each token uses.
        in_pool_TR: ``(T, R)`` bool, the token's document pool.
        doc_ids_T: ``(T,)`` int64 document ids in ``[0, D)``.
        pool_sizes_D: ``(D,)`` pool sizes (all R for standard routing).
        reduce_fn: sums the per-document partial sums over the ranks that hold shards of the
            same documents; identity if None.

    Returns:
        0-dim float32 tensors ``pool_size_mean``, ``experts_per_document`` (distinct routed
        experts a document's tokens use, mean over documents), ``document_routing_entropy``
        (entropy in nats of a document's summed routing probabilities, mean over documents),
        ``expert_load_max_over_mean`` (tokens of the busiest expert / mean tokens per expert),
        ``in_pool_fraction`` (routed choices inside the token's pool: 1.0 unless routing is
        broken), plus ``expert_load`` ``(R,)`` token counts per expert.
    """
    num_docs = pool_sizes_D.shape[0]
    num_routed = routed_map_TR.shape[1]
    routed_f_TR = routed_map_TR.float()
    uses_DR = segment_sum(routed_f_TR, doc_ids_T, num_docs)
    mass_DR = segment_sum(scores_TR.float().detach(), doc_ids_T, num_docs)
    if reduce_fn is not None:
        # Both partial sums travel in one collective.
        both_D2R = reduce_fn(torch.cat([uses_DR, mass_DR], dim=1))
        uses_DR, mass_DR = both_D2R[:, :num_routed], both_D2R[:, num_routed:]
    used_DR = uses_DR > 0
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
