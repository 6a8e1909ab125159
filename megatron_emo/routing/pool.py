"""Per-document expert pools: reproducible pool sizes and the top-P pool mask.

Pool sizes come from a counter-based hash of (seed, iteration, layer, document key), not from a
stateful RNG, so the same document at the same step and layer gets the same pool size after a
resume, on another device, and under any TP/CP/EP/DP layout that feeds it the same key.

Shape legend: T tokens, R routed experts, D documents.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from megatron_emo.routing.documents import segment_sum
from megatron_emo.routing.ranking import descending_keys

__all__ = [
    "document_pool_mask",
    "document_pools",
    "eval_pool_sizes",
    "pool_mask_from_scores",
    "sample_pool_sizes",
]

_MASK32 = 0xFFFFFFFF


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """``(x * c) mod 2**32`` for int64 ``x`` in ``[0, 2**32)`` without int64 overflow."""
    lo = (x & 0xFFFF) * c
    hi = ((x >> 16) * c) & 0xFFFF
    return (lo + (hi << 16)) & _MASK32


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """The 'lowbias32' integer finaliser (good avalanche, bijective on 32 bits)."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def _mix32_int(x: int) -> int:
    """``_mix32`` on a Python int (the same arithmetic, for host-side constants)."""
    x ^= x >> 16
    x = (x * 0x7FEB352D) & _MASK32
    x ^= x >> 15
    x = (x * 0x846CA68B) & _MASK32
    return x ^ (x >> 16)


def _hash_words(prefix: list[int], words: list[torch.Tensor]) -> torch.Tensor:
    """Hashes 32-bit words (host ints first, then int64 tensors) to ``[0, 2**32)``.

    The host words (seed, iteration, layer) are folded on the host, so only the per-document
    words cost device kernels.
    """
    h = 0
    for w in prefix:
        h = _mix32_int(h ^ _mix32_int((w & _MASK32) ^ 0x9E3779B9))
    out = torch.full_like(words[0], h)
    for w in words:
        out = _mix32(out ^ _mix32((w & _MASK32) ^ 0x9E3779B9))
    return out


def sample_pool_sizes(
    doc_keys_D: torch.Tensor,
    *,
    seed: int,
    iteration: int,
    layer: int,
    min_size: int,
    max_size: int,
) -> torch.Tensor:
    """Draws one pool size per document, uniform on ``[min_size, max_size]`` (inclusive).

    Args:
        doc_keys_D: ``(D,)`` int64 keys that identify each document segment globally (the
            data pipeline's global document index); equal keys get equal sizes.
        seed: run seed.
        iteration: training iteration (pools are resampled every step).
        layer: MoE layer number (every layer draws its own pool size).
        min_size: smallest pool size, in routed experts.
        max_size: largest pool size, in routed experts.

    Returns:
        ``(D,)`` int64 pool sizes on the keys' device.

    Raises:
        ValueError: if ``min_size > max_size`` or ``min_size < 1``.
    """
    if not 1 <= min_size <= max_size:
        raise ValueError(f"need 1 <= min_size ({min_size}) <= max_size ({max_size})")
    keys = doc_keys_D.to(torch.int64)
    if min(seed, iteration, layer) < 0:
        raise ValueError(f"seed ({seed}), iteration ({iteration}) and layer ({layer}) must be >= 0")
    h = _hash_words([seed, seed >> 32, iteration, iteration >> 32, layer], [keys, keys >> 32])
    # Modulo bias is at most (max - min + 1) / 2**32: negligible.
    return min_size + torch.remainder(h, max_size - min_size + 1)


def eval_pool_sizes(
    num_docs: int, *, size: int, device: torch.device | str | None = None
) -> torch.Tensor:
    """The fixed evaluation pool size for every document, as a ``(D,)`` int64 tensor."""
    return torch.full((num_docs,), size, dtype=torch.int64, device=device)


def document_pools(
    routed_logits_TR: torch.Tensor,
    doc_ids_T: torch.Tensor,
    pool_sizes_D: torch.Tensor,
    *,
    reduce_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Each document's pool of routed experts: its top-P experts by summed token probability.

    The document score of expert ``e`` is the sum over the document's tokens of the fp32 softmax
    over the routed logits (EMO, ``emo_spec.md`` 1.2 step 5); the pool is the ``P`` highest
    scores, ties going to the lower expert index. ``P >= R`` keeps every expert.

    Args:
        routed_logits_TR: ``(T, R)`` router logits of the routed (non-shared) experts.
        doc_ids_T: ``(T,)`` int64 document ids in ``[0, D)``.
        pool_sizes_D: ``(D,)`` int64 pool size per document.
        reduce_fn: all-reduces the ``(D, R)`` per-document partial sums when a document's tokens
            are spread over several ranks (SP/CP); identity when ``None``.

    Returns:
        ``(D, R)`` bool pool membership. No gradient.
    """
    num_docs = pool_sizes_D.shape[0]
    with torch.no_grad():
        # fp32 regardless of the router dtype: the pool is a ranking of sums over many tokens.
        # A contiguous copy, softmaxed in place: softmax over a column slice of the (T, E)
        # logits is ~5x slower on CPU, and every fresh (T, R) buffer costs page faults there.
        probs_TR = routed_logits_TR.detach().float().clone(memory_format=torch.contiguous_format)
        torch.softmax(probs_TR, dim=-1, out=probs_TR)
        scores_DR = segment_sum(probs_TR, doc_ids_T, num_docs)
        if reduce_fn is not None:
            scores_DR = reduce_fn(scores_DR)
        return pool_mask_from_scores(scores_DR, pool_sizes_D)


def document_pool_mask(
    routed_logits_TR: torch.Tensor,
    doc_ids_T: torch.Tensor,
    pool_sizes_D: torch.Tensor,
    *,
    reduce_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Which routed experts each token may use: its document's pool (``document_pools``).

    Args:
        routed_logits_TR: ``(T, R)`` router logits of the routed (non-shared) experts.
        doc_ids_T: ``(T,)`` int64 document ids in ``[0, D)``.
        pool_sizes_D: ``(D,)`` int64 pool size per document.
        reduce_fn: all-reduces the ``(D, R)`` per-document partial sums (SP/CP).

    Returns:
        ``(T, R)`` bool, True where the expert is in the token's document pool. No gradient.
    """
    in_pool_DR = document_pools(routed_logits_TR, doc_ids_T, pool_sizes_D, reduce_fn=reduce_fn)
    return in_pool_DR.index_select(0, doc_ids_T)


def pool_mask_from_scores(scores_DR: torch.Tensor, pool_sizes_D: torch.Tensor) -> torch.Tensor:
    """Each document's pool: its ``P`` highest-scoring experts, ties to the lower index.

    Args:
        scores_DR: ``(D, R)`` document scores (summed token probabilities).
        pool_sizes_D: ``(D,)`` int64 pool sizes; ``P >= R`` keeps every expert.

    Returns:
        ``(D, R)`` bool pool membership.
    """
    num_routed = scores_DR.shape[1]
    # Distinct keys, so one unstable sort ranks every expert inside its document.
    order_DR = torch.argsort(descending_keys(scores_DR), dim=1, descending=True)
    arange_R = torch.arange(num_routed, device=order_DR.device)
    kept_DR = arange_R[None, :] < pool_sizes_D.to(order_DR.device)[:, None]
    return torch.empty_like(kept_DR).scatter_(1, order_DR, kept_DR)
