"""Export does not depend on the layout a checkpoint was saved with (2 gloo ranks).

The same weights are saved at EP=1 (1 rank) and re-saved from EP=2 (and TP=2) models over two
gloo ranks (each rank holds 4 of the 8 experts under local ids 0..3); exporting each gives
byte-identical safetensors, so every expert lands at its global id.

Run: ``OMP_NUM_THREADS=1 python -m pytest tests/conversion/test_parallel_export.py -q``
"""

from __future__ import annotations

import os

import pytest
import torch

from megatron_emo.conversion import checkpoint_io as cio
from megatron_emo.conversion.to_hf import export_to_hf

from helpers import run_distributed
from hf_tiny import TINY


def _resave(rank, world_size, src, dst, tp, ep):
    from megatron_emo.cpu import initialize_model_parallel_cpu

    from mcore_tiny import build, load_into, save_megatron_checkpoint

    initialize_model_parallel_cpu(tensor_model_parallel_size=tp, expert_model_parallel_size=ep)
    model = load_into(build("router", seed=50 + rank), src)
    if ep > 1:
        experts = model.decoder.layers[0].mlp.experts.local_experts
        assert len(experts) == 8 // ep
    assert model.decoder.layers[0].self_attention.linear_qkv.weight.shape[0] == 64 // tp
    fc1 = model.decoder.layers[0].mlp.experts.local_experts[0].linear_fc1.weight
    assert fc1.shape[0] == 2 * TINY.intermediate_size // tp
    save_megatron_checkpoint(model, dst, cio.megatron_args(TINY, "router", tp=tp, ep=ep),
                                 iteration=3)


def _files(path):
    return {f: open(os.path.join(path, f), "rb").read() for f in sorted(os.listdir(path))
            if f.endswith((".safetensors", ".json"))}


@pytest.mark.parametrize("tp,ep", [(1, 2), (2, 1)])
def test_export_identical_across_saved_layouts(tmp_path, megatron_cpu, tp, ep):
    from mcore_tiny import save_megatron_checkpoint, train_few_steps

    model = train_few_steps("router")
    ep1 = str(tmp_path / "ep1")
    save_megatron_checkpoint(model, ep1, cio.megatron_args(TINY, "router"), iteration=3)
    other = str(tmp_path / f"tp{tp}ep{ep}")
    run_distributed(_resave, 2, ep1, other, tp, ep)
    export_to_hf(ep1, str(tmp_path / "hf1"), max_shard_bytes=30_000)
    export_to_hf(other, str(tmp_path / "hf2"), max_shard_bytes=30_000)
    a, b = _files(tmp_path / "hf1"), _files(tmp_path / "hf2")
    assert a.keys() == b.keys() and len(a) > 3
    assert all(a[k] == b[k] for k in a)
    assert not torch.equal(model.state_dict()["decoder.layers.0.mlp.experts.local_experts.0."
                                              "linear_fc1.weight"],
                           model.state_dict()["decoder.layers.0.mlp.experts.local_experts.4."
                                              "linear_fc1.weight"])
