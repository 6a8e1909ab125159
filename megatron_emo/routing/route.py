"""EMO token routing: top-k inside the document pool, shared experts always on.

Megatron's output format: ``probs`` ``(T, E)`` with zeros off the map and ``routing_map``
``(T, E)`` bool. The last ``num_shared_experts`` columns of the logits are shared experts.

Shape legend: T tokens, E experts (routed + shared), R = E - S routed experts, K routed slots per
token (topk - S), D documents.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal, NamedTuple

import torch

from megatron_emo.routing.pool import document_pools
from megatron_emo.routing.ranking import topk_lowest_index

__all__ = ["EMORouting", "emo_route", "route_within_pools"]


class EMORouting(NamedTuple):
    """Everything one routing call produces; the router attaches losses to it.

    Attributes:
        probs: ``(T, E)`` routing weights, zero off ``routing_map``; shared columns are 1.0.
        routing_map: ``(T, E)`` bool, the selected experts (shared ones always True).
        scores: ``(T, R)`` routed scores after pool masking (zero outside the pool), fp32,
            differentiable: the ``P`` factor of the load-balancing loss (sigmoid scores are
            normalised to sum 1 per token).
        routed_map: ``(T, R)`` bool, the routed part of ``routing_map``.
        masked_logits: ``(T, R)`` fp32 routed logits with ``-inf`` outside the pool (z-loss input).
    """

    probs: torch.Tensor
    routing_map: torch.Tensor
    scores: torch.Tensor
    routed_map: torch.Tensor
    masked_logits: torch.Tensor


def route_within_pools(
    logits_TE: torch.Tensor,
    in_pool_TR: torch.Tensor,
    *,
    topk: int,
    num_shared_experts: int,
    renormalize: bool = False,
    score_function: Literal["softmax", "sigmoid"] = "softmax",
    expert_bias_R: torch.Tensor | None = None,
    scaling_factor: float | None = None,
) -> EMORouting:
    """Top-(topk - S) routed experts per token among its pool, plus the S shared experts.

    Softmax scoring (EMO): ``s = softmax`` over the pool-masked routed logits, so the pool is
    renormalised and experts outside it get exactly 0; the chosen experts keep their ``s``
    (they sum to <= 1) unless ``renormalize``. Sigmoid scoring (for aux-loss-free expert bias):
    ``s = sigmoid(z)`` inside the pool, chosen weights renormalised to sum 1 when there is more
    than one routed slot (Megatron's rule).
    An expert bias only changes the selection, and the pool mask is applied after it, so a
    bias can never lift an expert outside the pool.

    Args:
        logits_TE: ``(T, E)`` router logits.
        in_pool_TR: ``(T, R)`` bool pool membership (``document_pool_mask``); all True = no pools.
        topk: experts per token including the shared ones.
        num_shared_experts: S, the last S columns; weight exactly 1.0, always selected.
        renormalize: renormalise the chosen routed weights to sum 1.
        score_function: ``"softmax"`` (EMO) or ``"sigmoid"``.
        expert_bias_R: optional ``(R,)`` selection bias (aux-loss-free balancing).
        scaling_factor: optional multiplier of the routed weights.

    Returns:
        An ``EMORouting``; ``probs`` has the dtype of ``logits_TE``.
    """
    num_routed = logits_TE.shape[1] - num_shared_experts
    _check_slots(topk, num_shared_experts, num_routed)
    routed_logits_TR = logits_TE[:, :num_routed].float()
    masked_logits_TR = torch.where(in_pool_TR, routed_logits_TR, float("-inf"))
    return _route_masked(
        logits_TE,
        masked_logits_TR,
        in_pool_TR,
        num_slots=topk - num_shared_experts,
        renormalize=renormalize,
        score_function=score_function,
        expert_bias_R=expert_bias_R,
        scaling_factor=scaling_factor,
    )


def _check_slots(topk: int, num_shared_experts: int, num_routed: int) -> None:
    num_slots = topk - num_shared_experts
    if not 1 <= num_slots <= num_routed:
        raise ValueError(
            f"topk ({topk}) - num_shared_experts ({num_shared_experts}) must be in "
            f"[1, routed experts ({num_routed})]"
        )


def _route_masked(
    logits_TE: torch.Tensor,
    masked_logits_TR: torch.Tensor,
    in_pool_TR: torch.Tensor | None,
    *,
    num_slots: int,
    renormalize: bool,
    score_function: str,
    expert_bias_R: torch.Tensor | None,
    scaling_factor: float | None,
) -> EMORouting:
    """``route_within_pools`` after the masking (``in_pool_TR`` only for sigmoid / bias)."""
    num_tokens, num_experts = logits_TE.shape
    num_routed = masked_logits_TR.shape[1]
    if score_function == "softmax":
        scores_TR = torch.softmax(masked_logits_TR, dim=-1)
    elif score_function == "sigmoid":
        scores_TR = torch.sigmoid(logits_TE[:, :num_routed].float()) * in_pool_TR
    else:
        raise ValueError(f"score_function must be 'softmax' or 'sigmoid', got {score_function!r}")

    with torch.no_grad():
        if expert_bias_R is None:
            # Both score functions are strictly increasing in the logit, so the masked logits
            # rank exactly like the scores, without the rounding of the exp (the fused kernel
            # selects on the same values).
            selection_TR = masked_logits_TR
        else:
            # Outside the pool is never selectable, whatever the bias.
            selection_TR = torch.where(
                in_pool_TR, scores_TR.detach() + expert_bias_R.float(), float("-inf")
            )
        top_idx_TK = topk_lowest_index(selection_TR, num_slots)

    weights_TK = scores_TR.gather(1, top_idx_TK)
    # Sigmoid weights are renormalised over the chosen experts except with one slot (Megatron's
    # rule, moe_utils.py topk_routing_with_score_function): a lone weight of 1.0 would give the
    # router no gradient from the LM loss.
    if renormalize or (score_function == "sigmoid" and num_slots > 1):
        weights_TK = weights_TK / (weights_TK.sum(dim=-1, keepdim=True) + 1e-20)
    if scaling_factor is not None:
        weights_TK = weights_TK * scaling_factor

    # The (T, E) outputs are written in place (no concatenation): routed columns by scatter,
    # the S shared columns set to weight 1.0 / always selected.
    probs_TE = scores_TR.new_zeros((num_tokens, num_experts))
    routing_map_TE = torch.zeros(
        (num_tokens, num_experts), dtype=torch.bool, device=masked_logits_TR.device
    )
    if num_experts > num_routed:
        probs_TE[:, num_routed:] = 1.0
        routing_map_TE[:, num_routed:] = True
    probs_TE.scatter_(1, top_idx_TK, weights_TK)
    routing_map_TE.scatter_(1, top_idx_TK, True)
    if score_function == "sigmoid":
        # The load-balancing loss balances normalised sigmoid scores, as Megatron
        # (compute_routing_scores_for_aux_loss) and the reference do: raw scores would make a
        # uniform router's loss R/2 instead of 1.
        scores_TR = scores_TR / (scores_TR.sum(dim=-1, keepdim=True) + 1e-20)
    return EMORouting(
        probs=probs_TE.to(logits_TE.dtype),
        routing_map=routing_map_TE,
        scores=scores_TR,
        routed_map=routing_map_TE[:, :num_routed],
        masked_logits=masked_logits_TR,
    )


def emo_route(
    logits: torch.Tensor,
    doc_ids: torch.Tensor,
    pool_sizes: torch.Tensor,
    *,
    topk: int,
    num_shared_experts: int = 1,
    reduce_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
    renormalize: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """EMO document-pool routing (``emo_spec.md`` 1.2), vectorised, no host sync.

    1. softmax over the routed logits in fp32, summed per document (``reduce_fn`` all-reduces
       the per-document sums when documents span ranks);
    2. keep each document's top-P routed experts (``P >= R``: no masking), mask the rest to -inf;
    3. softmax over the masked routed logits; take the top (topk - S) routed experts with their
       masked-softmax probabilities (renormalised only if ``renormalize``);
    4. the S shared experts (last columns) are always selected with probability exactly 1.0.

    Args:
        logits: ``(T, E)`` float router logits; the last ``num_shared_experts`` columns are the
            shared experts.
        doc_ids: ``(T,)`` int64 document ids in ``[0, D)``.
        pool_sizes: ``(D,)`` int64 pool size of each document, counted in routed experts; must be
            ``>= topk - num_shared_experts``.
        topk: experts per token including shared ones (EMO: 8 = 7 routed + 1 shared).
        num_shared_experts: S; 0 when shared experts are computed outside the router (Megatron's
            ``SharedExpertMLP``).
        reduce_fn: all-reduce for the ``(D, R)`` per-document partial sums; identity if None.
        renormalize: renormalise the chosen routed probabilities to sum 1.

    Returns:
        ``(probs, routing_map)``: ``(T, E)`` float with zeros off the map, ``(T, E)`` bool.
    """
    num_routed = logits.shape[1] - num_shared_experts
    _check_slots(topk, num_shared_experts, num_routed)
    routed_logits_TR = logits[:, :num_routed].float()
    in_pool_DR = document_pools(routed_logits_TR, doc_ids, pool_sizes, reduce_fn=reduce_fn)
    # Mask by adding 0 / -inf gathered per token (in place into the gathered buffer): several
    # times faster on CPU than a bool where/masked_fill over (T, R). The gradient reaches the
    # logits where the mask is 0 (softmax gives the -inf entries zero gradient anyway).
    bias_DR = torch.zeros(in_pool_DR.shape, dtype=torch.float32, device=in_pool_DR.device)
    bias_DR.masked_fill_(~in_pool_DR, float("-inf"))
    masked_logits_TR = bias_DR.index_select(0, doc_ids).add_(routed_logits_TR)
    result = _route_masked(
        logits,
        masked_logits_TR,
        None,
        num_slots=topk - num_shared_experts,
        renormalize=renormalize,
        score_function="softmax",
        expert_bias_R=None,
        scaling_factor=None,
    )
    return result.probs, result.routing_map
