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

__all__ = ["load_balancing_loss", "z_loss"]


def load_balancing_loss(
    scores_TR: torch.Tensor,
    routed_map_TR: torch.Tensor,
    *,
    topk: int,
    reduce_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
    valid_T: torch.Tensor | None = None,
) -> torch.Tensor:
    """Switch-style load-balancing loss with globally reduced expert counts.

    Args:
        scores_TR: ``(T, R)`` pool-masked routed scores (differentiable).
        routed_map_TR: ``(T, R)`` bool routed assignments (shared experts excluded).
        topk: K, routed slots per token.
        reduce_fn: sums a tensor over the ranks of the balancing domain (no gradient flows
            through it); identity if None.
        valid_T: optional ``(T,)`` bool, False for padding tokens (excluded from both factors).

    Returns:
        Scalar fp32 loss (this rank's share; see the module docstring).
    """
    num_routed = scores_TR.shape[1]
    scores_TR = scores_TR.float()
    with torch.no_grad():
        routed_map_TR = routed_map_TR.float()
        if valid_T is not None:
            routed_map_TR = routed_map_TR * valid_T[:, None]
            num_local = valid_T.sum().float()
        else:
            num_local = torch.tensor(float(scores_TR.shape[0]), device=scores_TR.device)
        # Counts and token count travel in one collective.
        stats_R1 = torch.cat([routed_map_TR.sum(dim=0), num_local.reshape(1)])
        if reduce_fn is not None:
            stats_R1 = reduce_fn(stats_R1)
        frac_R = stats_R1[:num_routed] / stats_R1[num_routed].clamp(min=1.0)
    if valid_T is not None:
        scores_TR = scores_TR * valid_T[:, None]
    mean_scores_R = scores_TR.sum(dim=0) / num_local.clamp(min=1.0)
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
