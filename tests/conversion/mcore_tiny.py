"""Tiny Megatron EMO models trained a few steps and saved as megatron.training checkpoints."""

from __future__ import annotations

import torch
from hf_tiny import TINY

from megatron_emo.conversion import checkpoint_io as cio

SEQ = 32


def causal_mask(seq: int) -> torch.Tensor:
    return torch.triu(torch.ones(1, 1, seq, seq, dtype=torch.bool), diagonal=1)


def build(layout: str = "router", shape=TINY, seed: int = 0, **overrides):
    torch.manual_seed(seed)
    return cio.build_model(cio.mcore_config_from_shape(shape, layout, **overrides), shape)


def train_few_steps(layout: str = "router", steps: int = 3, seed: int = 0):
    """EMO-routed (document pools on) tiny model after ``steps`` Adam steps on random tokens.

    Plain ``torch.optim.Adam`` on the CPU backend: the ``--cpu`` training entry point is not part
    of this branch.
    """
    from helpers import tiny_batch

    from megatron_emo.mcore import routing_context

    model = build(layout, seed=seed, emo_routing="emo", emo_pool_size_min=2,
                  emo_pool_size_max=7, emo_pool_size_eval=3, moe_aux_loss_coeff=1e-2)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for step in range(steps):
        tokens, position_ids, mask, docs = tiny_batch(seed=step)
        labels = torch.roll(tokens, -1, dims=1)
        with routing_context(docs):
            loss = model(tokens, position_ids, mask, labels=labels).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def megatron_logits(model, tokens: torch.Tensor) -> torch.Tensor:
    b, s = tokens.shape
    with torch.no_grad():
        return model(tokens, torch.arange(s).expand(b, s), causal_mask(s))


def megatron_greedy(model, prompt: torch.Tensor, new_tokens: int) -> torch.Tensor:
    seq = prompt
    for _ in range(new_tokens):
        nxt = megatron_logits(model, seq)[:, -1].argmax(-1, keepdim=True)
        seq = torch.cat([seq, nxt], dim=1)
    return seq


def load_into(model, ckpt_dir: str):
    """Loads a torch_dist checkpoint into ``model`` the way megatron.training does."""
    from megatron.core import dist_checkpointing

    sd = dist_checkpointing.load({"model": model.sharded_state_dict()},
                                 cio.resolve_checkpoint_dir(ckpt_dir))
    model.load_state_dict(sd["model"], strict=True)
    return model


def stored_model_tensors(ckpt: str) -> dict[str, torch.Tensor]:
    """Every model tensor of a checkpoint, read whole (for bit-exact comparisons)."""
    from megatron.core import dist_checkpointing

    ckpt_dir = cio.resolve_checkpoint_dir(ckpt)
    common = dist_checkpointing.load_common_state_dict(ckpt_dir)
    shape, layout = cio.shape_from_args(common["args"])
    from megatron_emo.conversion.key_map import expand_mappings

    names = [m.mcore for m in expand_mappings(shape, layout)]
    return cio.load_slices(ckpt_dir, names, cio.stored_tensor_keys(ckpt_dir))
