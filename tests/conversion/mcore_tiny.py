"""Tiny Megatron EMO models (built on the CPU backend), trained a few steps and saved.

They are saved the way megatron.training saves them (``dist_checkpointing.save`` of the model's
sharded state dict): the reference the streaming conversion is compared with. Test support only: the
conversion itself builds no model.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from megatron_emo.conversion import checkpoint_io as cio
from megatron_emo.conversion.hf_config import EmoShape
from megatron_emo.conversion.key_map import mcore_num_experts

from helpers import CPU_MODEL_FLAGS
from hf_tiny import TINY

SEQ = 32


def causal_mask(seq: int) -> torch.Tensor:
    return torch.triu(torch.ones(1, 1, seq, seq, dtype=torch.bool), diagonal=1)


def build(layout: str = "router", shape=TINY, seed: int = 0, num_padding: int = 0, **overrides):
    torch.manual_seed(seed)
    return build_model(mcore_config_from_shape(shape, layout, num_padding, **overrides), shape)


def train_few_steps(layout: str = "router", steps: int = 3, seed: int = 0):
    """EMO-routed (document pools on) tiny model after ``steps`` Adam steps on random tokens.

    Plain ``torch.optim.Adam`` on the CPU backend: the ``--cpu`` training entry point is not part
    of this branch.
    """
    from megatron_emo.mcore import routing_context

    from helpers import tiny_batch

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
    shape, layout, padding = cio.shape_from_args(common["args"])
    from megatron_emo.conversion.key_map import expand_mappings

    names = [m.mcore for m in expand_mappings(shape, layout, padding)]
    return cio.load_slices(ckpt_dir, names, cio.stored_tensor_keys(ckpt_dir))


def mcore_config_from_shape(shape: EmoShape, shared_layout: str, num_padding: int = 0,
                            **overrides):
    """An ``EMOTransformerConfig`` (pools off: ``emo_routing='standard'``) for CPU model builds."""
    from megatron_emo.mcore import EMOTransformerConfig

    kw = dict(
        num_layers=shape.num_layers,
        hidden_size=shape.hidden_size,
        num_attention_heads=shape.num_attention_heads,
        num_query_groups=shape.num_key_value_heads,
        kv_channels=shape.head_dim,
        ffn_hidden_size=shape.intermediate_size,
        num_moe_experts=mcore_num_experts(shape, shared_layout, num_padding),
        emo_num_padding_experts=num_padding,
        moe_ffn_hidden_size=shape.intermediate_size,
        moe_router_topk=shape.num_experts_per_tok - (1 if shared_layout == "mlp" else 0),
        emo_num_shared_experts=shape.num_shared_experts if shared_layout == "router" else 0,
        moe_shared_expert_intermediate_size=(
            shape.intermediate_size if shared_layout == "mlp" else None),
        emo_routing="standard",
        moe_router_dtype="fp32",
        moe_token_dispatcher_type="alltoall",
        gated_linear_unit=True,
        activation_func=torch.nn.functional.silu,
        normalization="RMSNorm",
        layernorm_epsilon=shape.rms_norm_eps,
        add_bias_linear=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        **CPU_MODEL_FLAGS,
    )
    kw.update(overrides)
    return EMOTransformerConfig(**kw)


def build_model(config, shape: EmoShape):
    """GPTModel with the EMO local spec on the CPU backend (needs model-parallel state)."""
    from megatron.core.transformer.moe import moe_logging

    from megatron_emo.cpu import CPU_MODEL_ADAPTER
    from megatron_emo.mcore import build_emo_gpt_model

    moe_logging.destroy_moe_metrics_tracker()
    return build_emo_gpt_model(
        config,
        vocab_size=shape.vocab_size,
        max_sequence_length=shape.max_position_embeddings,
        use_transformer_engine=False,
        adapter=CPU_MODEL_ADAPTER,
        position_embedding_type="rope",
        rotary_base=int(shape.rope_theta),
        share_embeddings_and_output_weights=False,
    )


def save_megatron_checkpoint(model, out_dir: str, args, iteration: int | None = None,
                             extra_common: dict | None = None) -> str:
    """Saves ``model`` as megatron.training does (``release`` when ``iteration`` is None).

    Returns:
        The dist_checkpointing directory written.
    """
    from megatron.core import dist_checkpointing

    sub = "release" if iteration is None else f"iter_{iteration:07d}"
    ckpt_dir = os.path.join(out_dir, sub)
    os.makedirs(ckpt_dir, exist_ok=True)
    state = {
        "model": model.sharded_state_dict(),
        "args": args,
        "checkpoint_version": 3.0,
        "iteration": 0 if iteration is None else iteration,
    }
    state.update(extra_common or {})
    dist_checkpointing.save(state, ckpt_dir)
    if not dist.is_initialized() or dist.get_rank() == 0:
        with open(os.path.join(out_dir, cio.TRACKER_FILE), "w") as f:
            f.write("release" if iteration is None else str(iteration))
    return ckpt_dir
