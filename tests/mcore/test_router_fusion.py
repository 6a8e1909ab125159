"""``emo_router_fusion``: the fused EMORouter routes like the pure-torch one; bad settings fail.

Inside a real Megatron GPTModel, the fused Triton path routes, logs its losses and
backpropagates exactly like the pure-torch path; settings the kernels cannot honour are refused.

Without CUDA the kernels run in Triton's interpreter (``tests/conftest.py``), so 'on' works on
CPU here; 'auto' takes the fused path only on CUDA.
Run: ``OMP_NUM_THREADS=1 .venv/bin/python -m pytest tests/mcore/test_router_fusion.py -q``
"""

from __future__ import annotations

import argparse
import dataclasses

import pytest
import torch
from megatron.core.transformer.moe import moe_logging

from megatron_emo.mcore import EMOTransformerConfig, RoutingMetricsTracker, routing_context

from helpers import build_tiny_gpt, capture_router_io, tiny_batch, tiny_config

pytest.importorskip("triton")


@pytest.fixture(scope="module")
def fused_kernels_run_on_cpu():
    """The tiny GPT runs on CPU: the fused path needs the interpreter (no-CUDA test runs)."""
    from megatron_emo.routing.fused import fused_routing_available

    if not fused_routing_available("cpu"):
        pytest.skip("fused kernels on CPU need TRITON_INTERPRET=1 (set by tests/conftest.py "
                    "without CUDA); on GPU tests/gpu/test_gpu_router.py covers the fused router")


# The EP-balanced layout: SharedExpertMLP outside the router, 7 routed + 1 padding expert.
BALANCED_LAYOUT = dict(
    emo_num_shared_experts=0,
    emo_num_padding_experts=1,
    moe_shared_expert_intermediate_size=16,
    moe_router_topk=2,
)


def _run(
    fusion: str, routing: str, *, collect_metrics: bool = False, layout: dict | None = None
) -> dict:
    """One training forward + backward of a tiny GPT; what the routers produced and logged."""
    config = tiny_config(emo_router_fusion=fusion, emo_routing=routing, **(layout or {}))
    model = build_tiny_gpt(config, seed=5)
    records = capture_router_io(model)
    tokens, position_ids, mask, docs = tiny_batch()
    emo_metrics = RoutingMetricsTracker() if collect_metrics else None
    model.train()
    with routing_context(docs, metrics=emo_metrics):
        loss = model(tokens, position_ids, mask, labels=tokens)
    loss.float().mean().backward()
    tracker = moe_logging.get_moe_metrics_tracker().metrics
    routers = [r["router"] for r in records]
    return dict(
        records=records,
        losses={k: tracker[k].values.clone() for k in ("load_balancing_loss", "z_loss")},
        grads=[r.weight.grad.clone() for r in routers],
        metrics=[emo_metrics.sums(r.layer_number) if emo_metrics else {} for r in routers],
    )


@pytest.mark.parametrize(
    "routing, collect_metrics, layout",
    [
        ("emo", False, None),
        ("emo", True, None),
        ("standard", False, None),
        ("emo", True, BALANCED_LAYOUT),
    ],
    ids=["emo", "emo-metrics", "standard", "emo-padding-experts"],
)
def test_fused_router_equals_torch_router(
    fused_kernels_run_on_cpu, routing: str, collect_metrics: bool, layout: dict | None
) -> None:
    torch_run = _run("off", routing, collect_metrics=collect_metrics, layout=layout)
    fused_run = _run("on", routing, collect_metrics=collect_metrics, layout=layout)
    assert len(fused_run["records"]) == 2
    for ref, got in zip(torch_run["records"], fused_run["records"], strict=True):
        assert torch.equal(got["routing_map"], ref["routing_map"])
        if layout is not None:  # the padding expert (column 7) is never routed
            assert not got["routing_map"][:, 7].any() and not got["probs"][:, 7].any()
        torch.testing.assert_close(got["probs"], ref["probs"], atol=1e-6, rtol=0)
    for name, ref in torch_run["losses"].items():
        assert torch.all(ref > 0), name
        torch.testing.assert_close(fused_run["losses"][name], ref, atol=1e-6, rtol=1e-6)
    for ref, got in zip(torch_run["grads"], fused_run["grads"], strict=True):
        assert ref.abs().sum() > 0
        torch.testing.assert_close(got, ref, atol=1e-6, rtol=1e-5)
    for ref, got in zip(torch_run["metrics"], fused_run["metrics"], strict=True):
        assert ref.keys() == got.keys() and bool(ref) == collect_metrics
        for name in ref:
            torch.testing.assert_close(got[name], ref[name], atol=1e-6, rtol=1e-6)


def test_auto_takes_the_torch_path_on_cpu() -> None:
    model = build_tiny_gpt(tiny_config(), seed=5)
    router = model.decoder.layers[0].mlp.router
    assert router.config.emo_router_fusion == "auto"
    assert router._fused_routing(torch.zeros(4, 1, 8)) is None
    assert router._fused_routing(torch.zeros(4, 1, 8, device="meta")) is None


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(emo_router_fusion="yes"), "emo_router_fusion must be"),
        (
            dict(emo_router_fusion="on", moe_router_score_function="sigmoid"),
            "fuses softmax scoring only, got moe_router_score_function 'sigmoid'",
        ),
    ],
    ids=["bad-value", "sigmoid"],
)
def test_fusion_settings_the_kernels_cannot_honour_fail_at_construction(overrides, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(**overrides)


def test_flag_fills_the_config_field() -> None:
    from megatron_emo.training.arguments import add_emo_args

    parser = add_emo_args(argparse.ArgumentParser())
    assert parser.parse_args([]).emo_router_fusion == "auto"
    assert parser.parse_args(["--emo-router-fusion", "off"]).emo_router_fusion == "off"
    with pytest.raises(SystemExit):
        parser.parse_args(["--emo-router-fusion", "yes"])
    assert "emo_router_fusion" in {f.name for f in dataclasses.fields(EMOTransformerConfig)}
