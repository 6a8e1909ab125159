"""EMO auxiliary losses: global load balancing over routed slots and router z-loss.

Load balancing (``emo_spec.md`` 2.2) for one layer and one micro-batch:

    L_lb = (R / K) * sum_e f_e * P_e,   f_e = N_e / N,   P_e = mean_t s_{t,e}

N_e counts the (token, routed slot) assignments to routed expert e and N the tokens, both summed
over every rank that holds tokens of the same step (``reduce_fn``: the data-parallel group, plus
TP/CP shards), so the balance is global while documents specialise. s are the pool-masked,
pool-renormalised scores, the only differentiable factor. Uniform routing gives L_lb = 1.

This function returns the rank's share computed with its local P_e; averaging it over ranks (what
data-parallel gradient averaging does) gives the gradient of L_lb with the global P_e, whatever
the number of ranks, when ranks hold equal token counts.

Shape legend: T tokens, R routed experts.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

__all__ = ["expert_load", "load_balancing_loss", "z_loss"]


def expert_load(
    routed_map_TR: torch.Tensor,
    *,
    reduce_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
    valid_T: torch.Tensor | None = None,
) -> torch.Tensor:
    """Routed-slot counts per expert and the token count, summed over the balancing domain.

    Args:
        routed_map_TR: ``(T, R)`` bool routed assignments (shared experts excluded).
        reduce_fn: sums over the ranks of the balancing domain; identity if None.
        valid_T: optional ``(T,)`` bool, False for padding tokens (not counted).

    Returns:
        ``(R + 1,)`` fp32: ``[N_0, ..., N_{R-1}, N]``, no gradient. Statistics of several
        micro-batches add up.
    """
    with torch.no_grad():
        counts_TR = routed_map_TR.float()
        if valid_T is not None:
            counts_TR = counts_TR * valid_T[:, None]
            num_tokens = valid_T.sum().float()
        else:
            # A device fill, not torch.tensor(python float, device=...): that is a blocking
            # host-to-device copy on CUDA.
            num_tokens = torch.full(
                (), float(routed_map_TR.shape[0]), dtype=torch.float32, device=routed_map_TR.device
            )
        # Counts and token count travel in one collective.
        load_R1 = torch.cat([counts_TR.sum(dim=0), num_tokens.reshape(1)])
        return reduce_fn(load_R1) if reduce_fn is not None else load_R1


def load_balancing_loss(
    scores_TR: torch.Tensor,
    routed_map_TR: torch.Tensor,
    *,
    topk: int,
    reduce_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
    valid_T: torch.Tensor | None = None,
    load_R1: torch.Tensor | None = None,
) -> torch.Tensor:
    """Switch-style load-balancing loss with globally reduced expert counts.

    Args:
        scores_TR: ``(T, R)`` pool-masked routed scores (differentiable).
        routed_map_TR: ``(T, R)`` bool routed assignments (shared experts excluded).
        topk: K, routed slots per token.
        reduce_fn: sums a tensor over the ranks of the balancing domain (no gradient flows
            through it); identity if None.
        valid_T: optional ``(T,)`` bool, False for padding tokens (excluded from both factors).
        load_R1: optional precomputed ``expert_load`` (for example accumulated over the
            micro-batches of a step); when given, ``routed_map_TR`` and ``reduce_fn`` are unused.

    Returns:
        Scalar fp32 loss (this rank's share; see the module docstring).
    """
    num_routed = scores_TR.shape[1]
    if load_R1 is None:
        load_R1 = expert_load(routed_map_TR, reduce_fn=reduce_fn, valid_T=valid_T)
    frac_R = load_R1[:num_routed] / load_R1[num_routed].clamp(min=1.0)
    scores_TR = scores_TR.float()
    if valid_T is not None:
        scores_TR = scores_TR * valid_T[:, None]
        num_local = valid_T.sum().float().clamp(min=1.0)
    else:
        num_local = max(scores_TR.shape[0], 1)
    mean_scores_R = scores_TR.sum(dim=0) / num_local
    return (num_routed / topk) * torch.sum(frac_R * mean_scores_R)


def z_loss(masked_logits_TR: torch.Tensor, *, valid_T: torch.Tensor | None = None) -> torch.Tensor:
    """Router z-loss on the pool-masked routed logits: mean over tokens of logsumexp squared.

    Experts outside the pool (``-inf``) do not count (``emo_spec.md`` 2.4).

    Args:
        masked_logits_TR: ``(T, R)`` routed logits with ``-inf`` outside the pool.
        valid_T: optional ``(T,)`` bool, False for padding tokens.

    Returns:
        Scalar fp32 loss.
    """
    lse_T = torch.logsumexp(masked_logits_TR.float(), dim=-1)
    sq_T = lse_T.square()
    if valid_T is None:
        return sq_T.mean()
    return (sq_T * valid_T).sum() / valid_T.sum().clamp(min=1)
