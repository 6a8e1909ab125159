"""Expert layouts and Megatron options with the EMO router, in a real GPTModel on CPU.

Checks: padding experts (``[routed | padding | shared]``) get no token, probability or gradient
and stay out of the losses; the EP-load arithmetic and the start-up warning for in-router shared
experts at EP > 1; capacity dropping never drops the shared expert; the aux-loss-free expert bias
moves every routed expert towards the routed mean; sigmoid scoring (normalised balancing
scores, a router gradient with one routed slot); fp32 router by default; the router's forward and
backward make no host sync; options EMO cannot honour are refused by name.

Run: ``OMP_NUM_THREADS=1 .venv/bin/python -m pytest tests/mcore/test_layouts_and_options.py -q``
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from megatron.core.distributed.finalize_model_grads import _update_router_expert_bias
from megatron.core.transformer.moe import moe_logging
from megatron.core.transformer.moe.moe_utils import (
    MoEAuxLossAutoScaler,
    apply_router_token_dropping,
)
from torch.overrides import TorchFunctionMode

from megatron_emo.mcore import RoutingMetricsTracker, routing_context
from megatron_emo.routing import (
    document_pool_mask,
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


def _expected(record, docs, config):
    """Pure routing of the recorded input with the padding columns cut out (X = R + S columns)."""
    router = record["router"]
    num_padding = getattr(config, "emo_num_padding_experts", 0)  # getattr: also on old code
    num_routed = config.num_moe_experts - config.emo_num_shared_experts - num_padding
    logits_TE = (record["hidden"].float() @ router.weight.detach().float().t()).reshape(
        -1, config.num_moe_experts
    )
    logits_TX = torch.cat([logits_TE[:, :num_routed], logits_TE[:, num_routed + num_padding :]], 1)
    pools = sample_pool_sizes(
        docs.doc_keys, seed=config.emo_pool_size_seed, iteration=docs.iteration,
        layer=router.layer_number, min_size=config.emo_pool_size_min,
        max_size=config.emo_pool_size_max,
    )
    in_pool = document_pool_mask(logits_TE[:, :num_routed], docs.doc_ids.t().reshape(-1), pools)
    return route_within_pools(
        logits_TX, in_pool, topk=config.moe_router_topk,
        num_shared_experts=config.emo_num_shared_experts,
        score_function=config.moe_router_score_function,
    )


# ----------------------------------------------------------------------------- padding experts

@pytest.mark.parametrize(
    "layout",
    [
        dict(emo_num_shared_experts=0, emo_num_padding_experts=1, moe_router_topk=2,
             moe_shared_expert_intermediate_size=16),
        dict(emo_num_shared_experts=1, emo_num_padding_experts=2, moe_router_topk=3),
    ],
    ids=["7-routed-1-padding-shared-mlp", "5-routed-2-padding-1-shared"],
)
def test_padding_experts_get_no_token_probability_or_gradient(layout):
    config = tiny_config(**layout)
    num_routed, num_padding = config.emo_num_routed_experts, config.emo_num_padding_experts
    padding = slice(num_routed, num_routed + num_padding)
    model = build_tiny_gpt(config)
    records = capture_router_io(model)
    batch = tiny_batch()
    forward_with_docs(model, batch).mean().backward()
    lb_logged = moe_logging.get_moe_metrics_tracker().metrics["load_balancing_loss"].values
    for record in records:
        expected = _expected(record, batch[3], config)
        routing_map, probs = record["routing_map"], record["probs"]
        assert not routing_map[:, padding].any() and not probs[:, padding].any()
        kept = [i for i in range(config.num_moe_experts) if not num_routed <= i < padding.stop]
        assert torch.equal(routing_map[:, kept], expected.routing_map)
        torch.testing.assert_close(probs[:, kept], expected.probs, atol=1e-6, rtol=0)
        if config.emo_num_shared_experts:
            assert torch.all(probs[:, -1] == 1.0)
        # The balancing loss sees the R routed experts only.
        lb = load_balancing_loss(expected.scores, expected.routed_map, topk=config.moe_router_topk
                                 - config.emo_num_shared_experts)
        torch.testing.assert_close(lb_logged[record["router"].layer_number - 1], lb, atol=1e-6,
                                   rtol=0)
        weight_grad = record["router"].weight.grad
        assert torch.all(weight_grad[padding] == 0) and weight_grad[:num_routed].abs().sum() > 0
    for layer in model.decoder.layers:
        experts = layer.mlp.experts.local_experts
        for i, expert in enumerate(experts):
            grads = [p.grad for p in expert.parameters()]
            if num_routed <= i < padding.stop:
                assert all(g is None or torch.all(g == 0) for g in grads), i
            elif i < num_routed:
                assert any(g is not None and g.abs().sum() > 0 for g in grads), i


def test_uniform_routing_ep_loads_of_the_recipe_layouts():
    from megatron_emo.mcore.config import uniform_routing_ep_loads

    # The published in-router layout at EP 8: the last rank hosts 15 routed experts + the shared.
    loads = uniform_routing_ep_loads(num_routed=127, num_padding=0, num_shared=1, num_slots=7,
                                     ep_size=8)
    mean = sum(loads) / 8
    assert max(loads) / mean == pytest.approx(1 + 105 / 127)  # 1.83
    assert max(loads) / min(loads) == pytest.approx((105 / 127 + 1) / (112 / 127))  # 2.07
    for ep in (2, 4, 8, 16):
        pad = (-127) % ep
        loads = uniform_routing_ep_loads(num_routed=127, num_padding=pad, num_shared=0,
                                         num_slots=7, ep_size=ep)
        assert max(loads) / (sum(loads) / ep) <= 1.10, (ep, loads)


def test_in_router_shared_experts_at_ep_above_one_warn_with_the_balanced_flags():
    with pytest.warns(UserWarning, match=r"1\.24x the mean") as record:
        tiny_config(expert_model_parallel_size=2)  # 7 routed + 1 shared, top-2 + 1 at EP 2
    message = next(str(w.message) for w in record if "1.24x" in str(w.message))
    for flag in ("--emo-num-shared-experts 0", "--moe-shared-expert-intermediate-size 16",
                 "--num-experts 8", "--emo-num-padding-experts 1", "--moe-router-topk 2"):
        assert flag in message, (flag, message)
    with warnings.catch_warnings(record=True) as quiet:
        warnings.simplefilter("always")
        tiny_config(expert_model_parallel_size=2, emo_num_shared_experts=0,
                    emo_num_padding_experts=1, moe_router_topk=2,
                    moe_shared_expert_intermediate_size=16)
        tiny_config()  # EP 1: nothing to balance
    assert not [w for w in quiet if "the mean token-expert" in str(w.message)]


# ----------------------------------------------------------------------------- capacity

def test_capacity_factor_drops_only_routed_assignments():
    """Capacity factor 1.0 drops routed assignments only, never the shared expert.

    cf 1.0, 16 experts, top-4 (3 routed + shared), 128 tokens: Megatron's drop over the whole map
    would keep the shared expert for 32 tokens only.
    """
    config = tiny_config(num_moe_experts=16, moe_router_topk=4, moe_expert_capacity_factor=1.0,
                         emo_pool_size_min=3, emo_pool_size_max=12)
    model = build_tiny_gpt(config)
    records = capture_router_io(model)
    batch = tiny_batch()
    forward_with_docs(model, batch).mean().backward()
    capacity = math.ceil(128 * 3 / 15)
    for record in records:
        expected = _expected(record, batch[3], config)
        assert record["routing_map"].shape[0] == 128
        assert record["routing_map"][:, -1].all() and torch.all(record["probs"][:, -1] == 1.0)
        probs_TR, map_TR = apply_router_token_dropping(
            expected.probs[:, :15], expected.routing_map[:, :15], router_topk=3,
            capacity_factor=1.0,
        )
        assert torch.equal(record["routing_map"][:, :15], map_TR)
        torch.testing.assert_close(record["probs"][:, :15], probs_TR, atol=1e-6, rtol=0)
        assert map_TR.sum(0).max() <= capacity < expected.routed_map.sum(0).max()


# ----------------------------------------------------------------------------- expert bias

def test_expert_bias_moves_every_routed_expert_towards_the_routed_mean():
    config = tiny_config(
        num_layers=1, moe_router_score_function="sigmoid", moe_router_enable_expert_bias=True,
        moe_aux_loss_coeff=0.0, moe_router_load_balancing_type="none",
        moe_router_bias_update_rate=1e-3,
    )
    model = build_tiny_gpt(config)
    records = capture_router_io(model)
    router = model.decoder.layers[0].mlp.router
    assert router.expert_bias.shape == router.local_tokens_per_expert.shape == (7,)
    forward_with_docs(model, tiny_batch()).mean().backward()
    counts_R = records[0]["routing_map"][:, :7].sum(0).float()
    assert torch.equal(router.local_tokens_per_expert, counts_R)
    routed_mean = counts_R.mean()
    shared_inflated_mean = (counts_R.sum() + 128) / 8  # the old (E,) average with the shared column
    assert ((counts_R > routed_mean) & (counts_R < shared_inflated_mean)).any(), (
        "test batch too easy: no expert between the routed and the inflated mean"
    )
    _update_router_expert_bias([model], config)
    expected = torch.sign(routed_mean - counts_R) * 1e-3
    torch.testing.assert_close(router.expert_bias, expected, atol=0, rtol=0)


def test_expert_bias_counts_skip_padding_tokens():
    config = tiny_config(
        num_layers=1, moe_router_score_function="sigmoid", moe_router_enable_expert_bias=True,
        moe_aux_loss_coeff=0.0, moe_router_load_balancing_type="none",
    )
    model = build_tiny_gpt(config)
    records = capture_router_io(model)
    tokens, position_ids, mask, docs = tiny_batch()
    padding_BS = torch.zeros_like(tokens, dtype=torch.bool)
    padding_BS[1, 40:] = True
    model.train()
    with routing_context(docs):
        model(tokens, position_ids, mask, labels=tokens, padding_mask=padding_BS)
    valid_T = ~padding_BS.t().reshape(-1)
    expected = records[0]["routing_map"][valid_T, :7].sum(0).float()
    assert torch.equal(model.decoder.layers[0].mlp.router.local_tokens_per_expert, expected)


# ----------------------------------------------------------------------------- sigmoid, dtype

def test_sigmoid_balancing_loss_of_a_uniform_router_is_one():
    config = tiny_config(moe_router_score_function="sigmoid", emo_routing="standard")
    model = build_tiny_gpt(config)
    for layer in model.decoder.layers:
        layer.mlp.router.weight.data.zero_()  # every sigmoid score 0.5
    tokens, position_ids, mask, _ = tiny_batch()
    model.train()
    model(tokens, position_ids, mask, labels=tokens)
    lb = moe_logging.get_moe_metrics_tracker().metrics["load_balancing_loss"].values
    torch.testing.assert_close(lb, torch.ones(2), atol=1e-6, rtol=0)  # raw scores give R/2 = 3.5


def test_sigmoid_with_one_routed_slot_gives_the_router_an_lm_gradient():
    config = tiny_config(moe_router_score_function="sigmoid", moe_router_topk=2,
                         moe_aux_loss_coeff=0.0, moe_z_loss_coeff=None)
    model = build_tiny_gpt(config)
    records = capture_router_io(model)
    forward_with_docs(model, tiny_batch()).mean().backward()
    for record in records:
        routed = record["probs"][:, :7][record["routing_map"][:, :7]]
        assert (routed < 1.0).all()  # sigmoid(z), not renormalised to 1.0
        assert record["router"].weight.grad[:7].abs().sum() > 0


def test_router_logits_are_fp32_without_moe_router_dtype():
    config = tiny_config(moe_router_dtype=None, bf16=True, params_dtype=torch.bfloat16,
                         moe_token_dispatcher_type="allgather")
    assert config.moe_router_dtype == "fp32"
    model = build_tiny_gpt(config).to(torch.bfloat16)
    records = capture_router_io(model)
    forward_with_docs(model, tiny_batch()).float().mean().backward()
    for record in records:
        assert record["hidden"].dtype == torch.bfloat16
        assert record["probs"].dtype == torch.float32


# ----------------------------------------------------------------------------- host syncs

class _NoHostSync(TorchFunctionMode):
    """Records calls that would synchronise the host with a CUDA device.

    Calls that copy device data to the host or a host value to the device on CUDA (a CPU stand-in
    for ``torch.cuda.set_sync_debug_mode('error')``).
    """

    SYNCING = {
        "item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__",
        "nonzero", "unique", "masked_select", "tensor", "as_tensor",
    }

    def __init__(self):
        super().__init__()
        self.calls: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", str(func))
        if name in self.SYNCING:
            self.calls.append(name)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("collect_metrics", [False, True], ids=["step", "logging-step"])
def test_router_forward_and_backward_make_no_host_sync(collect_metrics):
    config = tiny_config(num_layers=1, moe_expert_capacity_factor=2.0,
                         emo_lb_accumulate_microbatches=True)
    model = build_tiny_gpt(config)
    router = model.decoder.layers[0].mlp.router
    tokens, _, _, docs = tiny_batch()
    metrics = RoutingMetricsTracker() if collect_metrics else None
    hidden = torch.randn(tokens.shape[1], tokens.shape[0], config.hidden_size, requires_grad=True)
    padding_SB = torch.zeros(tokens.shape[1], tokens.shape[0], dtype=torch.bool)
    MoEAuxLossAutoScaler.set_loss_scale(torch.ones(()))
    router.train()
    for padding_mask in (None, padding_SB):
        probe = _NoHostSync()
        with routing_context(docs, metrics=metrics), probe:
            probs, _ = router(hidden, padding_mask)
            probs.sum().backward()
        assert probe.calls == [], probe.calls
    assert router.weight.grad.abs().sum() > 0
    if metrics is not None:  # both calls recorded their diagnostics
        assert metrics.count(router.layer_number) == 2


# ----------------------------------------------------------------------------- refusals

@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (dict(mlp_chunks_for_training=2), r"mlp_chunks_for_training=2"),
        (dict(mlp_chunks_for_prefill=4), r"mlp_chunks_for_prefill=4"),
        (dict(moe_expert_capacity_factor=1.0, moe_pad_expert_input_to_capacity=True),
         r"moe_pad_expert_input_to_capacity=True .* emo_num_shared_experts=1"),
        (dict(emo_num_shared_experts=0, moe_router_topk=2, emo_num_padding_experts=1,
              moe_expert_capacity_factor=1.0, moe_pad_expert_input_to_capacity=True),
         r"emo_num_padding_experts=1"),
        (dict(emo_num_padding_experts=-1), r"emo_num_padding_experts \(-1\)"),
        (dict(emo_num_padding_experts=7), r"num_moe_experts \(8\) must leave at least one routed"),
        (dict(emo_num_padding_experts=6), r"moe_router_topk \(3\)"),
        (dict(emo_renormalize_probs=True, moe_router_topk=2), r"emo_renormalize_probs with one"),
    ],
    ids=["mlp-chunks-training", "mlp-chunks-prefill", "pad-to-capacity-shared",
         "pad-to-capacity-padding", "negative-padding", "all-padding", "padding-leaves-no-slot",
         "renormalize-one-slot"],
)
def test_options_emo_cannot_honour_are_refused_by_name(overrides, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(**overrides)
