"""Fused Triton EMO routing (``megatron_emo.routing.fused``) against ``emo_route`` and the loop.

Without CUDA the kernels run in Triton's interpreter on CPU tensors (``tests/conftest.py`` sets
``TRITON_INTERPRET=1``); with CUDA the same tests run the compiled kernels. Checks identical
pools and routing maps, probabilities and gradients to 1e-6 over the edge cases: pools >= routed
experts, one-token documents, D = 1 and D = T / 2, S = 0, 1 and 2, bf16 logits, renormalisation
and scaling, ties, the ``[s, b]`` token layout, a split document (``reduce_fn``) and no pools.
Run: ``OMP_NUM_THREADS=1 .venv/bin/python -m pytest tests/unit/test_fused_routing.py -q``
"""

from __future__ import annotations

import pytest
import torch

from megatron_emo.routing import (
    document_pool_mask,
    emo_route,
    pool_mask_from_scores,
    route_within_pools,
    segment_sum,
)

from helpers import random_doc_ids
from reference import reference_emo_route, reference_pools

pytest.importorskip("triton")


@pytest.fixture(scope="module")
def fused():
    """``megatron_emo.routing.fused``, if its kernels can run here (CUDA, or the interpreter)."""
    import megatron_emo.routing.fused as fused_module

    if not fused_module.fused_routing_available(_device()):
        pytest.skip("no CUDA and Triton's interpreter is off (tests/conftest.py turns it on)")
    return fused_module


def _device() -> torch.device:
    """Where the fused kernels run: CUDA when present, else CPU through the interpreter."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _on(*tensors: torch.Tensor | None) -> tuple:
    return tuple(None if t is None else t.to(_device()) for t in tensors)


def _fused_route(fused, logits, doc_ids, pool_sizes, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """``fused_emo_route`` on the test device, results back on the CPU."""
    reduce_fn = kwargs.pop("reduce_fn", None)
    if reduce_fn is not None:
        kwargs["reduce_fn"] = lambda x: reduce_fn(x.cpu()).to(x.device)
    probs, routing_map = fused.fused_emo_route(*_on(logits, doc_ids, pool_sizes), **kwargs)
    return probs.cpu(), routing_map.cpu()


def _fused_pools(fused, routed_logits, doc_ids, pool_sizes) -> torch.Tensor:
    return fused.fused_document_pools(*_on(routed_logits, doc_ids, pool_sizes)).cpu()



def _case(name: str) -> dict:
    gen = torch.Generator().manual_seed(sum(map(ord, name)))
    case = dict(num_experts=17, num_shared=1, topk=4, renormalize=False, num_tokens=64)
    num_docs = 7
    if name == "one_token_docs":
        case["num_tokens"] = num_docs = 24
    elif name == "one_doc":
        num_docs = 1
    elif name == "two_token_docs":
        num_docs = case["num_tokens"] // 2
    elif name.startswith("shared"):
        case["num_shared"] = int(name[-1])
        case["topk"] = 4 + case["num_shared"]
        case["num_experts"] = 16 + case["num_shared"]
    elif name == "renormalize":
        case["renormalize"] = True
    elif name == "wide_130":
        case.update(num_experts=130, topk=8, num_tokens=20)
        num_docs = 3
    num_tokens = case["num_tokens"]
    if name == "two_token_docs":
        doc_ids = torch.arange(num_tokens) // 2
    else:
        doc_ids = random_doc_ids(num_tokens, num_docs, gen)
    num_routed = case["num_experts"] - case["num_shared"]
    num_slots = case["topk"] - case["num_shared"]
    if name == "pool_ge_routed":
        pool_sizes = torch.randint(num_routed, num_routed + 4, (num_docs,), generator=gen)
    else:
        pool_sizes = torch.randint(num_slots, num_routed + 2, (num_docs,), generator=gen)
    case["logits"] = 2.0 * torch.randn(num_tokens, case["num_experts"], generator=gen)
    case["doc_ids"] = doc_ids
    case["pool_sizes"] = pool_sizes
    return case


CASES = [
    "random_docs",
    "one_token_docs",
    "one_doc",
    "two_token_docs",
    "pool_ge_routed",
    "shared_S0",
    "shared_S2",
    "renormalize",
    "wide_130",
]


def _route_both(fused, case: dict) -> tuple:
    kwargs = dict(
        topk=case["topk"], num_shared_experts=case["num_shared"], renormalize=case["renormalize"]
    )
    args = (case["logits"], case["doc_ids"], case["pool_sizes"])
    return emo_route(*args, **kwargs), _fused_route(fused, *args, **kwargs)


@pytest.mark.parametrize("name", CASES, ids=CASES)
def test_fused_matches_emo_route_and_reference(fused, name: str) -> None:
    case = _case(name)
    (probs, routing_map), (f_probs, f_map) = _route_both(fused, case)
    assert f_map.dtype == torch.bool and f_probs.dtype == case["logits"].dtype
    assert torch.equal(f_map, routing_map)
    torch.testing.assert_close(f_probs, probs, atol=1e-6, rtol=0)
    ref_probs, ref_map = reference_emo_route(
        case["logits"],
        case["doc_ids"],
        case["pool_sizes"],
        topk=case["topk"],
        num_shared_experts=case["num_shared"],
        renormalize=case["renormalize"],
    )
    assert torch.equal(f_map, ref_map)
    torch.testing.assert_close(f_probs.double(), ref_probs, atol=1e-6, rtol=0)
    # The pools themselves, before the per-token gather.
    num_routed = case["num_experts"] - case["num_shared"]
    in_pool_DR = _fused_pools(
        fused, case["logits"][:, :num_routed], case["doc_ids"], case["pool_sizes"]
    )
    pools = reference_pools(
        case["logits"], case["doc_ids"], case["pool_sizes"], num_shared_experts=case["num_shared"]
    )
    assert [set(row.nonzero().flatten().tolist()) for row in in_pool_DR] == [
        pools[d] for d in range(len(pools))
    ]


def _tie_case(name: str) -> dict:
    gen = torch.Generator().manual_seed(7)
    logits = torch.randn(40, 13, generator=gen)
    if name == "duplicated_columns":
        logits[:, 3] = logits[:, 2]
        logits[:, 8] = logits[:, 7]
        logits[:, 9] = logits[:, 7]
    elif name == "identical_rows":
        logits[:, 5] = logits[:, 1]
        logits = logits[0].expand(40, 13).clone()
    elif name == "all_equal_logits":
        logits = torch.zeros(40, 13)
    elif name == "signed_zeros":
        logits = torch.zeros(40, 13)
        logits[:, 1::2] = -0.0
    return dict(
        logits=logits,
        doc_ids=random_doc_ids(40, 5, gen),
        pool_sizes=torch.tensor([3, 5, 7, 12, 20]),
        topk=4,
        num_shared=1,
        renormalize=False,
        num_experts=13,
    )


TIE_CASES = ["duplicated_columns", "identical_rows", "all_equal_logits", "signed_zeros"]


@pytest.mark.parametrize("name", TIE_CASES, ids=TIE_CASES)
def test_fused_ties_go_to_lower_index(fused, name: str) -> None:
    case = _tie_case(name)
    (probs, routing_map), (f_probs, f_map) = _route_both(fused, case)
    _, ref_map = reference_emo_route(
        case["logits"], case["doc_ids"], case["pool_sizes"], topk=4, num_shared_experts=1
    )
    assert torch.equal(routing_map, ref_map)
    assert torch.equal(f_map, ref_map)
    torch.testing.assert_close(f_probs, probs, atol=1e-6, rtol=0)


def test_fused_bf16_logits(fused) -> None:
    case = _case("random_docs")
    logits = case["logits"].bfloat16()
    doc_ids, pool_sizes = case["doc_ids"], case["pool_sizes"]
    in_pool_TR = document_pool_mask(logits[:, :16], doc_ids, pool_sizes)
    expect = route_within_pools(logits, in_pool_TR, topk=4, num_shared_experts=1)
    in_pool_DR = _fused_pools(fused, logits[:, :16], doc_ids, pool_sizes)
    assert torch.equal(in_pool_DR.index_select(0, doc_ids), in_pool_TR)
    got = fused.fused_route_within_pools(
        *_on(logits, doc_ids, in_pool_DR), topk=4, num_shared_experts=1
    )
    got = type(got)(*(t.cpu() for t in got))
    assert got.probs.dtype == torch.bfloat16
    assert torch.equal(got.routing_map, expect.routing_map)
    torch.testing.assert_close(got.scores, expect.scores, atol=1e-6, rtol=0)
    torch.testing.assert_close(got.masked_logits, expect.masked_logits, atol=0, rtol=0)
    # bf16 rounding of fp32 values equal to ~1e-7 can land one bf16 step apart.
    torch.testing.assert_close(got.probs.float(), expect.probs.float(), atol=0, rtol=2**-7)


def test_fused_interleaved_token_layout(fused) -> None:
    # Megatron's router order: tokens [s, b] with documents running along s in each sequence.
    gen = torch.Generator().manual_seed(3)
    batch, seq = 3, 24
    doc_ids_BS = torch.stack([random_doc_ids(seq, 4, gen) + 4 * b for b in range(batch)])
    doc_ids_T = doc_ids_BS.t().reshape(-1)
    logits = 2.0 * torch.randn(batch * seq, 17, generator=gen)
    pool_sizes = torch.randint(3, 17, (4 * batch,), generator=gen)
    probs, routing_map = emo_route(logits, doc_ids_T, pool_sizes, topk=4)
    for num_interleaved in (1, batch):
        f_probs, f_map = _fused_route(
            fused, logits, doc_ids_T, pool_sizes, topk=4, num_interleaved=num_interleaved
        )
        assert torch.equal(f_map, routing_map)
        torch.testing.assert_close(f_probs, probs, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="num_interleaved"):
        _fused_route(fused, logits, doc_ids_T, pool_sizes, topk=4, num_interleaved=5)


def test_fused_reduce_fn_split_matches_unsplit(fused) -> None:
    case = _case("random_docs")
    logits, doc_ids, pool_sizes = case["logits"], case["doc_ids"], case["pool_sizes"]
    num_docs = pool_sizes.shape[0]
    probs, routing_map = emo_route(logits, doc_ids, pool_sizes, topk=4)
    half = logits.shape[0] // 2  # cuts a document in the middle
    total = sum(
        segment_sum(torch.softmax(logits[s, :16].float(), -1), doc_ids[s], num_docs)
        for s in (slice(None, half), slice(half, None))
    )
    parts = [
        _fused_route(fused, logits[s], doc_ids[s], pool_sizes, topk=4, reduce_fn=lambda x: total)
        for s in (slice(None, half), slice(half, None))
    ]
    assert torch.equal(torch.cat([parts[0][1], parts[1][1]]), routing_map)
    torch.testing.assert_close(torch.cat([parts[0][0], parts[1][0]]), probs, atol=1e-6, rtol=0)


def test_fused_without_pools_is_plain_topk(fused) -> None:
    case = _case("random_docs")
    logits = case["logits"]
    expect = route_within_pools(
        logits, torch.ones(64, 16, dtype=torch.bool), topk=4, num_shared_experts=1
    )
    got = fused.fused_route_within_pools(*_on(logits), None, None, topk=4, num_shared_experts=1)
    got = type(got)(*(t.cpu() for t in got))
    assert torch.equal(got.routing_map, expect.routing_map)
    torch.testing.assert_close(got.probs, expect.probs, atol=1e-6, rtol=0)
    assert torch.equal(got.masked_logits, logits[:, :16])


GRAD_CASES = ["plain", "renormalize_scaled", "shared_S0", "bf16"]


@pytest.mark.parametrize("name", GRAD_CASES, ids=GRAD_CASES)
def test_fused_gradients_match_autograd(fused, name: str) -> None:
    case = _case("shared_S0" if name == "shared_S0" else "random_docs")
    num_shared = case["num_shared"]
    num_routed = case["num_experts"] - num_shared
    options = dict(topk=case["topk"], num_shared_experts=num_shared)
    if name == "renormalize_scaled":
        options.update(renormalize=True, scaling_factor=2.5)
    dtype = torch.bfloat16 if name == "bf16" else torch.float32
    logits = case["logits"].to(dtype)
    doc_ids, pool_sizes = case["doc_ids"], case["pool_sizes"]
    gen = torch.Generator().manual_seed(11)
    grad_probs = torch.randn(logits.shape, generator=gen)
    grad_scores = torch.randn(logits.shape[0], num_routed, generator=gen)

    def loss(result) -> torch.Tensor:
        # Every differentiable output, one through an expanded (stride 0) gradient, plus the
        # z-loss and load-balancing shapes the router uses.
        return (
            (result.probs.float() * grad_probs).sum()
            + result.probs.sum()
            + (result.scores * grad_scores).sum()
            + result.scores.mean(dim=0).square().sum()
            + torch.logsumexp(result.masked_logits, dim=-1).square().mean()
        )

    x_torch = logits.clone().requires_grad_()
    in_pool_TR = document_pool_mask(x_torch[:, :num_routed], doc_ids, pool_sizes)
    loss(route_within_pools(x_torch, in_pool_TR, **options)).backward()
    grad_probs, grad_scores = _on(grad_probs, grad_scores)
    x_fused = logits.clone().to(_device()).requires_grad_()
    (doc_ids_dev,) = _on(doc_ids)
    in_pool_DR = fused.fused_document_pools(x_fused[:, :num_routed], doc_ids_dev, *_on(pool_sizes))
    loss(fused.fused_route_within_pools(x_fused, doc_ids_dev, in_pool_DR, **options)).backward()
    grad = x_fused.grad.cpu()
    assert grad.dtype == dtype
    # bf16 gradients: one bf16 rounding step (2**-7 relative) of the same fp32 value.
    tol = dict(atol=1e-6, rtol=2**-7 if dtype == torch.bfloat16 else 1e-6)
    torch.testing.assert_close(grad, x_torch.grad, **tol)
    assert grad[:, num_routed:].abs().sum() == 0

    # Only one output used: the other gradients arrive as None.
    x_probs_only = logits.clone().to(_device()).requires_grad_()
    result = fused.fused_route_within_pools(x_probs_only, doc_ids_dev, in_pool_DR, **options)
    result.probs.sum().backward()
    x_ref = logits.clone().requires_grad_()
    route_within_pools(x_ref, in_pool_TR, **options).probs.sum().backward()
    torch.testing.assert_close(x_probs_only.grad.cpu(), x_ref.grad, **tol)


def test_pool_mask_from_scores_ties_and_full_pools() -> None:
    scores_DR = torch.tensor([[1.0, 3.0, 3.0, 0.0, 3.0], [0.0, 0.0, 0.0, 0.0, 0.0]])
    in_pool = pool_mask_from_scores(scores_DR, torch.tensor([2, 7]))
    assert in_pool.tolist() == [[False, True, True, False, False], [True] * 5]


def test_fused_rejects_bad_arguments(fused) -> None:
    logits, doc_ids, in_pool = _on(
        torch.randn(8, 9), torch.zeros(8, dtype=torch.int64), torch.ones(1, 8, dtype=torch.bool)
    )
    with pytest.raises(ValueError, match=r"topk \(10\)"):
        fused.fused_route_within_pools(logits, doc_ids, in_pool, topk=10, num_shared_experts=1)
    with pytest.raises(ValueError, match="7 routed experts"):
        fused.fused_route_within_pools(logits, doc_ids, in_pool, topk=3, num_shared_experts=2)
    with pytest.raises(ValueError, match="neither"):
        fused.fused_route_within_pools(logits, doc_ids, None, topk=3, num_shared_experts=1)
