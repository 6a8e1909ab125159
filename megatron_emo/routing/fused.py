"""Fused EMO routing (Triton): ``emo_route`` / ``route_within_pools`` in four kernels, on CUDA.

Same results as the pure-torch path: identical pools and routing maps (pool ties and token ties
go to the lower expert index; tokens select on the masked logits with the same int64 keys), and
probabilities and gradients equal up to fp32 rounding. Softmax scoring without expert bias only
(``route_within_pools`` covers sigmoid scoring and the bias). Kernels: ``fused_kernels.py``.

Determinism: document sums are added with atomics in an order the GPU chooses, so, exactly like
``index_add_`` in ``emo_route`` on CUDA, two experts whose sums differ only in the last bits can
swap places at the pool edge from run to run; exact ties (identical columns) can too. Under
Triton's interpreter (``TRITON_INTERPRET=1``, how CPU tests run these kernels) everything is
sequential and deterministic.

Shape legend: T tokens, E experts (routed + shared), R routed experts, D documents.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import triton

from megatron_emo.routing import fused_kernels as kernels
from megatron_emo.routing.route import EMORouting

__all__ = [
    "fused_document_pools",
    "fused_emo_route",
    "fused_route_within_pools",
    "fused_routing_available",
]

# Elements of a (BLOCK_T, BLOCK_E) tile per program. TODO(gpu session): tune on the H200.
_TILE_ELEMENTS = 2048
_SCORES_TILE_ELEMENTS = 8192


def _interpreted() -> bool:
    """Whether the kernels were built by Triton's interpreter (``TRITON_INTERPRET=1`` at import)."""
    return type(kernels._route_fwd_kernel).__name__ == "InterpretedFunction"


def fused_routing_available(device: torch.device | str) -> bool:
    """Whether the fused kernels can run on ``device`` (CUDA, or any device when interpreted)."""
    return torch.device(device).type == "cuda" or _interpreted()


def _check_device(tensor: torch.Tensor, *others: torch.Tensor | None) -> None:
    if not fused_routing_available(tensor.device):
        raise RuntimeError(
            f"fused EMO routing runs on CUDA tensors (got {tensor.device}); use emo_route / "
            "route_within_pools on CPU, or set TRITON_INTERPRET=1 before triton is first "
            "imported to run the kernels in Triton's interpreter"
        )
    for other in others:
        if other is not None and other.device != tensor.device:
            raise ValueError(
                f"fused EMO routing needs all inputs on one device: logits on {tensor.device}, "
                f"got a {tuple(other.shape)} tensor on {other.device}"
            )


def _num_warps(tile_elements: int) -> int:
    return 4 if tile_elements <= 4096 else 8


def fused_document_pools(
    routed_logits_TR: torch.Tensor,
    doc_ids_T: torch.Tensor,
    pool_sizes_D: torch.Tensor,
    *,
    reduce_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
    num_interleaved: int = 1,
) -> torch.Tensor:
    """Each document's pool (``document_pool_mask`` before its per-token gather), fused.

    Args:
        routed_logits_TR: ``(T, R)`` routed logits (a column slice of the ``(T, E)`` logits is
            fine; rows must have unit column stride).
        doc_ids_T: ``(T,)`` int64 document ids in ``[0, D)``.
        pool_sizes_D: ``(D,)`` int64 pool sizes, in routed experts.
        reduce_fn: all-reduces the ``(D, R)`` fp32 per-document partial sums (SP/CP).
        num_interleaved: tokens are laid out ``[T / n, n]`` (Megatron's ``[s, b]``: ``n`` = micro
            batch size) with documents running along the first axis. Only the summation order,
            and so the speed of the atomics, depends on it.

    Returns:
        ``(D, R)`` bool pool membership, no gradient.
    """
    _check_device(routed_logits_TR, doc_ids_T, pool_sizes_D)
    num_tokens, num_routed = routed_logits_TR.shape
    if num_interleaved < 1 or num_tokens % num_interleaved:
        raise ValueError(
            f"num_interleaved ({num_interleaved}) must be >= 1 and divide the tokens ({num_tokens})"
        )
    if routed_logits_TR.stride(1) != 1:
        routed_logits_TR = routed_logits_TR.contiguous()
    doc_ids_T, pool_sizes_D = doc_ids_T.contiguous(), pool_sizes_D.contiguous()
    num_docs = pool_sizes_D.shape[0]
    scores_DR = torch.zeros((num_docs, num_routed), dtype=torch.float32, device=doc_ids_T.device)
    # tl.dot needs both block sizes >= 16.
    block_r = max(16, triton.next_power_of_2(num_routed))
    block_t = max(16, min(64, _SCORES_TILE_ELEMENTS // block_r))
    num_rows = num_tokens // num_interleaved
    with torch.no_grad():
        kernels._doc_scores_kernel[(triton.cdiv(num_rows, block_t), num_interleaved)](
            routed_logits_TR,
            doc_ids_T,
            scores_DR,
            routed_logits_TR.stride(0),
            num_rows,
            num_interleaved,
            num_routed,
            BLOCK_T=block_t,
            BLOCK_R=block_r,
            num_warps=_num_warps(block_t * block_r),
        )
        if reduce_fn is not None:
            scores_DR = reduce_fn(scores_DR)
        in_pool_DR = torch.empty((num_docs, num_routed), dtype=torch.int8, device=scores_DR.device)
        kernels._pool_kernel[(num_docs,)](
            scores_DR,
            pool_sizes_D,
            in_pool_DR,
            num_routed,
            BLOCK_R=triton.next_power_of_2(num_routed),
            CHUNK=min(triton.next_power_of_2(num_routed), 64),
            num_warps=_num_warps(block_r * min(block_r, 64)),
        )
    return in_pool_DR.view(torch.bool)


def _block_t(block_e: int) -> int:
    return max(1, min(64, _TILE_ELEMENTS // block_e))


class _FusedRouteWithinPools(torch.autograd.Function):
    """Forward and backward of the per-token part of EMO routing (``route_within_pools``)."""

    @staticmethod
    def forward(ctx, logits_TE, doc_ids_T, in_pool_DR, num_routed, num_slots, renormalize, scale):
        num_tokens, num_experts = logits_TE.shape
        device = logits_TE.device
        probs_TE = torch.empty((num_tokens, num_experts), dtype=logits_TE.dtype, device=device)
        routing_map_TE = torch.empty((num_tokens, num_experts), dtype=torch.bool, device=device)
        scores_TR = torch.empty((num_tokens, num_routed), dtype=torch.float32, device=device)
        masked_TR = torch.empty_like(scores_TR)
        has_pools = in_pool_DR is not None
        block_e = triton.next_power_of_2(num_experts)
        block_t = _block_t(block_e)
        kernels._route_fwd_kernel[(triton.cdiv(num_tokens, block_t),)](
            logits_TE,
            doc_ids_T if has_pools else scores_TR,
            in_pool_DR.view(torch.int8) if has_pools else scores_TR,
            probs_TE,
            routing_map_TE.view(torch.int8),
            scores_TR,
            masked_TR,
            num_tokens,
            logits_TE.stride(0),
            num_routed,
            num_experts,
            scale,
            NUM_SLOTS=num_slots,
            HAS_POOLS=has_pools,
            RENORMALIZE=renormalize,
            BLOCK_T=block_t,
            BLOCK_E=block_e,
            num_warps=_num_warps(block_t * block_e),
        )
        ctx.save_for_backward(scores_TR, routing_map_TE, doc_ids_T, in_pool_DR)
        ctx.mark_non_differentiable(routing_map_TE)
        ctx.set_materialize_grads(False)
        ctx.logits_dtype = logits_TE.dtype
        ctx.renormalize = renormalize
        ctx.scale = scale
        return probs_TE, routing_map_TE, scores_TR, masked_TR

    @staticmethod
    def backward(ctx, grad_probs_TE, _grad_map, grad_scores_TR, grad_masked_TR):
        scores_TR, routing_map_TE, doc_ids_T, in_pool_DR = ctx.saved_tensors
        if grad_probs_TE is None and grad_scores_TR is None and grad_masked_TR is None:
            return (None,) * 7
        num_tokens, num_experts = routing_map_TE.shape
        num_routed = scores_TR.shape[1]
        grad_logits_TE = torch.empty(
            (num_tokens, num_experts), dtype=ctx.logits_dtype, device=scores_TR.device
        )
        has_pools = in_pool_DR is not None

        def ptr_and_strides(grad: torch.Tensor | None) -> tuple[torch.Tensor, int, int]:
            # Unused pointers get a placeholder; expanded gradients (stride 0) are read in place.
            return (scores_TR, 0, 0) if grad is None else (grad, grad.stride(0), grad.stride(1))

        grad_p, sp_t, sp_e = ptr_and_strides(grad_probs_TE)
        grad_s, ss_t, ss_r = ptr_and_strides(grad_scores_TR)
        grad_m, sm_t, sm_r = ptr_and_strides(grad_masked_TR)
        block_e = triton.next_power_of_2(num_experts)
        block_t = _block_t(block_e)
        kernels._route_bwd_kernel[(triton.cdiv(num_tokens, block_t),)](
            grad_p,
            grad_s,
            grad_m,
            scores_TR,
            routing_map_TE.view(torch.int8),
            doc_ids_T if has_pools else scores_TR,
            in_pool_DR.view(torch.int8) if has_pools else scores_TR,
            grad_logits_TE,
            num_tokens,
            sp_t,
            sp_e,
            ss_t,
            ss_r,
            sm_t,
            sm_r,
            grad_logits_TE.stride(0),
            num_routed,
            num_experts,
            ctx.scale,
            HAS_GRAD_PROBS=grad_probs_TE is not None,
            HAS_GRAD_SCORES=grad_scores_TR is not None,
            HAS_GRAD_MASKED=grad_masked_TR is not None,
            HAS_POOLS=has_pools,
            RENORMALIZE=ctx.renormalize,
            BLOCK_T=block_t,
            BLOCK_E=block_e,
            num_warps=_num_warps(block_t * block_e),
        )
        return grad_logits_TE, None, None, None, None, None, None


def fused_route_within_pools(
    logits_TE: torch.Tensor,
    doc_ids_T: torch.Tensor | None,
    in_pool_DR: torch.Tensor | None,
    *,
    topk: int,
    num_shared_experts: int,
    renormalize: bool = False,
    scaling_factor: float | None = None,
) -> EMORouting:
    """``route_within_pools`` (softmax scoring, no expert bias) in one kernel, differentiable.

    Args:
        logits_TE: ``(T, E)`` router logits (any float dtype; the math runs in fp32).
        doc_ids_T: ``(T,)`` int64 document ids, or None for no pools (every routed expert).
        in_pool_DR: ``(D, R)`` bool pools from ``fused_document_pools`` (or
            ``pool_mask_from_scores``), or None for no pools.
        topk: experts per token including the shared ones.
        num_shared_experts: S, the last S columns; weight exactly 1.0, always selected.
        renormalize: renormalise the chosen routed weights to sum 1.
        scaling_factor: optional multiplier of the routed weights.

    Returns:
        An ``EMORouting`` like ``route_within_pools``'s (``routed_map`` is a view of
        ``routing_map``).
    """
    _check_device(logits_TE, doc_ids_T, in_pool_DR)
    if logits_TE.dim() != 2 or not logits_TE.is_floating_point():
        raise ValueError(
            f"logits must be a (T, E) float tensor, got {tuple(logits_TE.shape)} {logits_TE.dtype}"
        )
    num_experts = logits_TE.shape[1]
    num_routed = num_experts - num_shared_experts
    num_slots = topk - num_shared_experts
    if not 1 <= num_slots <= num_routed:
        raise ValueError(
            f"topk ({topk}) - num_shared_experts ({num_shared_experts}) must be in "
            f"[1, routed experts ({num_routed})]"
        )
    if (doc_ids_T is None) != (in_pool_DR is None):
        raise ValueError("pass both doc_ids_T and in_pool_DR, or neither (no pools)")
    if in_pool_DR is not None and in_pool_DR.shape[1] != num_routed:
        raise ValueError(
            f"in_pool_DR has {in_pool_DR.shape[1]} columns but the logits have {num_routed} "
            f"routed experts ({num_experts} - {num_shared_experts} shared)"
        )
    if logits_TE.stride(1) != 1:
        logits_TE = logits_TE.contiguous()
    if in_pool_DR is not None:
        doc_ids_T, in_pool_DR = doc_ids_T.contiguous(), in_pool_DR.contiguous()
    scale = 1.0 if scaling_factor is None else float(scaling_factor)
    probs_TE, routing_map_TE, scores_TR, masked_TR = _FusedRouteWithinPools.apply(
        logits_TE, doc_ids_T, in_pool_DR, num_routed, num_slots, renormalize, scale
    )
    return EMORouting(
        probs=probs_TE,
        routing_map=routing_map_TE,
        scores=scores_TR,
        routed_map=routing_map_TE[:, :num_routed],
        masked_logits=masked_TR,
    )


def fused_emo_route(
    logits: torch.Tensor,
    doc_ids: torch.Tensor,
    pool_sizes: torch.Tensor,
    *,
    topk: int,
    num_shared_experts: int = 1,
    reduce_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
    renormalize: bool = False,
    num_interleaved: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``emo_route`` fused: the same arguments and results, four kernel launches.

    Args:
        logits: ``(T, E)`` float router logits; the last ``num_shared_experts`` are shared.
        doc_ids: ``(T,)`` int64 document ids in ``[0, D)``.
        pool_sizes: ``(D,)`` int64 pool sizes, ``>= topk - num_shared_experts``.
        topk: experts per token including shared ones.
        num_shared_experts: S.
        reduce_fn: all-reduce for the ``(D, R)`` per-document partial sums; identity if None.
        renormalize: renormalise the chosen routed probabilities to sum 1.
        num_interleaved: see ``fused_document_pools`` (speed only).

    Returns:
        ``(probs, routing_map)``: ``(T, E)`` float with zeros off the map, ``(T, E)`` bool.
    """
    num_routed = logits.shape[1] - num_shared_experts
    in_pool_DR = fused_document_pools(
        logits[:, :num_routed],
        doc_ids,
        pool_sizes,
        reduce_fn=reduce_fn,
        num_interleaved=num_interleaved,
    )
    result = fused_route_within_pools(
        logits,
        doc_ids,
        in_pool_DR,
        topk=topk,
        num_shared_experts=num_shared_experts,
        renormalize=renormalize,
    )
    return result.probs, result.routing_map
