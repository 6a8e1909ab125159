"""EMO routing (``emo_route``, ``document_pool_mask``, ``route_within_pools``) vs a loop reference.

Checks exact routing maps and probabilities (1e-6) against ``tests/reference.py`` on random and
edge-case inputs, routing invariants, the ``reduce_fn`` hook, and the router options.
Run: ``OMP_NUM_THREADS=1 .venv/bin/python -m pytest tests/unit/test_routing_math.py -q``
"""

from __future__ import annotations

import pytest
import torch

from megatron_emo.routing import (
    descending_keys,
    document_pool_mask,
    emo_route,
    route_within_pools,
    segment_sum,
    topk_lowest_index,
)

from helpers import random_doc_ids
from reference import reference_doc_ids_from_eod, reference_emo_route, reference_pools

EOD = 0



def _window_doc_ids(batch: int, seq: int, gen: torch.Generator) -> torch.Tensor:
    """Document ids of ``batch`` windows with random EODs: documents cut at both window edges."""
    tokens = torch.randint(1, 50, (batch, seq), generator=gen)
    tokens[torch.rand(batch, seq, generator=gen) < 0.15] = EOD
    doc_ids, _ = reference_doc_ids_from_eod(tokens, EOD)
    return doc_ids.reshape(-1)


def _make_case(name: str) -> dict:
    """Inputs of one named routing case (all deterministic)."""
    gen = torch.Generator().manual_seed(sum(map(ord, name)))
    case = dict(num_experts=17, num_shared=1, topk=4, renormalize=False)
    num_tokens = 96
    if name in ("random_many_docs", "renormalize"):
        doc_ids = random_doc_ids(num_tokens, 12, gen)
        case["renormalize"] = name == "renormalize"
    elif name == "single_token_docs":
        num_tokens = 24
        doc_ids = torch.arange(num_tokens)
    elif name == "window_edges":
        doc_ids = _window_doc_ids(3, 32, gen)
    elif name == "no_eod_one_doc":
        doc_ids = torch.zeros(num_tokens, dtype=torch.int64)
    elif name.startswith("shared"):
        case["num_shared"] = int(name[-1])
        case["topk"] = 4 + case["num_shared"]
        case["num_experts"] = 16 + case["num_shared"]
        doc_ids = random_doc_ids(num_tokens, 10, gen)
    elif name == "pool_ge_routed":
        doc_ids = random_doc_ids(num_tokens, 6, gen)
    elif name == "pool_eq_slots":
        doc_ids = random_doc_ids(num_tokens, 6, gen)
    else:
        raise KeyError(name)
    num_docs = int(doc_ids.max()) + 1
    num_routed = case["num_experts"] - case["num_shared"]
    num_slots = case["topk"] - case["num_shared"]
    if name == "pool_ge_routed":
        pool_sizes = torch.randint(num_routed, num_routed + 5, (num_docs,), generator=gen)
    elif name == "pool_eq_slots":
        pool_sizes = torch.full((num_docs,), num_slots, dtype=torch.int64)
    else:
        pool_sizes = torch.randint(num_slots, num_routed + 2, (num_docs,), generator=gen)
    case["logits"] = 2.0 * torch.randn(num_tokens, case["num_experts"], generator=gen)
    case["doc_ids"] = doc_ids
    case["pool_sizes"] = pool_sizes
    return case


CASES = [
    "random_many_docs",
    "single_token_docs",
    "window_edges",
    "no_eod_one_doc",
    "pool_ge_routed",
    "pool_eq_slots",
    "shared_S0",
    "shared_S2",
    "shared_S3",
    "renormalize",
]


def _check_against_reference(case: dict) -> None:
    probs, routing_map = emo_route(
        case["logits"],
        case["doc_ids"],
        case["pool_sizes"],
        topk=case["topk"],
        num_shared_experts=case["num_shared"],
        renormalize=case["renormalize"],
    )
    ref_probs, ref_map = reference_emo_route(
        case["logits"],
        case["doc_ids"],
        case["pool_sizes"],
        topk=case["topk"],
        num_shared_experts=case["num_shared"],
        renormalize=case["renormalize"],
    )
    assert routing_map.dtype == torch.bool
    assert probs.dtype == case["logits"].dtype
    assert torch.equal(routing_map, ref_map)
    torch.testing.assert_close(probs.double(), ref_probs, atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", CASES, ids=CASES)
def test_emo_route_matches_reference(name: str) -> None:
    _check_against_reference(_make_case(name))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_emo_route_matches_reference_dtypes(dtype: torch.dtype) -> None:
    case = _make_case("random_many_docs")
    case["logits"] = case["logits"].to(dtype)
    _check_against_reference(case)


def test_pool_ties_go_to_lower_index() -> None:
    # 8 routed experts: 0 and 1 dominate, 4 and 5 are identical columns tied at the pool edge.
    row = torch.tensor([10.0, 9.0, -3.0, -3.0, -1.0, -1.0, -3.0, -3.0])
    logits = row.expand(5, 8).clone()
    doc_ids = torch.zeros(5, dtype=torch.int64)
    in_pool = document_pool_mask(logits, doc_ids, torch.tensor([3]))
    assert in_pool[0].nonzero().flatten().tolist() == [0, 1, 4]
    assert all(torch.equal(in_pool[t], in_pool[0]) for t in range(5))


def test_pool_all_equal_logits_takes_lowest_indices() -> None:
    logits = torch.zeros(6, 10)
    doc_ids = torch.tensor([0, 0, 0, 1, 1, 1])
    in_pool = document_pool_mask(logits, doc_ids, torch.tensor([3, 5]))
    assert in_pool[0].nonzero().flatten().tolist() == [0, 1, 2]
    assert in_pool[5].nonzero().flatten().tolist() == [0, 1, 2, 3, 4]


def test_descending_keys_order_like_floats_with_lower_index_first() -> None:
    tiny = 3e-39  # subnormal
    row = [0.0, -0.0, 1.0, -1.0, float("-inf"), float("inf"), -2.5, tiny, -tiny, 0.0, -0.0, 1.0]
    keys = descending_keys(torch.tensor([row]))
    assert keys.dtype == torch.int64 and keys.unique().numel() == len(row)
    order = torch.argsort(keys, descending=True)[0].tolist()
    assert order == sorted(range(len(row)), key=lambda i: (-row[i], i))
    # Rows are independent; fp64 input is ranked in fp32.
    values = torch.tensor([[2.0, 2.0, 1.0], [1.0, 2.0, 2.0]], dtype=torch.float64)
    assert topk_lowest_index(values, 2).tolist() == [[0, 1], [1, 2]]


def test_topk_lowest_index_ignores_the_zero_sign() -> None:
    values = torch.zeros(3, 10)
    values[:, ::2] = -0.0
    assert topk_lowest_index(values, 4).sort(dim=1).values.tolist() == [[0, 1, 2, 3]] * 3


TIE_CASES = ["duplicated_columns", "identical_rows", "all_equal_logits"]


def _tie_case(name: str) -> dict:
    gen = torch.Generator().manual_seed(7)
    case = dict(num_experts=13, num_shared=1, topk=4, renormalize=False)
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
    case["logits"] = logits
    case["doc_ids"] = random_doc_ids(40, 5, gen)
    case["pool_sizes"] = torch.tensor([3, 5, 7, 12, 20])
    return case


@pytest.mark.parametrize("name", TIE_CASES, ids=TIE_CASES)
def test_emo_route_ties_match_reference(name: str) -> None:
    _check_against_reference(_tie_case(name))


@pytest.mark.parametrize("name", TIE_CASES, ids=TIE_CASES)
def test_emo_route_ties_keep_invariants(name: str) -> None:
    # Whatever the tie-break, tied routing must stay inside the pools with the reference's weights.
    case = _tie_case(name)
    probs, routing_map = emo_route(
        case["logits"], case["doc_ids"], case["pool_sizes"], topk=case["topk"], num_shared_experts=1
    )
    _check_invariants(case["logits"], case["doc_ids"], case["pool_sizes"], probs, routing_map,
                      case["topk"], 1)
    ref_probs, _ = reference_emo_route(
        case["logits"], case["doc_ids"], case["pool_sizes"], topk=case["topk"], num_shared_experts=1
    )
    # Same multiset of weights per token (tied experts carry equal weights).
    torch.testing.assert_close(
        probs.double().sort(dim=1).values, ref_probs.sort(dim=1).values, atol=1e-6, rtol=0
    )


def _check_invariants(
    logits: torch.Tensor,
    doc_ids: torch.Tensor,
    pool_sizes: torch.Tensor,
    probs: torch.Tensor,
    routing_map: torch.Tensor,
    topk: int,
    num_shared: int,
) -> None:
    num_routed = logits.shape[1] - num_shared
    pools = reference_pools(logits, doc_ids, pool_sizes, num_shared_experts=num_shared)
    # Exactly topk experts per token, shared ones always on with weight exactly 1.0.
    assert torch.all(routing_map.sum(dim=1) == topk)
    assert torch.all(routing_map[:, num_routed:])
    assert torch.all(probs[:, num_routed:] == 1.0)
    # Zero probability off the map.
    assert torch.all(probs[~routing_map] == 0)
    for d, pool in pools.items():
        rows = routing_map[doc_ids == d, :num_routed]
        used = set(rows.any(dim=0).nonzero().flatten().tolist())
        assert used <= pool, f"doc {d} routed outside its pool: {sorted(used - pool)}"
        assert len(used) <= min(int(pool_sizes[d]), num_routed)


SEEDS = [0, 1, 2, 3]


@pytest.mark.parametrize("seed", SEEDS, ids=[f"seed{s}" for s in SEEDS])
def test_emo_route_invariants_random(seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    num_shared = seed % 3
    num_routed = 20
    topk = 5 + num_shared
    doc_ids = random_doc_ids(128, 1 + 4 * seed, gen)
    num_docs = int(doc_ids.max()) + 1
    pool_sizes = torch.randint(5, 24, (num_docs,), generator=gen)
    logits = 3.0 * torch.randn(128, num_routed + num_shared, generator=gen)
    probs, routing_map = emo_route(logits, doc_ids, pool_sizes, topk=topk,
                                   num_shared_experts=num_shared)
    _check_invariants(logits, doc_ids, pool_sizes, probs, routing_map, topk, num_shared)


@pytest.mark.parametrize("seed", [0, 1], ids=["seed0", "seed1"])
def test_reduce_fn_split_documents_give_same_pools(seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    logits = 2.0 * torch.randn(120, 16, generator=gen)
    doc_ids = random_doc_ids(120, 9, gen)
    num_docs = int(doc_ids.max()) + 1
    pool_sizes = torch.randint(2, 17, (num_docs,), generator=gen)
    full = document_pool_mask(logits, doc_ids, pool_sizes)

    # Half A: the first half of every document's tokens; half B: the rest.
    in_a = torch.zeros(120, dtype=torch.bool)
    for d in range(num_docs):
        idx = (doc_ids == d).nonzero().flatten()
        in_a[idx[: (len(idx) + 1) // 2]] = True
    parts = {}
    for name, sel in (("a", in_a), ("b", ~in_a)):
        probs = torch.softmax(logits[sel].float(), dim=-1)
        parts[name] = segment_sum(probs, doc_ids[sel], num_docs)

    # Each "rank" adds the other half's partial sums: a simulated all-reduce(SUM).
    mask_a = document_pool_mask(
        logits[in_a], doc_ids[in_a], pool_sizes, reduce_fn=lambda x: x + parts["b"]
    )
    mask_b = document_pool_mask(
        logits[~in_a], doc_ids[~in_a], pool_sizes, reduce_fn=lambda x: parts["a"] + x
    )
    assert torch.equal(mask_a, full[in_a])
    assert torch.equal(mask_b, full[~in_a])


def test_emo_route_reduce_fn_split_matches_unsplit() -> None:
    case = _make_case("random_many_docs")
    logits, doc_ids, pool_sizes = case["logits"], case["doc_ids"], case["pool_sizes"]
    num_docs = pool_sizes.shape[0]
    probs, routing_map = emo_route(logits, doc_ids, pool_sizes, topk=4)
    half = logits.shape[0] // 2  # cuts a document in the middle
    sums = [
        segment_sum(torch.softmax(logits[s, :16].float(), -1), doc_ids[s], num_docs)
        for s in (slice(None, half), slice(half, None))
    ]
    total = sums[0] + sums[1]
    p0, m0 = emo_route(logits[:half], doc_ids[:half], pool_sizes, topk=4, reduce_fn=lambda x: total)
    p1, m1 = emo_route(logits[half:], doc_ids[half:], pool_sizes, topk=4, reduce_fn=lambda x: total)
    assert torch.equal(torch.cat([m0, m1]), routing_map)
    torch.testing.assert_close(torch.cat([p0, p1]), probs, atol=1e-6, rtol=0)


# --- route_within_pools options ------------------------------------------------------------------


def _random_pool(num_tokens: int, num_routed: int, pool: int, gen: torch.Generator) -> torch.Tensor:
    in_pool = torch.zeros(num_tokens, num_routed, dtype=torch.bool)
    for t in range(num_tokens):
        in_pool[t, torch.randperm(num_routed, generator=gen)[:pool]] = True
    return in_pool


def test_sigmoid_scores_renormalise_to_one_inside_pool() -> None:
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(32, 13, generator=gen)
    in_pool = _random_pool(32, 12, 6, gen)
    out = route_within_pools(logits, in_pool, topk=4, num_shared_experts=1,
                             score_function="sigmoid")
    routed = out.probs[:, :12]
    torch.testing.assert_close(routed.sum(dim=1), torch.ones(32), atol=1e-6, rtol=0)
    assert not torch.any(out.routed_map & ~in_pool)
    assert torch.all(out.probs[:, 12] == 1.0)
    # Chosen = top-3 sigmoid inside the pool, weights proportional to the sigmoid.
    sig = torch.sigmoid(logits[:, :12]).masked_fill(~in_pool, -1.0)
    expect_idx = sig.topk(3, dim=1).indices
    assert torch.equal(out.routed_map, torch.zeros_like(in_pool).scatter_(1, expect_idx, True))
    w = sig.gather(1, expect_idx)
    torch.testing.assert_close(routed.gather(1, expect_idx), w / w.sum(1, keepdim=True),
                               atol=1e-6, rtol=0)


def test_expert_bias_changes_selection_but_stays_in_pool() -> None:
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(16, 9, generator=gen)
    in_pool = torch.zeros(16, 8, dtype=torch.bool)
    in_pool[:, :5] = True  # experts 5, 6, 7 are outside every pool
    base = route_within_pools(logits, in_pool, topk=3, num_shared_experts=1)

    bias_out = torch.zeros(8)
    bias_out[6] = 1e6
    out = route_within_pools(logits, in_pool, topk=3, num_shared_experts=1, expert_bias_R=bias_out)
    assert not out.routed_map[:, 5:].any()
    assert torch.equal(out.routed_map, base.routed_map)

    # A huge bias on an in-pool expert forces it into every token's selection; weights stay scores.
    bias_in = torch.zeros(8)
    bias_in[4] = 1e6
    out = route_within_pools(logits, in_pool, topk=3, num_shared_experts=1, expert_bias_R=bias_in)
    assert out.routed_map[:, 4].all()
    assert not torch.equal(out.routed_map, base.routed_map)
    assert not out.routed_map[:, 5:].any()
    torch.testing.assert_close(out.probs[:, 4], out.scores[:, 4].to(out.probs.dtype))


@pytest.mark.parametrize("renormalize", [False, True], ids=["raw", "renormalized"])
def test_scaling_factor_multiplies_routed_weights(renormalize: bool) -> None:
    gen = torch.Generator().manual_seed(2)
    logits = torch.randn(20, 11, generator=gen)
    in_pool = _random_pool(20, 10, 6, gen)
    kwargs = dict(topk=4, num_shared_experts=1, renormalize=renormalize)
    base = route_within_pools(logits, in_pool, **kwargs)
    scaled = route_within_pools(logits, in_pool, scaling_factor=2.5, **kwargs)
    assert torch.equal(scaled.routing_map, base.routing_map)
    torch.testing.assert_close(scaled.probs[:, :10], 2.5 * base.probs[:, :10])
    assert torch.all(scaled.probs[:, 10] == 1.0)


def test_route_within_pools_rejects_bad_topk() -> None:
    logits = torch.randn(4, 9)
    in_pool = torch.ones(4, 8, dtype=torch.bool)
    with pytest.raises(ValueError, match="topk"):
        route_within_pools(logits, in_pool, topk=1, num_shared_experts=1)
    with pytest.raises(ValueError, match="topk"):
        route_within_pools(logits, in_pool, topk=10, num_shared_experts=1)


def test_scores_and_masked_logits_outputs() -> None:
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(10, 9, generator=gen)
    in_pool = _random_pool(10, 8, 4, gen)
    out = route_within_pools(logits, in_pool, topk=3, num_shared_experts=1)
    assert torch.all(out.scores[~in_pool] == 0)
    torch.testing.assert_close(out.scores.sum(dim=1), torch.ones(10))
    assert torch.all(torch.isneginf(out.masked_logits[~in_pool]))
    torch.testing.assert_close(out.masked_logits[in_pool], logits[:, :8][in_pool])
    assert torch.equal(out.routed_map, out.routing_map[:, :8])
