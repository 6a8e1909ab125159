"""EMO auxiliary losses (``load_balancing_loss``, ``expert_load``, ``z_loss``) vs loop references.

Also checks the switch-loss special case, uniform routing = 1, reduce_fn invariance, the
data-parallel-size independence of the gradient, padding masks and the -inf handling of z-loss.
Run: ``OMP_NUM_THREADS=1 .venv/bin/python -m pytest tests/unit/test_losses.py -q``
"""

from __future__ import annotations

import pytest
import torch

from megatron_emo.routing import (
    document_pool_mask,
    expert_load,
    load_balancing_loss,
    route_within_pools,
    z_loss,
)

from reference import reference_load_balancing_loss, reference_z_loss


def _routed(
    seed: int, num_tokens: int = 64, num_routed: int = 12, num_slots: int = 3, pool: int = 6
):
    """Random pool-masked routing (S = 1): returns ``(logits (T, R+1), EMORouting)``."""
    gen = torch.Generator().manual_seed(seed)
    logits = 2.0 * torch.randn(num_tokens, num_routed + 1, generator=gen)
    doc_ids = torch.sort(torch.randint(0, 5, (num_tokens,), generator=gen)).values
    in_pool = document_pool_mask(logits[:, :num_routed], doc_ids, torch.full((5,), pool))
    out = route_within_pools(logits, in_pool, topk=num_slots + 1, num_shared_experts=1)
    return logits, out


SEEDS = [0, 1, 2]


@pytest.mark.parametrize("seed", SEEDS, ids=[f"seed{s}" for s in SEEDS])
def test_load_balancing_loss_matches_reference(seed: int) -> None:
    _, out = _routed(seed)
    loss = load_balancing_loss(out.scores, out.routed_map, topk=3)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    ref = reference_load_balancing_loss(out.scores, out.routed_map, 3)
    assert abs(float(loss) - ref) < 1e-6


def test_no_pool_equals_standard_switch_loss() -> None:
    gen = torch.Generator().manual_seed(5)
    num_tokens, num_routed, k = 80, 10, 3
    logits = torch.randn(num_tokens, num_routed + 1, generator=gen)
    out = route_within_pools(
        logits, torch.ones(num_tokens, num_routed, dtype=torch.bool), topk=k + 1,
        num_shared_experts=1,
    )
    loss = load_balancing_loss(out.scores, out.routed_map, topk=k)
    # Plain softmax + top-K switch loss over the routed experts.
    probs = torch.softmax(logits[:, :num_routed], dim=-1)
    top = probs.topk(k, dim=-1).indices
    counts = torch.zeros(num_routed).scatter_add_(0, top.flatten(), torch.ones(top.numel()))
    switch = (num_routed / k) * torch.sum(counts / num_tokens * probs.mean(dim=0))
    torch.testing.assert_close(loss, switch, atol=1e-6, rtol=0)


def test_uniform_routing_gives_one() -> None:
    num_routed, k = 8, 3
    scores = torch.full((num_routed, num_routed), 1.0 / num_routed)
    routed_map = torch.zeros(num_routed, num_routed, dtype=torch.bool)
    for t in range(num_routed):
        for j in range(k):
            routed_map[t, (t + j) % num_routed] = True
    loss = load_balancing_loss(scores, routed_map, topk=k)
    torch.testing.assert_close(loss, torch.tensor(1.0), atol=1e-6, rtol=0)


def test_reduce_fn_of_identical_ranks_leaves_loss_unchanged() -> None:
    _, out = _routed(3)
    plain = load_balancing_loss(out.scores, out.routed_map, topk=3)
    doubled = load_balancing_loss(out.scores, out.routed_map, topk=3, reduce_fn=lambda x: 2 * x)
    torch.testing.assert_close(doubled, plain, atol=1e-7, rtol=0)


def test_expert_load_layout() -> None:
    routed_map = torch.tensor([[1, 0, 1], [0, 0, 1], [1, 0, 1]], dtype=torch.bool)
    assert expert_load(routed_map).tolist() == [2.0, 0.0, 3.0, 3.0]
    valid = torch.tensor([True, False, True])
    assert expert_load(routed_map, valid_T=valid).tolist() == [2.0, 0.0, 2.0, 2.0]
    assert expert_load(routed_map, reduce_fn=lambda x: 3 * x).tolist() == [6.0, 0.0, 9.0, 9.0]


def test_precomputed_load_matches_reduce_fn() -> None:
    _, out = _routed(4)
    load = expert_load(out.routed_map, reduce_fn=lambda x: 2 * x)
    a = load_balancing_loss(out.scores, out.routed_map, topk=3, load_R1=load)
    b = load_balancing_loss(out.scores, out.routed_map, topk=3, reduce_fn=lambda x: 2 * x)
    torch.testing.assert_close(a, b)


def _lb_grad(logits: torch.Tensor, in_pool: torch.Tensor, reduce_fn=None) -> torch.Tensor:
    logits = logits.detach().clone().requires_grad_(True)
    out = route_within_pools(logits, in_pool, topk=4, num_shared_experts=1)
    loss = load_balancing_loss(out.scores, out.routed_map, topk=3, reduce_fn=reduce_fn)
    (grad,) = torch.autograd.grad(loss, logits)
    return grad


@pytest.mark.parametrize("seed", [0, 1], ids=["seed0", "seed1"])
def test_gradient_independent_of_data_parallel_size(seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    num_tokens, num_routed = 64, 12
    logits = 2.0 * torch.randn(num_tokens, num_routed + 1, generator=gen, dtype=torch.float64)
    doc_ids = torch.sort(torch.randint(0, 6, (num_tokens,), generator=gen)).values
    in_pool = document_pool_mask(logits[:, :num_routed], doc_ids,
                                 torch.randint(3, 13, (6,), generator=gen))

    full_grad = _lb_grad(logits, in_pool)

    # Two "ranks" with equal token counts; the all-reduce of the loads is simulated by a closure.
    halves = [slice(0, num_tokens // 2), slice(num_tokens // 2, num_tokens)]
    loads = []
    for h in halves:
        out = route_within_pools(logits[h], in_pool[h], topk=4, num_shared_experts=1)
        loads.append(expert_load(out.routed_map))
    total = loads[0] + loads[1]
    half_grads = [_lb_grad(logits[h], in_pool[h], reduce_fn=lambda x: total) for h in halves]
    # Data-parallel gradient averaging over the 2 ranks.
    dp_grad = torch.cat(half_grads) / 2
    assert full_grad.abs().max() > 0
    torch.testing.assert_close(dp_grad, full_grad, atol=1e-6, rtol=0)


def test_valid_mask_excludes_padding_from_both_factors() -> None:
    _, out = _routed(6, num_tokens=40)
    _, pad = _routed(7, num_tokens=10)
    scores = torch.cat([out.scores, pad.scores]).requires_grad_(True)
    routed_map = torch.cat([out.routed_map, pad.routed_map])
    valid = torch.cat([torch.ones(40, dtype=torch.bool), torch.zeros(10, dtype=torch.bool)])
    masked = load_balancing_loss(scores, routed_map, topk=3, valid_T=valid)
    unpadded = load_balancing_loss(out.scores, out.routed_map, topk=3)
    torch.testing.assert_close(masked, unpadded, atol=1e-6, rtol=0)
    (grad,) = torch.autograd.grad(masked, scores)
    assert torch.all(grad[40:] == 0)


@pytest.mark.parametrize("seed", SEEDS, ids=[f"seed{s}" for s in SEEDS])
def test_z_loss_matches_reference(seed: int) -> None:
    _, out = _routed(seed)
    loss = z_loss(out.masked_logits)
    assert torch.isinf(out.masked_logits).any()
    assert (abs(float(loss) - reference_z_loss(out.masked_logits))
            < 1e-5 * max(1.0, abs(float(loss))))


def test_z_loss_ignores_masked_entries() -> None:
    gen = torch.Generator().manual_seed(9)
    logits = torch.randn(16, 8, generator=gen, dtype=torch.float64)
    in_pool = torch.rand(16, 8, generator=gen) < 0.5
    in_pool[:, 0] = True
    masked = logits.masked_fill(~in_pool, float("-inf")).requires_grad_(True)
    loss = z_loss(masked)
    (grad,) = torch.autograd.grad(loss, masked)
    assert torch.isfinite(loss)
    assert torch.all(torch.isfinite(grad))
    assert torch.all(grad[~in_pool] == 0)
    # Equals the loss computed over the pool entries only.
    expect = torch.stack(
        [torch.logsumexp(logits[t][in_pool[t]].float(), 0) ** 2 for t in range(16)]
    ).mean()
    torch.testing.assert_close(loss, expect, atol=1e-5, rtol=1e-6)

    # Gradient through route_within_pools reaches only the pool logits.
    raw = logits.clone().requires_grad_(True)
    out = route_within_pools(torch.cat([raw, torch.zeros(16, 1, dtype=torch.float64)], 1), in_pool,
                             topk=2, num_shared_experts=1)
    (g,) = torch.autograd.grad(z_loss(out.masked_logits), raw)
    assert torch.all(torch.isfinite(g)) and torch.all(g[~in_pool] == 0)


def test_z_loss_valid_mask() -> None:
    gen = torch.Generator().manual_seed(10)
    logits = torch.randn(12, 6, generator=gen)
    valid = torch.tensor([True] * 8 + [False] * 4)
    torch.testing.assert_close(z_loss(logits, valid_T=valid), z_loss(logits[:8]))
