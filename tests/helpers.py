"""Test helpers: tiny EMO GPT models on the CPU backend and a 2-process gloo launcher.

Process-group fixtures for in-process tests live in ``tests/conftest.py``; ``init_gloo`` is
their (and ``run_distributed``'s) one way to start a gloo group.

Tiny shapes follow STYLE.md rule 29: hidden 32, 2 layers, 8 experts, top-2 routed, seq 64,
vocab 128.
"""

from __future__ import annotations

import os
import socket
import tempfile
import traceback
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

SEQ = 64
VOCAB = 128
EOD = 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_gloo(rank: int, world_size: int, port: int) -> None:
    """Initialises the default gloo process group on the loopback address."""
    if dist.is_initialized():
        return
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size
    )


def _child(rank: int, world_size: int, port: int, fn: Callable, args: tuple, err_dir: str) -> None:
    torch.set_num_threads(1)
    try:
        init_gloo(rank, world_size, port)
        fn(rank, world_size, *args)
    except BaseException:
        with open(os.path.join(err_dir, f"rank{rank}.txt"), "w") as f:
            f.write(traceback.format_exc())
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_distributed(fn: Callable, world_size: int = 2, *args: Any) -> None:
    """Runs ``fn(rank, world_size, *args)`` in ``world_size`` spawned processes joined by gloo.

    A failure in any rank fails the caller with that rank's traceback.
    """
    with tempfile.TemporaryDirectory() as err_dir:
        try:
            mp.spawn(_child, args=(world_size, free_port(), fn, args, err_dir),
                     nprocs=world_size, join=True)
        except Exception as exc:
            msgs = [open(os.path.join(err_dir, f)).read() for f in sorted(os.listdir(err_dir))]
            raise AssertionError("distributed test failed:\n" + "\n".join(msgs)) from exc


# Config flags every CPU-built test model needs: CPU weight initialisation and none of the
# fused kernels that exist only on CUDA / with Transformer Engine.
CPU_MODEL_FLAGS: dict[str, Any] = dict(
    use_cpu_initialization=True,
    bias_activation_fusion=False,
    masked_softmax_fusion=False,
    moe_permute_fusion=False,
    gradient_accumulation_fusion=False,
    apply_rope_fusion=False,
    persist_layer_norm=False,
)


def tiny_config(**overrides: Any):
    """An ``EMOTransformerConfig`` for a tiny MoE GPT that runs on the CPU backend."""
    from megatron_emo.mcore import EMOTransformerConfig

    kwargs: dict[str, Any] = dict(
        num_layers=2,
        hidden_size=32,
        num_attention_heads=4,
        ffn_hidden_size=64,
        num_moe_experts=8,
        moe_ffn_hidden_size=16,
        moe_router_topk=3,
        emo_num_shared_experts=1,
        emo_pool_size_min=2,
        emo_pool_size_max=7,
        emo_pool_size_eval=3,
        moe_router_dtype="fp32",
        moe_aux_loss_coeff=1e-2,
        moe_z_loss_coeff=1e-3,
        moe_token_dispatcher_type="alltoall",
        gated_linear_unit=True,
        normalization="RMSNorm",
        add_bias_linear=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        **CPU_MODEL_FLAGS,
    )
    kwargs.update(overrides)
    return EMOTransformerConfig(**kwargs)


def build_tiny_gpt(config, seed: int = 0):
    """A ``GPTModel`` with the EMO local spec on the CPU backend's classes, seeded by ``seed``."""
    from megatron.core.transformer.moe import moe_logging

    from megatron_emo.cpu import CPU_MODEL_ADAPTER
    from megatron_emo.mcore import build_emo_gpt_model

    # The metrics tracker is process-global and sized by the first model (cpu_megatron.md 8).
    moe_logging.destroy_moe_metrics_tracker()
    torch.manual_seed(seed)
    return build_emo_gpt_model(
        config,
        vocab_size=VOCAB,
        max_sequence_length=SEQ,
        use_transformer_engine=False,
        adapter=CPU_MODEL_ADAPTER,
        position_embedding_type="rope",
    )


def tiny_batch(batch_size: int = 2, seed: int = 0, eod_positions=((5, 20, 41), (0, 33, 63))):
    """Random tokens ``(B, SEQ)`` with EOD at the given positions, plus inputs for GPTModel."""
    from megatron_emo.routing import DocumentBatch, doc_ids_from_eod

    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(1, VOCAB, (batch_size, SEQ), generator=gen)
    for b in range(batch_size):
        tokens[b, list(eod_positions[b % len(eod_positions)])] = EOD
    doc_ids, num_docs = doc_ids_from_eod(tokens, eod_id=EOD)
    docs = DocumentBatch(doc_ids, 1000 + torch.arange(int(num_docs.sum())), iteration=7)
    position_ids = torch.arange(SEQ).expand(batch_size, SEQ)
    causal_mask = torch.triu(torch.ones(1, 1, SEQ, SEQ, dtype=torch.bool), diagonal=1)
    return tokens, position_ids, causal_mask, docs


def random_doc_ids(num_tokens: int, num_docs: int, gen: torch.Generator) -> torch.Tensor:
    """``(T,)`` sorted ids of ``num_docs`` contiguous documents of random lengths (each >= 1)."""
    cuts = torch.randperm(num_tokens - 1, generator=gen)[: num_docs - 1] + 1
    starts = torch.zeros(num_tokens, dtype=torch.int64)
    starts[cuts] = 1
    return torch.cumsum(starts, 0)


def forward_with_docs(model, batch, *, train: bool = True):
    """One GPTModel forward of a ``tiny_batch`` inside its ``routing_context``; the LM loss."""
    from megatron_emo.mcore import routing_context

    tokens, position_ids, mask, docs = batch
    model.train(train)
    with routing_context(docs):
        return model(tokens, position_ids, mask, labels=tokens)


def capture_router_io(model) -> list[dict]:
    """Records each EMORouter call: hidden input ``[s, b, h]`` and its ``(probs, routing_map)``."""
    from megatron_emo.mcore import EMORouter

    records: list[dict] = []
    for module in model.modules():
        if isinstance(module, EMORouter):
            def hook(mod, inputs, output, _records=records):
                _records.append(
                    {"router": mod, "hidden": inputs[0].detach().clone(),
                     "probs": output[0].detach().clone(), "routing_map": output[1].clone()}
                )
            module.register_forward_hook(hook)
    return records
