"""Two gloo processes on CPU: distributed EMO routing equals the single-process result.

EP=2 equals EP=1; documents split over SP or CP ranks get the pools and the per-document routing
diagnostics of the unsplit batch; the load-balancing gradient under DP=2 equals the single-process
gradient.

Run: ``OMP_NUM_THREADS=1 .venv/bin/python -m pytest tests/distributed -q``
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from helpers import SEQ, build_tiny_gpt, run_distributed, tiny_batch, tiny_config


def _ep_equivalence(rank: int, world_size: int, dispatcher: str) -> None:
    from megatron_emo.cpu import initialize_model_parallel_cpu
    from megatron_emo.mcore import routing_context

    tokens, position_ids, mask, docs = tiny_batch()  # the same batch on both ranks

    def run(model):
        model.train()
        with routing_context(docs):
            loss = model(tokens, position_ids, mask, labels=tokens)
        loss.sum().backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    initialize_model_parallel_cpu(expert_model_parallel_size=1, seed=5)
    ref_model = build_tiny_gpt(tiny_config(moe_token_dispatcher_type=dispatcher), seed=11)
    ref_state = {
        k: v.clone() if torch.is_tensor(v) else v for k, v in ref_model.state_dict().items()
    }
    ref_loss, ref_grads = run(ref_model)

    initialize_model_parallel_cpu(expert_model_parallel_size=2, seed=5)
    config = tiny_config(moe_token_dispatcher_type=dispatcher, expert_model_parallel_size=2)
    model = build_tiny_gpt(config, seed=99)  # different init: every weight must come from ref
    num_local = config.num_moe_experts // 2

    def global_name(name: str) -> str:
        # decoder.layers.L.mlp.experts.local_experts.I.* -> expert rank * num_local + I
        if ".local_experts." not in name:
            return name
        head, tail = name.split(".local_experts.")
        local, rest = tail.split(".", 1)
        return f"{head}.local_experts.{rank * num_local + int(local)}.{rest}"

    state = {k: ref_state[global_name(k)] for k in model.state_dict()}
    model.load_state_dict(state, strict=True)
    loss, grads = run(model)

    torch.testing.assert_close(loss, ref_loss, atol=1e-6, rtol=0)
    for name, grad in grads.items():
        ref = ref_grads[global_name(name)]
        if ".local_experts." in name:
            ref = 2 * ref  # both ranks' (identical) tokens reach every expert once EP=2
        torch.testing.assert_close(grad, ref, atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.parametrize("dispatcher", ["allgather", "alltoall"], ids=["allgather", "alltoall"])
def test_ep2_equals_ep1(dispatcher):
    run_distributed(_ep_equivalence, 2, dispatcher)


def _router_and_inputs(config, *, seq: int, bsz: int):
    """An EMORouter with fixed weights plus fixed hidden states ``[seq, bsz, h]`` and documents."""
    from megatron.core.transformer.moe.moe_utils import ProcessGroupCollection

    from megatron_emo.mcore import EMORouter
    from megatron_emo.routing import DocumentBatch

    router = EMORouter(config, pg_collection=ProcessGroupCollection.use_mpu_process_groups())
    router.set_layer_number(1)
    gen = torch.Generator().manual_seed(0)
    router.weight.data.copy_(torch.randn(router.weight.shape, generator=gen))
    hidden = torch.randn(seq, bsz, config.hidden_size, generator=gen)
    # Documents of random length, several crossing the middle of the sequence.
    cuts = torch.sort(torch.randperm(seq - 1, generator=gen)[:5] + 1).values
    doc_ids_S = torch.bucketize(torch.arange(seq), cuts, right=True)
    doc_ids_BS = torch.stack([doc_ids_S + b * (len(cuts) + 1) for b in range(bsz)])
    docs = DocumentBatch(doc_ids_BS, 500 + torch.arange(bsz * (len(cuts) + 1)), iteration=3)
    return router, hidden, docs


def _expected_full(router, hidden, docs):
    from megatron_emo.routing import emo_route, sample_pool_sizes

    config = router.config
    logits = hidden.float() @ router.weight.detach().float().t()
    logits = logits.reshape(-1, config.num_moe_experts)
    pools = sample_pool_sizes(
        docs.doc_keys, seed=config.emo_pool_size_seed, iteration=docs.iteration, layer=1,
        min_size=config.emo_pool_size_min, max_size=config.emo_pool_size_max,
    )
    return emo_route(logits, docs.doc_ids.t().reshape(-1), pools, topk=config.moe_router_topk,
                     num_shared_experts=config.emo_num_shared_experts)


def _split_documents(rank: int, world_size: int, mode: str) -> None:
    from megatron_emo.cpu import initialize_model_parallel_cpu
    from megatron_emo.mcore import RoutingMetricsTracker, routing_context
    from megatron_emo.routing import DocumentBatch, document_pool_mask, sample_pool_sizes

    seq, bsz = 32, 2
    common = dict(num_moe_experts=16, moe_router_topk=3, emo_pool_size_min=2, emo_pool_size_max=4)
    if mode == "sp":
        initialize_model_parallel_cpu(tensor_model_parallel_size=2)
        config = tiny_config(tensor_model_parallel_size=2, sequence_parallel=True, **common)
    else:
        initialize_model_parallel_cpu(context_parallel_size=2)
        config = tiny_config(context_parallel_size=2, **common)
    router, hidden, docs = _router_and_inputs(config, seq=seq, bsz=bsz)
    exp_probs, exp_map = _expected_full(router, hidden, docs)

    half = seq // 2
    shard = slice(rank * half, (rank + 1) * half)
    shard_ids = docs.doc_ids[:, shard] if mode == "cp" else docs.doc_ids  # CP: the step slices
    docs = DocumentBatch(shard_ids, docs.doc_keys, docs.iteration)
    metrics = RoutingMetricsTracker()
    router.train()
    with routing_context(docs, metrics=metrics):
        probs, routing_map = router(hidden[shard])
    rows = slice(rank * half * bsz, (rank + 1) * half * bsz)  # router order is [s, b]
    assert torch.equal(routing_map, exp_map[rows])
    torch.testing.assert_close(probs.detach(), exp_probs[rows], atol=1e-6, rtol=0)

    # Per-document diagnostics are those of whole documents, although some documents have no
    # token on this shard (they would count as using no expert).
    from megatron_emo.routing import route_within_pools, routing_metrics

    logits_TE = (hidden.float() @ router.weight.detach().float().t()).reshape(-1, 16)
    full_ids_T = _full_doc_ids(seq, bsz, docs, mode)
    pools_D = sample_pool_sizes(docs.doc_keys, seed=config.emo_pool_size_seed, iteration=3,
                                layer=1, min_size=2, max_size=4)
    in_pool_TR = document_pool_mask(logits_TE[:, :15], full_ids_T, pools_D)
    full = route_within_pools(logits_TE, in_pool_TR, topk=3, num_shared_experts=1)
    whole_doc = routing_metrics(full.scores, full.routed_map, in_pool_TR, full_ids_T, pools_D)
    assert set(full_ids_T[rows].tolist()) != set(range(docs.num_docs))  # some doc not on shard
    for name in ("pool_size_mean", "experts_per_document", "document_routing_entropy"):
        torch.testing.assert_close(metrics.sums(1)[name], whole_doc[name], msg=name)

    # Sensitivity: pools computed from this shard alone differ from whole-document pools.
    whole = in_pool_TR[rows]
    local = document_pool_mask(logits_TE[rows, :15], full_ids_T[rows], pools_D)
    differs = torch.tensor(float(not torch.equal(whole, local)))
    dist.all_reduce(differs)
    assert differs.item() > 0, "test batch too easy: shard-local pools already agree"


def _full_doc_ids(seq, bsz, docs, mode):
    """The unsplit ``(T,)`` ids in router order (CP ranks hold only their slice of ``docs``)."""
    if mode == "sp":
        return docs.doc_ids.t().reshape(-1)
    parts = [torch.empty(bsz, seq // 2, dtype=torch.int64) for _ in range(2)]
    dist.all_gather(parts, docs.doc_ids.contiguous())
    return torch.cat(parts, dim=1).t().reshape(-1)


@pytest.mark.parametrize("mode", ["sp", "cp"], ids=["sequence-parallel", "context-parallel"])
def test_split_documents_get_whole_document_pools(mode):
    run_distributed(_split_documents, 2, mode)


def _lb_gradient(rank: int, world_size: int, accumulate: bool, microbatches: str) -> None:
    """DP=2 router gradients of the balancing loss, averaged like DDP, vs one process."""
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    from megatron_emo.cpu import initialize_model_parallel_cpu
    from megatron_emo.mcore import routing_context
    from megatron_emo.routing import (
        DocumentBatch,
        document_pool_mask,
        expert_load,
        load_balancing_loss,
        route_within_pools,
        sample_pool_sizes,
    )

    initialize_model_parallel_cpu()  # DP = 2
    config = tiny_config(num_layers=1, moe_aux_loss_coeff=1.0, moe_z_loss_coeff=None,
                         num_moe_experts=16, moe_router_topk=4, emo_pool_size_min=3,
                         emo_pool_size_max=9, emo_lb_accumulate_microbatches=accumulate)
    router, hidden, docs = _router_and_inputs(config, seq=SEQ, bsz=4)
    gen = torch.Generator().manual_seed(1)
    hiddens = {
        "one": [hidden],
        "repeated": [hidden] * 3,  # identical micro-batches: the 1/M scale must cancel
        "distinct": [torch.randn(SEQ, 4, config.hidden_size, generator=gen) for _ in range(3)],
    }[microbatches]
    num_mb = len(hiddens)

    # Single-process reference: whole micro-batches, pure functions, autograd, mean over them.
    weight = router.weight.detach().clone().requires_grad_(True)
    pools = sample_pool_sizes(docs.doc_keys, seed=config.emo_pool_size_seed,
                              iteration=docs.iteration, layer=1, min_size=3, max_size=9)
    running, total = torch.zeros(16), 0.0
    for h in hiddens:
        logits = (h.reshape(-1, config.hidden_size) @ weight.t()).reshape(-1, 16)
        in_pool = document_pool_mask(logits[:, :15], docs.doc_ids.t().reshape(-1), pools)
        result = route_within_pools(logits, in_pool, topk=4, num_shared_experts=1)
        running = running + expert_load(result.routed_map)
        load = running if accumulate else None
        loss = load_balancing_loss(result.scores, result.routed_map, topk=3, load_R1=load)
        total = total + loss / num_mb
    total.backward()

    # DP = 2: each rank routes half of the sequences of every micro-batch.
    half = slice(rank * 2, rank * 2 + 2)
    local_docs = DocumentBatch(docs.doc_ids[half], docs.doc_keys, docs.iteration)
    router.train()
    MoEAuxLossAutoScaler.set_loss_scale(torch.tensor(1.0 / num_mb))  # what the schedule sets
    for h in hiddens:
        with routing_context(local_docs):
            probs, _ = router(h[:, half].contiguous())
        (probs * 0).sum().backward()
    grad = router.weight.grad.clone()
    dist.all_reduce(grad)
    grad /= world_size  # DDP's gradient averaging
    torch.testing.assert_close(grad, weight.grad, atol=1e-6, rtol=1e-5)

    if accumulate:  # a new iteration starts a new running load
        assert router._step_load_R1[-1].item() == num_mb * 2 * SEQ * world_size
        with routing_context(DocumentBatch(local_docs.doc_ids, docs.doc_keys, docs.iteration + 1)):
            router(hiddens[0][:, half].contiguous())
        assert router._step_load_R1[-1].item() == 2 * SEQ * world_size


@pytest.mark.parametrize(
    ("accumulate", "microbatches"),
    [(False, "one"), (False, "repeated"), (False, "distinct"), (True, "distinct")],
    ids=["1-microbatch", "3-identical", "3-distinct", "3-distinct-step-accumulated"],
)
def test_load_balancing_gradient_is_independent_of_dp_size(accumulate, microbatches):
    run_distributed(_lb_gradient, 2, accumulate, microbatches)
