"""Tiny EMO HF directories for the conversion tests (no megatron import)."""

from __future__ import annotations

import torch

from megatron_emo.conversion.hf_config import (
    EmoShape,
    copy_modeling_files,
    write_config,
    write_generation_config,
)
from megatron_emo.conversion.hf_io import ShardWriter
from megatron_emo.conversion.key_map import hf_shapes

TINY = EmoShape(num_layers=2, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                head_dim=8, intermediate_size=16, num_experts=8, num_shared_experts=1,
                num_experts_per_tok=3, vocab_size=128, max_position_embeddings=64,
                rope_theta=10000.0, rms_norm_eps=1e-5, eos_token_id=0, pad_token_id=1)


def random_hf_state_dict(shape: EmoShape = TINY, seed: int = 0, std: float = 0.2) -> dict:
    """Random weights with every name and shape of the EMO HF format (norms near 1)."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, s in hf_shapes(shape).items():
        if name.endswith("norm.weight") or "layernorm" in name:
            out[name] = 1.0 + 0.1 * torch.randn(s, generator=gen)
        else:
            out[name] = std * torch.randn(s, generator=gen)
    return out


def write_hf_dir(path, state_dict: dict, shape: EmoShape = TINY, max_shard_bytes=40_000) -> None:
    """An HF directory as ``to-hf`` writes it, from an HF state dict."""
    path = str(path)
    import os

    os.makedirs(path, exist_ok=True)
    writer = ShardWriter(path, max_shard_bytes)
    for name, t in state_dict.items():
        writer.add(name, t)
    writer.close()
    write_config(path, shape, "float32")
    write_generation_config(path, shape)
    copy_modeling_files(path)
