"""A ``from-hf`` checkpoint loads through megatron.training's own ``load_checkpoint``.

Runs ``megatron.training.checkpointing.load_checkpoint`` (what ``--load`` calls) with
``--no-load-optim --no-load-rng`` on checkpoints written by the streaming ``import_from_hf`` for
EP=2, into tiny EMO GPTModels, and checks iteration 0, the weights, and that the logits equal the
HF model's (pools off: the published HF routing). Two layouts: the shared expert in the router,
and the EP-balanced default (SharedExpertMLP + 1 padding expert: 7 routed + 1 = 8 experts). The
padding layout's logits need a router that never routes to padding experts (issue 11); that case
is skipped, by a behavioural check, where the router lacks it.

megatron.training allocates a few scalars on ``device='cuda'`` on this path
(``checkpointing.py:375``, ``:417``; ``../shared/docs/cpu_megatron.md`` section 4), so the call
runs under a scoped torch-function mode that puts those on the CPU; the checkpoint itself is read
unchanged.

Run: ``OMP_NUM_THREADS=1 python -m pytest tests/conversion/test_megatron_training_load.py -q``
"""

from __future__ import annotations

import sys

import pytest
import torch
from torch.overrides import TorchFunctionMode

from megatron_emo.conversion.from_hf import import_from_hf

from hf_tiny import random_hf_state_dict, write_hf_dir
from mcore_tiny import build, megatron_logits


class _CudaScalarsOnCpu(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if str(kwargs.get("device", "")).startswith("cuda"):
            kwargs["device"] = "cpu"
        if getattr(func, "__name__", "") == "cuda":
            return args[0]
        return func(*args, **kwargs)


def _router_supports_padding() -> bool:
    """True when EMORouter never routes to padding experts (needs Megatron's CPU state).

    A padded model whose padding router row has by far the largest logits: a router that does
    not mask padding experts sends every token there.
    """
    model = build("mlp", seed=3, num_padding=1).eval()
    router = model.decoder.layers[0].mlp.router
    with torch.no_grad():
        router.weight[7] = 100.0 * router.weight[:7].abs().max()
    seen = []
    handle = router.register_forward_hook(lambda mod, inp, out: seen.append(out))
    try:
        tokens = torch.randint(2, 128, (1, 16), generator=torch.Generator().manual_seed(0))
        megatron_logits(model, tokens)
    except Exception:  # noqa: BLE001 (a router without padding support may fail instead)
        return False
    finally:
        handle.remove()
    probs, routing_map = seen[0]
    return not routing_map[:, 7].any() and not probs[:, 7].any()


def _load_checkpoint(ckpt, model, monkeypatch):
    from megatron.core.num_microbatches_calculator import (
        destroy_num_microbatches_calculator,
        init_num_microbatches_calculator,
    )
    from megatron.training import global_vars
    from megatron.training.arguments import parse_args
    from megatron.training.checkpointing import load_checkpoint

    monkeypatch.setattr(sys, "argv", [
        "train", "--load", ckpt, "--no-load-optim", "--no-load-rng",
        "--ckpt-format", "torch_dist", "--num-layers", "2", "--hidden-size", "32",
        "--num-attention-heads", "4", "--micro-batch-size", "1"])
    args = parse_args()
    args.use_dist_ckpt = True  # set by validate_args in a real run
    global_vars.set_args(args)
    init_num_microbatches_calculator(0, None, 1, 1, 1)
    try:
        with _CudaScalarsOnCpu():
            iteration, _ = load_checkpoint([model], None, None, strict=True)
    finally:
        destroy_num_microbatches_calculator()
        global_vars.set_args(None)
    return iteration


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("load") / "hf"
    sd = random_hf_state_dict(seed=3)
    write_hf_dir(path, sd)
    return str(path), sd


def _hf_logits(path, tokens):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True).eval()
    with torch.no_grad():
        return hf(tokens).logits


_TOKENS = torch.randint(2, 128, (2, 16), generator=torch.Generator().manual_seed(4))


def test_router_layout_loads_with_same_logits(tmp_path, monkeypatch, megatron_cpu, hf_dir):
    path, sd = hf_dir
    import_from_hf(path, str(tmp_path / "m"), ep=2, shared_layout="router")
    model = build("router", seed=5)
    assert _load_checkpoint(str(tmp_path / "m"), model, monkeypatch) == 0
    layer = model.decoder.layers[1]
    assert torch.equal(layer.mlp.experts.local_experts[6].linear_fc2.weight,
                       sd["model.layers.1.mlp.experts.6.down_proj.weight"])
    assert torch.equal(layer.mlp.router.weight, sd["model.layers.1.mlp.gate.weight"])
    assert torch.equal(model.output_layer.weight, sd["lm_head.weight"])
    diff = (megatron_logits(model.eval(), _TOKENS) - _hf_logits(path, _TOKENS)).abs().max()
    assert diff <= 1e-4


def test_padding_layout_loads_padding_as_zeros(tmp_path, monkeypatch, megatron_cpu, hf_dir):
    path, sd = hf_dir
    import_from_hf(path, str(tmp_path / "m"), ep=2)  # auto: SharedExpertMLP + 1 padding expert
    model = build("mlp", seed=5, num_padding=1)
    assert _load_checkpoint(str(tmp_path / "m"), model, monkeypatch) == 0
    for i, layer in enumerate(model.decoder.layers):
        p = f"model.layers.{i}.mlp."
        gate = sd[p + "gate.weight"]
        assert torch.equal(layer.mlp.router.weight[:7], gate[:7])
        assert not layer.mlp.router.weight[7].any()  # padding row
        pad = layer.mlp.experts.local_experts[7]
        assert not pad.linear_fc1.weight.any() and not pad.linear_fc2.weight.any()
        assert torch.equal(layer.mlp.experts.local_experts[6].linear_fc1.weight,
                           torch.cat([sd[p + "experts.6.gate_proj.weight"],
                                      sd[p + "experts.6.up_proj.weight"]]))
        shared = layer.mlp.shared_experts
        assert torch.equal(shared.linear_fc2.weight, sd[p + "experts.7.down_proj.weight"])
        assert torch.equal(shared.linear_fc1.weight,
                           torch.cat([sd[p + "experts.7.gate_proj.weight"],
                                      sd[p + "experts.7.up_proj.weight"]]))


@pytest.fixture
def padding_router(megatron_cpu):
    if not _router_supports_padding():
        pytest.skip("EMORouter routes to padding experts on this branch (needs the issue-11 "
                    "router), so the padding layout's logits cannot match HF")


def test_padding_layout_loads_with_same_logits(tmp_path, monkeypatch, padding_router, hf_dir):
    path, _ = hf_dir
    import_from_hf(path, str(tmp_path / "m"), ep=2)
    model = build("mlp", seed=5, num_padding=1)
    assert _load_checkpoint(str(tmp_path / "m"), model, monkeypatch) == 0
    diff = (megatron_logits(model.eval(), _TOKENS) - _hf_logits(path, _TOKENS)).abs().max()
    assert diff <= 1e-4
