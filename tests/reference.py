"""Slow, obviously-correct loop references for the EMO routing math (``emo_spec.md`` 1 and 2).

Written straight from the spec with Python loops over documents and tokens, independently of the
vectorised code in ``megatron_emo.routing``. Only for tests (tiny shapes): never fast.
Ties are always broken towards the LOWER expert index.
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "reference_doc_ids_from_eod",
    "reference_emo_route",
    "reference_load_balancing_loss",
    "reference_pools",
    "reference_z_loss",
]


def _softmax(values: list[float]) -> list[float]:
    """Softmax of a list of finite floats (max-shifted)."""
    m = max(values)
    exps = [math.exp(v - m) for v in values]
    total = sum(exps)
    return [x / total for x in exps]


def _top_indices(values: list[float], count: int) -> list[int]:
    """Indices of the ``count`` largest values; equal values go to the lower index."""
    order = sorted(range(len(values)), key=lambda i: (-values[i], i))
    return order[:count]


def reference_pools(
    logits: torch.Tensor, doc_ids: torch.Tensor, pool_sizes: torch.Tensor, *,
    num_shared_experts: int,
) -> dict[int, set[int]]:
    """Each document's pool of routed experts: ``{doc_id: set(expert indices)}``.

    The pool is the P experts with the largest summed (over the document's tokens) softmax over
    the routed logits; P >= routed experts keeps them all.
    """
    num_tokens, num_experts = logits.shape
    num_routed = num_experts - num_shared_experts
    rows = logits.detach().double().tolist()
    ids = [int(d) for d in doc_ids.tolist()]
    pools: dict[int, set[int]] = {}
    for d in range(pool_sizes.shape[0]):
        doc_scores = [0.0] * num_routed
        for t in range(num_tokens):
            if ids[t] != d:
                continue
            p_t = _softmax(rows[t][:num_routed])
            for e in range(num_routed):
                doc_scores[e] += p_t[e]
        size = int(pool_sizes[d])
        if size >= num_routed:
            pools[d] = set(range(num_routed))
        else:
            pools[d] = set(_top_indices(doc_scores, size))
    return pools


def reference_emo_route(
    logits: torch.Tensor,
    doc_ids: torch.Tensor,
    pool_sizes: torch.Tensor,
    *,
    topk: int,
    num_shared_experts: int,
    renormalize: bool = False,
    dtype: torch.dtype = torch.float64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """EMO document-pool routing by loops (``emo_spec.md`` 1.2 steps 4-9).

    Args:
        logits: ``(T, E)`` router logits; the last ``num_shared_experts`` columns are shared.
        doc_ids: ``(T,)`` document id of every token, in ``[0, D)``.
        pool_sizes: ``(D,)`` pool size per document, in routed experts.
        topk: experts per token including the shared ones.
        num_shared_experts: S.
        renormalize: renormalise the chosen routed weights to sum 1.
        dtype: dtype of the returned probabilities (the math runs in Python floats, i.e. fp64).

    Returns:
        ``(probs, routing_map)``: ``(T, E)`` ``dtype`` and ``(T, E)`` bool.
    """
    num_tokens, num_experts = logits.shape
    num_routed = num_experts - num_shared_experts
    num_slots = topk - num_shared_experts
    rows = logits.detach().double().tolist()
    ids = [int(d) for d in doc_ids.tolist()]
    pools = reference_pools(logits, doc_ids, pool_sizes, num_shared_experts=num_shared_experts)

    probs = [[0.0] * num_experts for _ in range(num_tokens)]
    routing_map = [[False] * num_experts for _ in range(num_tokens)]
    for t in range(num_tokens):
        pool = sorted(pools[ids[t]])
        pool_probs = _softmax([rows[t][e] for e in pool])
        masked = [0.0] * num_routed
        for e, p in zip(pool, pool_probs, strict=True):
            masked[e] = p
        # Only pool experts are candidates (out-of-pool ones have probability exactly 0).
        candidates = sorted(pool, key=lambda e: (-masked[e], e))[:num_slots]
        total = sum(masked[e] for e in candidates)
        for e in candidates:
            probs[t][e] = masked[e] / total if renormalize else masked[e]
            routing_map[t][e] = True
        for e in range(num_routed, num_experts):
            probs[t][e] = 1.0
            routing_map[t][e] = True
    return torch.tensor(probs, dtype=dtype), torch.tensor(routing_map, dtype=torch.bool)


def reference_load_balancing_loss(
    scores: torch.Tensor, routed_map: torch.Tensor, topk_routed: int
) -> float:
    """``(R / K) * sum_e (count_e / T) * mean_t scores[t, e]`` by loops (``emo_spec.md`` 2.2)."""
    num_tokens, num_routed = scores.shape
    s = scores.detach().double().tolist()
    m = routed_map.tolist()
    total = 0.0
    for e in range(num_routed):
        count = sum(1 for t in range(num_tokens) if m[t][e])
        mean_score = sum(s[t][e] for t in range(num_tokens)) / num_tokens
        total += (count / num_tokens) * mean_score
    return num_routed / topk_routed * total


def reference_z_loss(masked_logits: torch.Tensor) -> float:
    """Mean over tokens of ``logsumexp(pool logits) ** 2``; ``-inf`` entries are not in the pool."""
    rows = masked_logits.detach().double().tolist()
    total = 0.0
    for row in rows:
        pool = [v for v in row if v != float("-inf")]
        m = max(pool)
        lse = m + math.log(sum(math.exp(v - m) for v in pool))
        total += lse * lse
    return total / len(rows)


def reference_doc_ids_from_eod(
    tokens_BS: torch.Tensor, eod_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Document ids by loops: an EOD belongs to the document it ENDS; ids dense across the batch.

    Returns:
        ``(doc_ids_BS, num_docs_B)`` int64.
    """
    rows = tokens_BS.tolist()
    ids: list[list[int]] = []
    num_docs: list[int] = []
    next_id = 0
    for row in rows:
        first = next_id
        current = next_id
        row_ids = []
        for i, tok in enumerate(row):
            row_ids.append(current)
            # The token after an EOD (if any) opens a new document.
            if tok == eod_id and i + 1 < len(row):
                current += 1
        ids.append(row_ids)
        num_docs.append(current - first + 1)
        next_id = current + 1
    return torch.tensor(ids, dtype=torch.int64), torch.tensor(num_docs, dtype=torch.int64)
