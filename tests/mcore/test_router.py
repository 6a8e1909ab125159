"""EMORouter inside a real Megatron GPTModel on CPU.

Spec wiring, routing equals ``emo_route``, pools respected, losses attached and logged,
configuration errors.

Run: ``OMP_NUM_THREADS=1 .venv/bin/python -m pytest tests/mcore -q``
"""

from __future__ import annotations

import pytest
import torch
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer.moe import moe_logging
from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

from megatron_emo.mcore import EMORouter, routing_context, with_emo_router
from megatron_emo.mcore.specs import is_moe_mlp
from megatron_emo.routing import (
    document_pool_mask,
    emo_route,
    eval_pool_sizes,
    load_balancing_loss,
    route_within_pools,
    sample_pool_sizes,
)

from helpers import (
    build_tiny_gpt,
    capture_router_io,
    forward_with_docs,
    tiny_batch,
    tiny_config,
)


def _expected_routing(record, docs, config, *, train: bool):
    """emo_route on the logits recomputed from the router's recorded input."""
    router = record["router"]
    hidden = record["hidden"]
    logits_TE = (hidden.float() @ router.weight.detach().float().t()).reshape(
        -1, config.num_moe_experts
    )
    doc_ids_T = docs.doc_ids.t().reshape(-1)
    if train:
        pools = sample_pool_sizes(
            docs.doc_keys,
            seed=config.emo_pool_size_seed,
            iteration=docs.iteration,
            layer=router.layer_number,
            min_size=config.emo_pool_size_min,
            max_size=config.emo_pool_size_max,
        )
    else:
        pools = eval_pool_sizes(docs.num_docs, size=config.emo_pool_size_eval)
    probs, routing_map = emo_route(
        logits_TE, doc_ids_T, pools, topk=config.moe_router_topk,
        num_shared_experts=config.emo_num_shared_experts,
    )
    return probs, routing_map, doc_ids_T, pools


def test_spec_puts_emo_router_in_every_moe_layer():
    config = tiny_config(num_layers=4, moe_layer_freq=[1, 0, 1, 1])
    model = build_tiny_gpt(config)
    layers = model.decoder.layers
    kinds = [type(getattr(layer.mlp, "router", None)).__name__ for layer in layers]
    assert kinds == ["EMORouter", "NoneType", "EMORouter", "EMORouter"]
    assert [layer.mlp.router.layer_number for layer in layers
            if hasattr(layer.mlp, "router")] == [1, 3, 4]


def test_with_emo_router_leaves_the_input_spec_alone():
    spec = get_gpt_layer_local_spec(num_experts=8, normalization="RMSNorm")
    new = with_emo_router(spec)
    assert spec.submodules.mlp.keywords["submodules"].router is not EMORouter
    assert new.submodules.mlp.keywords["submodules"].router is EMORouter
    assert is_moe_mlp(new.submodules.mlp)
    dense = get_gpt_layer_local_spec(num_experts=None)
    assert with_emo_router(dense).submodules.mlp is dense.submodules.mlp


@pytest.mark.parametrize("dispatcher", ["allgather", "alltoall"], ids=["allgather", "alltoall"])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_model_routing_equals_emo_route(dispatcher, train):
    config = tiny_config(moe_token_dispatcher_type=dispatcher)
    model = build_tiny_gpt(config)
    records = capture_router_io(model)
    batch = tiny_batch()
    docs = batch[3]
    loss = forward_with_docs(model, batch, train=train)
    assert len(records) == config.num_layers
    for record in records:
        probs, routing_map, doc_ids_T, pools = _expected_routing(record, docs, config, train=train)
        assert torch.equal(record["routing_map"], routing_map)
        torch.testing.assert_close(record["probs"], probs, atol=1e-6, rtol=0)
        # Invariants: shared expert always on at 1.0; at most P routed experts per document.
        assert torch.all(record["probs"][:, -1] == 1.0)
        routed = record["routing_map"][:, :-1]
        for d in range(docs.num_docs):
            used = routed[doc_ids_T == d].any(dim=0).sum().item()
            assert used <= pools[d].item()
    if train:
        loss.mean().backward()
        params = dict(model.named_parameters())
        missing = [n for n, p in params.items() if p.grad is None]
        assert not missing, missing
        assert all(r["router"].weight.grad.abs().sum() > 0 for r in records)


def test_allgather_and_alltoall_give_identical_outputs():
    batch = tiny_batch()
    outs = []
    for dispatcher in ("allgather", "alltoall"):
        model = build_tiny_gpt(tiny_config(moe_token_dispatcher_type=dispatcher), seed=3)
        outs.append(forward_with_docs(model, batch).detach())
    torch.testing.assert_close(outs[0], outs[1], atol=1e-6, rtol=0)


def test_training_without_documents_raises_and_eval_uses_one_document_per_sequence():
    config = tiny_config()
    model = build_tiny_gpt(config)
    tokens, position_ids, mask, _ = tiny_batch()
    model.train()
    with pytest.raises(RuntimeError, match="found no documents in training"):
        model(tokens, position_ids, mask, labels=tokens)
    # The same failure on the path that calls MoELayer.route directly.
    moe = model.decoder.layers[0].mlp
    with pytest.raises(RuntimeError, match="routing_context"):
        moe.route(torch.randn(8, 2, config.hidden_size))
    model.eval()
    records = capture_router_io(model)
    with torch.no_grad():
        model(tokens, position_ids, mask)
    for record in records:
        logits = (record["hidden"].float() @ record["router"].weight.float().t()).reshape(-1, 8)
        bsz = record["hidden"].shape[1]
        doc_ids_T = torch.arange(bsz).repeat(record["hidden"].shape[0])
        probs, routing_map = emo_route(
            logits, doc_ids_T, eval_pool_sizes(bsz, size=config.emo_pool_size_eval), topk=3
        )
        assert torch.equal(record["routing_map"], routing_map)


def test_standard_routing_has_no_pools():
    config = tiny_config(emo_routing="standard")
    model = build_tiny_gpt(config)
    records = capture_router_io(model)
    tokens, position_ids, mask, _ = tiny_batch()
    model.train()
    model(tokens, position_ids, mask, labels=tokens)  # needs no routing_context
    for record in records:
        logits = (record["hidden"].float() @ record["router"].weight.float().t()).reshape(-1, 8)
        ones_TR = torch.ones(logits.shape[0], 7, dtype=torch.bool)
        expected = route_within_pools(logits, ones_TR, topk=3, num_shared_experts=1)
        assert torch.equal(record["routing_map"], expected.routing_map)
        torch.testing.assert_close(record["probs"], expected.probs, atol=1e-6, rtol=0)


def test_aux_losses_are_logged_and_match_the_pure_functions():
    config = tiny_config(num_layers=2)
    model = build_tiny_gpt(config)
    records = capture_router_io(model)
    batch = tiny_batch()
    docs = batch[3]
    forward_with_docs(model, batch)
    values = moe_logging.get_moe_metrics_tracker().metrics
    lb_logged = values["load_balancing_loss"].values
    for record in records:
        router = record["router"]
        logits = (record["hidden"].float() @ router.weight.detach().float().t()).reshape(-1, 8)
        _, _, doc_ids_T, pools = _expected_routing(record, docs, config, train=True)
        in_pool = document_pool_mask(logits[:, :7], doc_ids_T, pools)
        result = route_within_pools(logits, in_pool, topk=3, num_shared_experts=1)
        expected_lb = load_balancing_loss(result.scores, result.routed_map, topk=2)
        # Logged value = loss / per-layer coefficient; per-layer coefficient = coeff / 2 layers.
        assert router.lb_coeff == pytest.approx(config.moe_aux_loss_coeff / 2)
        torch.testing.assert_close(lb_logged[router.layer_number - 1], expected_lb,
                                   atol=1e-6, rtol=0)
    assert torch.all(values["z_loss"].values > 0)


def test_aux_loss_gradient_reaches_the_router_weight():
    """With the main loss's gradient zeroed, the router weight still gets the aux-loss gradient."""
    config = tiny_config(num_layers=1, moe_z_loss_coeff=None)
    model = build_tiny_gpt(config)
    MoEAuxLossAutoScaler.set_loss_scale(torch.tensor(1.0))
    loss = forward_with_docs(model, tiny_batch())
    (loss * 0).sum().backward()
    router = model.decoder.layers[0].mlp.router
    assert router.weight.grad.abs().sum() > 0
    no_aux = build_tiny_gpt(tiny_config(num_layers=1, moe_z_loss_coeff=None,
                                        moe_aux_loss_coeff=0.0))
    (forward_with_docs(no_aux, tiny_batch()) * 0).sum().backward()
    assert no_aux.decoder.layers[0].mlp.router.weight.grad.abs().sum() == 0


def test_z_loss_gradient_reaches_the_router_weight():
    """The z-loss alone (balancing off, the main loss's gradient zeroed) trains the router."""
    config = tiny_config(num_layers=1, moe_aux_loss_coeff=0.0, moe_z_loss_coeff=1e-2)
    model = build_tiny_gpt(config)
    MoEAuxLossAutoScaler.set_loss_scale(torch.tensor(1.0))
    (forward_with_docs(model, tiny_batch()) * 0).sum().backward()
    assert model.decoder.layers[0].mlp.router.weight.grad.abs().sum() > 0


def test_megatron_shared_expert_mlp_with_zero_router_shared_experts():
    config = tiny_config(
        emo_num_shared_experts=0, moe_router_topk=2, moe_shared_expert_intermediate_size=16
    )
    model = build_tiny_gpt(config)
    records = capture_router_io(model)
    batch = tiny_batch()
    forward_with_docs(model, batch).mean().backward()
    assert model.decoder.layers[0].mlp.shared_experts is not None
    for record in records:
        probs, routing_map, _, _ = _expected_routing(record, batch[3], config, train=True)
        assert torch.equal(record["routing_map"], routing_map)
        assert record["routing_map"].sum(dim=1).eq(2).all()


def test_bf16_params_with_fp32_router():
    config = tiny_config(bf16=True, params_dtype=torch.bfloat16,
                         moe_token_dispatcher_type="allgather")
    model = build_tiny_gpt(config).to(torch.bfloat16)
    records = capture_router_io(model)
    loss = forward_with_docs(model, tiny_batch())
    loss.float().mean().backward()
    for record in records:
        assert record["hidden"].dtype == torch.bfloat16
        assert record["probs"].dtype == torch.float32  # moe_router_dtype='fp32'
        assert torch.all(record["probs"][:, -1] == 1.0)


def test_expert_bias_never_selects_outside_the_pool():
    config = tiny_config(
        moe_router_score_function="sigmoid", moe_router_enable_expert_bias=True,
        moe_aux_loss_coeff=0.0, moe_router_load_balancing_type="none",
    )
    model = build_tiny_gpt(config)
    records = capture_router_io(model)
    for layer in model.decoder.layers:
        layer.mlp.router.expert_bias.fill_(0.0)
        layer.mlp.router.expert_bias[0] = 1e6  # would win every token without the pool mask
    batch = tiny_batch()
    forward_with_docs(model, batch)
    for record in records:
        router = record["router"]
        logits = (record["hidden"].float() @ router.weight.detach().float().t()).reshape(-1, 8)
        _, _, doc_ids_T, pools = _expected_routing(record, batch[3], config, train=True)
        in_pool = document_pool_mask(logits[:, :7], doc_ids_T, pools)
        routed = record["routing_map"][:, :7]
        assert not (routed & ~in_pool).any()
        assert torch.equal(routed[:, 0], in_pool[:, 0])  # bias wins exactly where allowed


def test_capacity_factor_drops_tokens_but_keeps_pools():
    config = tiny_config(moe_expert_capacity_factor=0.5, moe_token_dispatcher_type="alltoall")
    model = build_tiny_gpt(config)
    records = capture_router_io(model)
    batch = tiny_batch()
    forward_with_docs(model, batch).mean().backward()
    for record in records:
        _, routing_map, _, _ = _expected_routing(record, batch[3], config, train=True)
        # Dropping only removes assignments.
        assert not (record["routing_map"] & ~routing_map).any()
        assert record["routing_map"].sum() < routing_map.sum()


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (dict(emo_pool_size_min=1), r"emo_pool_size_min \(1\)"),
        (dict(emo_pool_size_min=5, emo_pool_size_max=4), r"emo_pool_size_max \(4\)"),
        (dict(emo_pool_size_eval=1), r"emo_pool_size_eval \(1\)"),
        (dict(emo_num_shared_experts=8), r"emo_num_shared_experts \(8\)"),
        (dict(emo_num_shared_experts=3), r"moe_router_topk \(3\)"),
        (dict(emo_routing="pools"), "emo_routing"),
        (dict(moe_router_load_balancing_type="seq_aux_loss"), "seq_aux_loss"),
        (dict(moe_router_score_function="sqrtsoftplus"), "sqrtsoftplus"),
        (dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1),
         "recompute"),
        (dict(recompute_granularity="selective", recompute_modules=["moe"]), "recompute"),
        (dict(mtp_num_layers=1), "mtp_num_layers"),
    ],
    ids=[
        "pool-below-slots", "min-above-max", "eval-below-slots", "all-shared", "no-routed-slot",
        "bad-routing", "seq-aux", "score-fn", "full-recompute", "moe-recompute", "mtp",
    ],
)
def test_contradictory_configs_fail_at_construction(overrides, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(**overrides)


def test_router_refuses_a_plain_transformer_config():
    from megatron.core.transformer.transformer_config import TransformerConfig

    config = TransformerConfig(num_layers=1, hidden_size=32, num_attention_heads=4,
                               num_moe_experts=8)
    with pytest.raises(TypeError, match="EMOTransformerConfig"):
        EMORouter(config)


def test_padding_is_excluded_from_the_load_balancing_statistics():
    config = tiny_config(num_layers=1)
    model = build_tiny_gpt(config)
    records = capture_router_io(model)
    tokens, position_ids, mask, docs = tiny_batch()
    padding_BS = torch.zeros_like(tokens, dtype=torch.bool)
    padding_BS[1, 48:] = True  # right-padded second sequence
    model.train()
    with routing_context(docs):
        model(tokens, position_ids, mask, labels=tokens, padding_mask=padding_BS)
    record = records[0]
    router = record["router"]
    logits = (record["hidden"].float() @ router.weight.detach().float().t()).reshape(-1, 8)
    _, _, doc_ids_T, pools = _expected_routing(record, docs, config, train=True)
    result = route_within_pools(logits, document_pool_mask(logits[:, :7], doc_ids_T, pools),
                                topk=3, num_shared_experts=1)
    valid_T = ~padding_BS.t().reshape(-1)
    expected = load_balancing_loss(result.scores, result.routed_map, topk=2, valid_T=valid_T)
    unmasked = load_balancing_loss(result.scores, result.routed_map, topk=2)
    logged = moe_logging.get_moe_metrics_tracker().metrics["load_balancing_loss"].values[0]
    torch.testing.assert_close(logged, expected, atol=1e-6, rtol=0)
    assert not torch.allclose(expected, unmasked)


def test_same_documents_and_iteration_route_identically_after_a_rebuild():
    """What a resume relies on: pools depend only on (seed, iteration, layer, document key)."""
    batch = tiny_batch()
    maps = []
    for _ in range(2):
        model = build_tiny_gpt(tiny_config(), seed=21)
        records = capture_router_io(model)
        forward_with_docs(model, batch)
        maps.append(torch.stack([r["routing_map"] for r in records]))
    assert torch.equal(maps[0], maps[1])
    later = tiny_batch()
    later = (*later[:3], type(later[3])(later[3].doc_ids, later[3].doc_keys, iteration=8))
    model = build_tiny_gpt(tiny_config(), seed=21)
    records = capture_router_io(model)
    forward_with_docs(model, later)
    assert not torch.equal(torch.stack([r["routing_map"] for r in records]), maps[0])
