"""Triton kernels of the fused EMO routing step (``fused.py`` wraps them in autograd).

Four kernels replace the ~20 small ones of ``emo_route``:
  1. ``_doc_scores_kernel``: fp32 softmax over the routed logits, summed per document
     (inside a block by a small matmul, then one atomic add per document and column);
  2. ``_pool_kernel``: one program per document ranks its experts (ties to the lower index)
     and keeps the top ``P``;
  3. ``_route_fwd_kernel``: pool-masked softmax, top-(k - S) selection on the masked logits
     with the same int64 keys as ``ranking.descending_keys``, routed weights (optionally
     renormalised and scaled), shared columns, and the LB / z-loss inputs;
  4. ``_route_bwd_kernel``: the gradient of all those outputs with respect to the logits.

The kernels run under Triton's interpreter (``TRITON_INTERPRET=1``) on CPU tensors, which is how
the CPU test suite checks them. Shape legend: T tokens, E experts (routed + shared), R routed
experts, D documents, K routed slots per token.
"""

from __future__ import annotations

import triton
import triton.language as tl

__all__: list[str] = []


@triton.jit
def _doc_scores_kernel(
    logits_ptr,
    doc_ids_ptr,
    scores_ptr,
    stride_logits,
    num_rows,
    num_interleaved,
    num_routed,
    BLOCK_T: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    """``scores_DR[d] += softmax(logits[t, :R])`` for every token ``t`` of document ``d``.

    A program sums its ``BLOCK_T`` tokens per document first (a 0/1 same-document matrix times
    the probabilities, exact fp32 FMAs in token order), and only the last token of each document
    in the block adds the sum to ``scores_DR`` atomically. Tokens are laid out ``[num_rows,
    num_interleaved]`` (Megatron's ``[s, b]``) and a program walks one column ``b``, where
    documents are long runs, so there are few atomics; any id layout is correct.
    """
    pid_s = tl.program_id(0)
    pid_b = tl.program_id(1)
    rows = pid_s * BLOCK_T + tl.arange(0, BLOCK_T)
    valid_t = rows < num_rows
    tokens = rows.to(tl.int64) * num_interleaved + pid_b
    cols = tl.arange(0, BLOCK_R)
    valid_r = cols < num_routed
    valid_tr = valid_t[:, None] & valid_r[None, :]

    z = tl.load(
        logits_ptr + tokens[:, None] * stride_logits + cols[None, :],
        mask=valid_tr,
        other=float("-inf"),
    ).to(tl.float32)
    row_max = tl.max(z, axis=1)
    row_max = tl.where(valid_t, row_max, 0.0)
    e = tl.exp(z - row_max[:, None])
    # Padding rows have no finite logit: divide them by 1, not 0.
    p = e / tl.where(valid_t, tl.sum(e, axis=1), 1.0)[:, None]

    doc = tl.load(doc_ids_ptr + tokens, mask=valid_t, other=-1)
    same_doc = doc[:, None] == doc[None, :]
    run_sum = tl.dot(same_doc.to(tl.float32), p, input_precision="ieee")
    # The block's last token of each document writes its document's sum.
    later = tl.arange(0, BLOCK_T)[None, :] > tl.arange(0, BLOCK_T)[:, None]
    is_last = tl.sum((same_doc & later).to(tl.int32), axis=1) == 0
    tl.atomic_add(
        scores_ptr + doc.to(tl.int64)[:, None] * num_routed + cols[None, :],
        run_sum,
        mask=(is_last & valid_t)[:, None] & valid_r[None, :],
        sem="relaxed",
    )


@triton.jit
def _pool_kernel(
    scores_ptr,
    pool_sizes_ptr,
    in_pool_ptr,
    num_routed,
    BLOCK_R: tl.constexpr,
    CHUNK: tl.constexpr,
):
    """``in_pool[d, e] = rank of e in document d < P_d``, ranks by score, ties to lower ``e``."""
    doc = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_R)
    valid_r = cols < num_routed
    s = tl.load(scores_ptr + doc * num_routed + cols, mask=valid_r, other=float("-inf"))
    rank = tl.zeros((BLOCK_R,), dtype=tl.int32)
    for start in tl.static_range(0, BLOCK_R, CHUNK):
        other = start + tl.arange(0, CHUNK)
        valid_o = other < num_routed
        s_o = tl.load(scores_ptr + doc * num_routed + other, mask=valid_o, other=float("-inf"))
        beats = (s_o[None, :] > s[:, None]) | (
            (s_o[None, :] == s[:, None]) & (other[None, :] < cols[:, None])
        )
        rank += tl.sum((beats & valid_o[None, :]).to(tl.int32), axis=1)
    pool_size = tl.load(pool_sizes_ptr + doc)
    tl.store(in_pool_ptr + doc * num_routed + cols, (rank < pool_size).to(tl.int8), mask=valid_r)


@triton.jit
def _descending_keys(values, cols):
    """``ranking.descending_keys`` in Triton: distinct int64 keys, ties to the lower column."""
    bits = (values + 0.0).to(tl.int32, bitcast=True)  # + 0.0: -0.0 -> +0.0
    ordered = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    # The low 32 bits hold 0xFFFFFFFF - column (ranking._LOW_MASK).
    return ordered.to(tl.int64) * 4294967296 + (4294967295 - cols.to(tl.int64))


@triton.jit
def _route_fwd_kernel(
    logits_ptr,
    doc_ids_ptr,
    in_pool_ptr,
    probs_ptr,
    map_ptr,
    scores_ptr,
    masked_ptr,
    num_tokens,
    stride_logits,
    num_routed,
    num_experts,
    scale,
    NUM_SLOTS: tl.constexpr,
    HAS_POOLS: tl.constexpr,
    RENORMALIZE: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_E: tl.constexpr,
):
    """Pool-masked softmax, top-``NUM_SLOTS`` routed experts and the shared ones, per token."""
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    valid_t = rows < num_tokens
    rows = rows.to(tl.int64)
    cols = tl.arange(0, BLOCK_E)
    routed = cols < num_routed
    shared = (cols >= num_routed) & (cols < num_experts)
    valid_tr = valid_t[:, None] & routed[None, :]

    z = tl.load(
        logits_ptr + rows[:, None] * stride_logits + cols[None, :], mask=valid_tr, other=0.0
    ).to(tl.float32)
    if HAS_POOLS:
        doc = tl.load(doc_ids_ptr + rows, mask=valid_t, other=0).to(tl.int64)
        in_pool = tl.load(
            in_pool_ptr + doc[:, None] * num_routed + cols[None, :], mask=valid_tr, other=0
        )
        in_pool = in_pool != 0
    else:
        in_pool = valid_tr
    masked = tl.where(in_pool, z, float("-inf"))
    row_max = tl.max(masked, axis=1)
    row_max = tl.where(valid_t, row_max, 0.0)
    e = tl.exp(masked - row_max[:, None])
    s = e / tl.where(valid_t, tl.sum(e, axis=1), 1.0)[:, None]

    # Top-K by repeated max over distinct keys; padding columns can never win.
    keys = _descending_keys(masked, cols[None, :])
    min_key = -9223372036854775807 - 1
    keys = tl.where(routed[None, :], keys, min_key)
    selected = tl.zeros((BLOCK_T, BLOCK_E), dtype=tl.int1)
    for _ in tl.static_range(NUM_SLOTS):
        best = tl.max(keys, axis=1)
        hit = keys == best[:, None]
        selected = selected | hit
        keys = tl.where(hit, min_key, keys)

    weights = tl.where(selected, s, 0.0)
    if RENORMALIZE:
        weights = weights / (tl.sum(weights, axis=1)[:, None] + 1e-20)
    weights = weights * scale
    probs = tl.where(shared[None, :], 1.0, weights)
    routing_map = selected | shared[None, :]
    valid_te = valid_t[:, None] & (cols < num_experts)[None, :]
    out_te = rows[:, None] * num_experts + cols[None, :]
    tl.store(probs_ptr + out_te, probs.to(probs_ptr.dtype.element_ty), mask=valid_te)
    tl.store(map_ptr + out_te, routing_map.to(tl.int8), mask=valid_te)
    out_tr = rows[:, None] * num_routed + cols[None, :]
    tl.store(scores_ptr + out_tr, s, mask=valid_tr)
    tl.store(masked_ptr + out_tr, masked, mask=valid_tr)


@triton.jit
def _route_bwd_kernel(
    grad_probs_ptr,
    grad_scores_ptr,
    grad_masked_ptr,
    scores_ptr,
    map_ptr,
    doc_ids_ptr,
    in_pool_ptr,
    grad_logits_ptr,
    num_tokens,
    stride_gp_t,
    stride_gp_e,
    stride_gs_t,
    stride_gs_r,
    stride_gm_t,
    stride_gm_r,
    stride_grad_logits,
    num_routed,
    num_experts,
    scale,
    HAS_GRAD_PROBS: tl.constexpr,
    HAS_GRAD_SCORES: tl.constexpr,
    HAS_GRAD_MASKED: tl.constexpr,
    HAS_POOLS: tl.constexpr,
    RENORMALIZE: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_E: tl.constexpr,
):
    """d(loss)/d(logits) from the gradients of ``probs``, ``scores`` and ``masked_logits``.

    With ``s`` the pool softmax and ``G`` the total gradient reaching ``s``: routed weights
    ``w = a * s`` (or ``a * s / sum_sel s`` with renormalisation) give ``G = g_s + a * g_p``
    (or ``a / S * (g_p - sum_sel g_p * s / S)``) on the selected experts; the softmax gives
    ``dz = s * (G - sum(s * G))``; the masked logits pass ``g_m`` through inside the pool.
    Shared columns get no gradient (their weight is the constant 1).
    """
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    valid_t = rows < num_tokens
    rows = rows.to(tl.int64)
    cols = tl.arange(0, BLOCK_E)
    routed = cols < num_routed
    valid_tr = valid_t[:, None] & routed[None, :]
    out_tr = rows[:, None] * num_routed + cols[None, :]

    s = tl.load(scores_ptr + out_tr, mask=valid_tr, other=0.0)
    grad_s = tl.zeros((BLOCK_T, BLOCK_E), dtype=tl.float32)
    if HAS_GRAD_SCORES:
        grad_s += tl.load(
            grad_scores_ptr + rows[:, None] * stride_gs_t + cols[None, :] * stride_gs_r,
            mask=valid_tr,
            other=0.0,
        ).to(tl.float32)
    if HAS_GRAD_PROBS:
        selected = (
            tl.load(map_ptr + rows[:, None] * num_experts + cols[None, :], mask=valid_tr, other=0)
            != 0
        )
        grad_p = tl.load(
            grad_probs_ptr + rows[:, None] * stride_gp_t + cols[None, :] * stride_gp_e,
            mask=valid_tr,
            other=0.0,
        ).to(tl.float32)
        grad_p = tl.where(selected, grad_p, 0.0)
        if RENORMALIZE:
            raw = tl.where(selected, s, 0.0)
            total = tl.sum(raw, axis=1) + 1e-20
            dot = tl.sum(grad_p * raw, axis=1) / total
            grad_s += tl.where(selected, (scale / total)[:, None] * (grad_p - dot[:, None]), 0.0)
        else:
            grad_s += scale * grad_p
    dz = s * (grad_s - tl.sum(s * grad_s, axis=1)[:, None])
    if HAS_GRAD_MASKED:
        grad_m = tl.load(
            grad_masked_ptr + rows[:, None] * stride_gm_t + cols[None, :] * stride_gm_r,
            mask=valid_tr,
            other=0.0,
        ).to(tl.float32)
        if HAS_POOLS:
            doc = tl.load(doc_ids_ptr + rows, mask=valid_t, other=0).to(tl.int64)
            in_pool = tl.load(
                in_pool_ptr + doc[:, None] * num_routed + cols[None, :], mask=valid_tr, other=0
            )
            grad_m = tl.where(in_pool != 0, grad_m, 0.0)
        dz += grad_m
    valid_te = valid_t[:, None] & (cols < num_experts)[None, :]
    dz = tl.where(routed[None, :], dz, 0.0)
    tl.store(
        grad_logits_ptr + rows[:, None] * stride_grad_logits + cols[None, :],
        dz.to(grad_logits_ptr.dtype.element_ty),
        mask=valid_te,
    )
