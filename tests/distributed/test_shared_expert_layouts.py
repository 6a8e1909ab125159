"""The EP-balanced layout on 2 gloo processes, scaled down from the 1B14B recipe.

Layouts: in-router (15 routed + 1 shared expert inside the router, top-4 = 3 + 1) and balanced
(Megatron's ungated ``SharedExpertMLP`` + 15 routed + 1 never-routed padding expert, top-3).
Checks: the same weights give the same logits, loss, balancing and z-loss and gradients in both
layouts at EP=1 and EP=2; the padding expert and its router row receive no token and no
gradient; the tokens each EP rank's experts receive equal the routing maps' counts, and the
in-router layout puts every token's shared-expert copy on EP rank 1 on top of the same routed
load (the benchmark ``benchmarks/bench_ep_load.py`` measures max/mean at the recipe's size).

Run: ``OMP_NUM_THREADS=1 python -m pytest tests/distributed/test_shared_expert_layouts.py``
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from helpers import build_tiny_gpt, capture_router_io, run_distributed, tiny_batch, tiny_config

COMMON = dict(num_moe_experts=16, emo_pool_size_min=3, emo_pool_size_max=12)
IN_ROUTER = dict(COMMON, emo_num_shared_experts=1, moe_router_topk=4)
BALANCED = dict(COMMON, emo_num_shared_experts=0, emo_num_padding_experts=1, moe_router_topk=3,
                moe_shared_expert_intermediate_size=16)
SHARED, PADDING = 15, 15  # expert 15: the shared expert (in-router) / the padding expert
SHARED_PREFIX = f".experts.local_experts.{SHARED}."


def _expert_name(name: str, ep_rank: int, num_local: int) -> tuple[str, int | None]:
    """``...local_experts.I.rest`` -> (``...local_experts.{global}.rest``, global id)."""
    if ".local_experts." not in name:
        return name, None
    head, tail = name.split(".local_experts.")
    local, rest = tail.split(".", 1)
    expert = ep_rank * num_local + int(local)
    return f"{head}.local_experts.{expert}.{rest}", expert


def _balanced_state(model, ref_state: dict, ep_rank: int, num_local: int) -> dict:
    """The in-router reference weights in the balanced layout.

    The padding expert and its router row keep arbitrary (large) values that must not matter.
    """
    gen = torch.Generator().manual_seed(123)
    state = {}
    for name, value in model.state_dict().items():
        global_name, expert = _expert_name(name, ep_rank, num_local)
        if not torch.is_tensor(value):
            state[name] = value
        elif ".shared_experts." in name:
            state[name] = ref_state[name.replace(".shared_experts.", SHARED_PREFIX)]
        elif expert == PADDING:
            state[name] = 5 * torch.randn(value.shape, generator=gen)
        elif name.endswith("router.weight"):
            padding_row = 5 * torch.randn(1, value.shape[1], generator=gen)
            state[name] = torch.cat([ref_state[name][:15], padding_row])
        else:
            state[name] = ref_state[global_name]
    return state


def _run(model, batch, *, ep_rank: int, num_local: int):
    """Train-mode logits, loss, logged aux losses, gradients and tokens per local expert."""
    from megatron.core.transformer.moe import moe_logging
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    from megatron_emo.mcore import routing_context

    tokens, position_ids, mask, docs = batch
    received = []
    for layer in model.decoder.layers:
        layer.mlp.experts.register_forward_pre_hook(
            lambda mod, args: received.append(torch.as_tensor(args[1]).clone())
        )
    records = capture_router_io(model)
    model.train()
    MoEAuxLossAutoScaler.set_loss_scale(torch.ones(()))
    with routing_context(docs), torch.no_grad():
        logits = model(tokens, position_ids, mask)
    tracker = moe_logging.get_moe_metrics_tracker()
    for entry in tracker.metrics.values():
        entry.values.zero_()
    with routing_context(docs):
        loss = model(tokens, position_ids, mask, labels=tokens)
    loss.mean().backward()
    aux = {name: entry.values.clone() for name, entry in tracker.metrics.items()}
    grads = {}
    for name, param in model.named_parameters():
        grads[_expert_name(name, ep_rank, num_local)[0]] = (
            torch.zeros_like(param) if param.grad is None else param.grad.clone()
        )
    maps = [r["routing_map"] for r in records[len(model.decoder.layers):]]  # the loss forward's
    return logits, loss.detach(), aux, grads, received[len(model.decoder.layers):], maps


def _layouts(rank: int, world_size: int) -> None:
    from megatron_emo.cpu import initialize_model_parallel_cpu

    batch = tiny_batch(batch_size=4)  # the same batch on both ranks
    ref_config = tiny_config(**IN_ROUTER)

    def compare(a, b, *, scale_experts: float = 1.0):
        logits_a, loss_a, aux_a, grads_a = a[:4]
        logits_b, loss_b, aux_b, grads_b = b[:4]
        torch.testing.assert_close(logits_b, logits_a, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(loss_b, loss_a, atol=1e-5, rtol=1e-5)
        assert set(aux_a) == set(aux_b) == {"load_balancing_loss", "z_loss"}
        for name in aux_a:
            torch.testing.assert_close(aux_b[name], aux_a[name], atol=1e-6, rtol=1e-5)
        for name, grad in grads_b.items():
            if ".shared_experts." in name:
                ref = grads_a.get(name.replace(".shared_experts.", SHARED_PREFIX))
                if ref is not None:
                    torch.testing.assert_close(grad, ref * scale_experts, atol=1e-5, rtol=1e-4)
            elif f".local_experts.{PADDING}." in name:
                assert torch.all(grad == 0), name
            elif name.endswith("router.weight"):
                assert torch.all(grad[15] == 0), "padding router row got a gradient"
                torch.testing.assert_close(grad[:15], grads_a[name][:15], atol=1e-5, rtol=1e-4)
            elif name in grads_a:
                torch.testing.assert_close(grad, grads_a[name], atol=1e-5, rtol=1e-4, msg=name)

    # EP = 1: both layouts in one process.
    initialize_model_parallel_cpu(expert_model_parallel_size=1, seed=5)
    ref_model = build_tiny_gpt(ref_config, seed=11)
    ref_state = {k: v.clone() if torch.is_tensor(v) else v
                 for k, v in ref_model.state_dict().items()}
    ref = _run(ref_model, batch, ep_rank=0, num_local=16)
    model = build_tiny_gpt(tiny_config(**BALANCED), seed=99)
    model.load_state_dict(_balanced_state(model, ref_state, 0, 16), strict=True)
    compare(ref, _run(model, batch, ep_rank=0, num_local=16))

    # EP = 2: 8 experts per rank; the balanced layout's padding expert sits on rank 1.
    initialize_model_parallel_cpu(expert_model_parallel_size=2, seed=5)
    runs = {}
    for layout, overrides in (("in-router", IN_ROUTER), ("balanced", BALANCED)):
        model = build_tiny_gpt(tiny_config(expert_model_parallel_size=2, **overrides), seed=99)
        if layout == "in-router":
            state = {k: ref_state[_expert_name(k, rank, 8)[0]] for k in model.state_dict()}
        else:
            state = _balanced_state(model, ref_state, rank, 8)
        model.load_state_dict(state, strict=True)
        runs[layout] = _run(model, batch, ep_rank=rank, num_local=8)
    torch.testing.assert_close(runs["in-router"][1], ref[1], atol=1e-5, rtol=1e-5)
    # Both ranks feed the (identical) batch to every expert, so expert gradients double at EP = 2,
    # while each rank's SharedExpertMLP sees its own tokens only.
    compare(runs["in-router"], runs["balanced"], scale_experts=0.5)

    # Tokens each EP rank's experts receive (per layer) vs the routing maps of both ranks. The
    # routing is the same in both layouts (same weights), so the in-router layout's extra load is
    # exactly the shared expert's: every token of both ranks, all on EP rank 1.
    num_tokens = 2 * batch[0].numel()
    loads = {}
    for layout, run in runs.items():
        maps = run[5]
        for layer, received_local in enumerate(run[4]):
            all_maps = [torch.empty_like(maps[layer]) for _ in range(world_size)]
            dist.all_gather(all_maps, maps[layer])
            per_expert = sum(m.long().sum(0) for m in all_maps)
            assert torch.equal(received_local.long(), per_expert[rank * 8 : (rank + 1) * 8]), layout
            loads[layout, layer] = torch.stack([per_expert[:8].sum(), per_expert[8:].sum()])
            if layout == "balanced":
                assert per_expert[PADDING] == 0
            else:
                assert per_expert[SHARED] == num_tokens
    for layer in range(2):
        in_router, balanced = loads["in-router", layer], loads["balanced", layer]
        extra = in_router - balanced
        assert torch.equal(extra, torch.tensor([0, num_tokens])), (in_router, balanced)


def test_balanced_layout_equals_in_router_layout_and_balances_ep_ranks():
    run_distributed(_layouts, 2)
