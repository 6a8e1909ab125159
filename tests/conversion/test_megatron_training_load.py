"""A ``from-hf`` checkpoint loads through megatron.training's own ``load_checkpoint``.

Runs ``megatron.training.checkpointing.load_checkpoint`` (what ``--load`` calls) with
``--no-load-optim --no-load-rng`` on a checkpoint written by ``import_from_hf`` for EP=2, into a
tiny EMO GPTModel, and checks iteration 0 and the weights. megatron.training allocates a few
scalars on ``device='cuda'`` on this path (``checkpointing.py:375``, ``:417``;
``../shared/docs/cpu_megatron.md`` section 4), so the call runs under a scoped torch-function
mode that puts those on the CPU; the checkpoint itself is read unchanged.

Run: ``OMP_NUM_THREADS=1 python -m pytest tests/conversion/test_megatron_training_load.py -q``
"""

from __future__ import annotations

import sys

import torch
from hf_tiny import random_hf_state_dict, write_hf_dir
from mcore_tiny import build
from torch.overrides import TorchFunctionMode

from megatron_emo.conversion.from_hf import import_from_hf


class _CudaScalarsOnCpu(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if str(kwargs.get("device", "")).startswith("cuda"):
            kwargs["device"] = "cpu"
        if getattr(func, "__name__", "") == "cuda":
            return args[0]
        return func(*args, **kwargs)


def test_megatron_training_load_checkpoint_reads_from_hf_output(tmp_path, monkeypatch,
                                                                 megatron_cpu):
    from megatron.core.num_microbatches_calculator import (destroy_num_microbatches_calculator,
                                                           init_num_microbatches_calculator)
    from megatron.training import global_vars
    from megatron.training.arguments import parse_args
    from megatron.training.checkpointing import load_checkpoint

    sd = random_hf_state_dict(seed=3)
    write_hf_dir(tmp_path / "hf", sd)
    import_from_hf(str(tmp_path / "hf"), str(tmp_path / "m"), ep=2)
    monkeypatch.setattr(sys, "argv", [
        "train", "--load", str(tmp_path / "m"), "--no-load-optim", "--no-load-rng",
        "--ckpt-format", "torch_dist", "--num-layers", "2", "--hidden-size", "32",
        "--num-attention-heads", "4", "--micro-batch-size", "1"])
    args = parse_args()
    args.use_dist_ckpt = True  # set by validate_args in a real run
    global_vars.set_args(args)
    init_num_microbatches_calculator(0, None, 1, 1, 1)
    try:
        model = build("router", seed=5)
        with _CudaScalarsOnCpu():
            iteration, _ = load_checkpoint([model], None, None, strict=True)
    finally:
        destroy_num_microbatches_calculator()
        global_vars.set_args(None)
    assert iteration == 0
    layer = model.decoder.layers[1]
    assert torch.equal(layer.mlp.experts.local_experts[6].linear_fc2.weight,
                       sd["model.layers.1.mlp.experts.6.down_proj.weight"])
    assert torch.equal(layer.mlp.router.weight, sd["model.layers.1.mlp.gate.weight"])
    assert torch.equal(model.output_layer.weight, sd["lm_head.weight"])
