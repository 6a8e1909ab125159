"""Declarative weight-name table between Megatron-Core (GPTModel with EMO spec) and EMO HF.

STYLE.md rule 39: one template table with ``{layer}``/``{expert}`` placeholders, expanded for a
model shape and used in both directions. Pure torch: no megatron import.

Megatron names are the GPTModel parameter names of the local spec with **global** expert ids
(``local_experts.{expert}`` with ``expert`` in ``[0, num_moe_experts)``: the sharded state dict
already places local expert ``i`` of EP rank ``r`` at global id ``r * num_local + i``). The
Transformer Engine spec fuses the norms into the next linear; ``MCORE_ALIASES`` gives those
spellings (``checkpoint_io`` stores both under the same torch_dist key anyway).

Shared expert, two Megatron layouts (``shared_layout``):

* ``"router"``: the shared expert is expert ``E-1`` of the MoE (``emo_num_shared_experts=1``,
  ``num_moe_experts=E``), with its router row: HF and Megatron indices are identical.
* ``"mlp"``: Megatron's ``SharedExpertMLP`` (``num_moe_experts=E-1``,
  ``moe_shared_expert_intermediate_size=intermediate_size``). The router has ``E-1`` rows; HF's
  row ``E-1`` (never used: a softmax over one logit is 1.0) travels in the checkpoint's common
  state under ``SHARED_ROUTER_ROWS_KEY`` so HF -> Megatron -> HF stays bit-exact; a checkpoint
  without it exports a zero row.

Padding experts (``num_padding``, the EP-balanced layout): Megatron's experts are ordered
``[routed R | padding Pd | shared S]`` (``S`` only in the ``router`` layout), the router has a row
for each. Padding experts are never routed; they have no HF tensors: export drops their weights
and router rows, import re-creates them as zeros (op ``zeros``).

Ops: ``copy``; ``qkv`` (Megatron's per-query-group interleaved ``[q_0..q_{r-1}, k, v]`` rows per
group <-> separate q/k/v); ``glu`` (fc1 = cat(gate, up) rows <-> gate_proj/up_proj);
``router`` / ``router_mlp`` (routed rows, zero padding rows, then the shared rows in Megatron;
in ``router_mlp`` the shared row lives in the common state); ``zeros`` (a padding expert).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron_emo.conversion.hf_config import EmoShape

__all__ = [
    "GLOBAL_TEMPLATES",
    "LAYER_TEMPLATES",
    "EXPERT_TEMPLATES",
    "SHARED_MLP_TEMPLATES",
    "MCORE_ALIASES",
    "SHARED_ROUTER_ROWS_KEY",
    "Mapping",
    "expand_mappings",
    "hf_shapes",
    "mcore_num_experts",
    "padding_for_ep",
    "to_hf_tensors",
    "to_mcore_tensor",
]

SHARED_ROUTER_ROWS_KEY = "emo_hf_shared_router_rows"

# (megatron template, (hf templates...), op)
GLOBAL_TEMPLATES = [
    ("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), "copy"),
    ("decoder.final_layernorm.weight", ("model.norm.weight",), "copy"),
    ("output_layer.weight", ("lm_head.weight",), "copy"),
]
LAYER_TEMPLATES = [
    ("decoder.layers.{layer}.input_layernorm.weight",
     ("model.layers.{layer}.pre_attention_layernorm.weight",), "copy"),
    ("decoder.layers.{layer}.self_attention.linear_qkv.weight",
     ("model.layers.{layer}.self_attn.q_proj.weight",
      "model.layers.{layer}.self_attn.k_proj.weight",
      "model.layers.{layer}.self_attn.v_proj.weight"), "qkv"),
    ("decoder.layers.{layer}.self_attention.linear_proj.weight",
     ("model.layers.{layer}.self_attn.o_proj.weight",), "copy"),
    ("decoder.layers.{layer}.pre_mlp_layernorm.weight",
     ("model.layers.{layer}.pre_feedforward_layernorm.weight",), "copy"),
    ("decoder.layers.{layer}.mlp.router.weight",
     ("model.layers.{layer}.mlp.gate.weight",), "router"),
]
EXPERT_TEMPLATES = [
    ("decoder.layers.{layer}.mlp.experts.local_experts.{expert}.linear_fc1.weight",
     ("model.layers.{layer}.mlp.experts.{expert}.gate_proj.weight",
      "model.layers.{layer}.mlp.experts.{expert}.up_proj.weight"), "glu"),
    ("decoder.layers.{layer}.mlp.experts.local_experts.{expert}.linear_fc2.weight",
     ("model.layers.{layer}.mlp.experts.{expert}.down_proj.weight",), "copy"),
]
# Megatron SharedExpertMLP <-> HF expert {expert} = E-1 (shared_layout "mlp").
SHARED_MLP_TEMPLATES = [
    ("decoder.layers.{layer}.mlp.shared_experts.linear_fc1.weight",
     ("model.layers.{layer}.mlp.experts.{expert}.gate_proj.weight",
      "model.layers.{layer}.mlp.experts.{expert}.up_proj.weight"), "glu"),
    ("decoder.layers.{layer}.mlp.shared_experts.linear_fc2.weight",
     ("model.layers.{layer}.mlp.experts.{expert}.down_proj.weight",), "copy"),
]
# Transformer Engine spec spellings of the local-spec names above.
MCORE_ALIASES = {
    "decoder.layers.{layer}.self_attention.linear_qkv.layer_norm_weight":
        "decoder.layers.{layer}.input_layernorm.weight",
    "decoder.layers.{layer}.mlp.linear_fc1.layer_norm_weight":
        "decoder.layers.{layer}.pre_mlp_layernorm.weight",
}


@dataclass(frozen=True)
class Mapping:
    """One Megatron tensor and the HF tensors it becomes."""

    mcore: str
    hf: tuple[str, ...]
    op: str
    layer: int | None = None
    expert: int | None = None
    num_padding: int = 0


def _unpadded_num_experts(shape: EmoShape, shared_layout: str) -> int:
    if shared_layout == "router":
        return shape.num_experts
    if shared_layout == "mlp":
        if shape.num_shared_experts != 1:
            raise ValueError(
                f"shared_layout 'mlp' (Megatron SharedExpertMLP) needs exactly one shared expert, "
                f"got num_shared_experts={shape.num_shared_experts}"
            )
        return shape.num_experts - 1
    raise ValueError(f"shared_layout must be 'router' or 'mlp', got {shared_layout!r}")


def mcore_num_experts(shape: EmoShape, shared_layout: str, num_padding: int = 0) -> int:
    """Experts in Megatron's MoE layer for this HF shape, shared-expert layout and padding."""
    if num_padding < 0:
        raise ValueError(f"num_padding must be >= 0, got {num_padding}")
    return _unpadded_num_experts(shape, shared_layout) + num_padding


def padding_for_ep(shape: EmoShape, shared_layout: str, ep: int) -> int:
    """Fewest padding experts that make Megatron's expert count a multiple of ``ep``."""
    if ep < 1:
        raise ValueError(f"expert_model_parallel_size must be >= 1, got {ep}")
    return -_unpadded_num_experts(shape, shared_layout) % ep


def expand_mappings(shape: EmoShape, shared_layout: str = "router",
                    num_padding: int = 0) -> list[Mapping]:
    """The full table for a model: global entries, then per layer its tensors and experts.

    Megatron expert ``e`` of a layer is HF routed expert ``e`` for ``e < R``, a padding expert
    (op ``zeros``, no HF tensor) for ``R <= e < R + num_padding``, and HF expert ``e - num_padding``
    (an in-router shared expert) above that.
    """
    out = [Mapping(m, hf, op) for m, hf, op in GLOBAL_TEMPLATES]
    n_mcore = mcore_num_experts(shape, shared_layout, num_padding)
    routed = shape.num_routed_experts
    for layer in range(shape.num_layers):
        for m, hf, op in LAYER_TEMPLATES:
            if op == "router" and shared_layout == "mlp":
                op = "router_mlp"
            out.append(Mapping(m.format(layer=layer), tuple(h.format(layer=layer) for h in hf), op,
                               layer, num_padding=num_padding if op.startswith("router") else 0))
        for expert in range(n_mcore):
            padding = routed <= expert < routed + num_padding
            j = expert if expert < routed else expert - num_padding
            for m, hf, op in EXPERT_TEMPLATES:
                out.append(Mapping(m.format(layer=layer, expert=expert),
                                   () if padding else
                                   tuple(h.format(layer=layer, expert=j) for h in hf),
                                   "zeros" if padding else op, layer, expert))
        if shared_layout == "mlp":
            shared = shape.num_experts - 1
            for m, hf, op in SHARED_MLP_TEMPLATES:
                out.append(Mapping(m.format(layer=layer),
                                   tuple(h.format(layer=layer, expert=shared) for h in hf), op,
                                   layer, shared))
    return out


def hf_shapes(shape: EmoShape) -> dict[str, tuple[int, ...]]:
    """Every HF tensor name and shape of emo_spec.md 4.2 for ``shape``."""
    h, f, e = shape.hidden_size, shape.intermediate_size, shape.num_experts
    q, kv = shape.num_attention_heads * shape.head_dim, shape.num_key_value_heads * shape.head_dim
    out = {
        "model.embed_tokens.weight": (shape.vocab_size, h),
        "model.norm.weight": (h,),
        "lm_head.weight": (shape.vocab_size, h),
    }
    for i in range(shape.num_layers):
        p = f"model.layers.{i}."
        out[p + "pre_attention_layernorm.weight"] = (h,)
        out[p + "self_attn.q_proj.weight"] = (q, h)
        out[p + "self_attn.k_proj.weight"] = (kv, h)
        out[p + "self_attn.v_proj.weight"] = (kv, h)
        out[p + "self_attn.o_proj.weight"] = (h, q)
        out[p + "pre_feedforward_layernorm.weight"] = (h,)
        out[p + "mlp.gate.weight"] = (e, h)
        for j in range(e):
            out[p + f"mlp.experts.{j}.gate_proj.weight"] = (f, h)
            out[p + f"mlp.experts.{j}.up_proj.weight"] = (f, h)
            out[p + f"mlp.experts.{j}.down_proj.weight"] = (h, f)
    return out


def mcore_shape(mapping: Mapping, shape: EmoShape) -> tuple[int, ...]:
    """Shape of the Megatron tensor of ``mapping``."""
    h, f = shape.hidden_size, shape.intermediate_size
    q, kv = shape.num_attention_heads * shape.head_dim, shape.num_key_value_heads * shape.head_dim
    if mapping.op == "qkv":
        return (q + 2 * kv, h)
    if mapping.op == "glu":
        return (2 * f, h)
    if mapping.op == "router_mlp":
        return (shape.num_experts - 1 + mapping.num_padding, h)
    if mapping.op == "router":
        return (shape.num_experts + mapping.num_padding, h)
    if mapping.op == "zeros" and mapping.mcore.endswith("linear_fc1.weight"):
        return (2 * f, h)
    if mapping.mcore.endswith("linear_fc2.weight"):
        return (h, f)
    if mapping.mcore.endswith("linear_proj.weight"):
        return (h, q)
    if mapping.mcore.endswith("layernorm.weight"):
        return (h,)
    return (shape.vocab_size, h)


def _check(name: str, t: torch.Tensor, expected: tuple[int, ...]) -> None:
    if tuple(t.shape) != tuple(expected):
        raise ValueError(f"shape mismatch for {name}: got {tuple(t.shape)}, expected {expected}")


def to_hf_tensors(mapping: Mapping, t: torch.Tensor, shape: EmoShape,
                  shared_router_row: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Megatron tensor -> its HF tensors (views/clones, same dtype)."""
    _check(mapping.mcore, t, mcore_shape(mapping, shape))
    routed, pad = shape.num_routed_experts, mapping.num_padding
    if mapping.op == "zeros":
        return {}
    if mapping.op == "router" and pad:
        return {mapping.hf[0]: torch.cat([t[:routed], t[routed + pad:]], dim=0)}
    if mapping.op == "copy" or mapping.op == "router":
        return {mapping.hf[0]: t}
    if mapping.op == "glu":
        gate, up = t.chunk(2, dim=0)
        return {mapping.hf[0]: gate, mapping.hf[1]: up}
    if mapping.op == "qkv":
        ng, hd = shape.num_key_value_heads, shape.head_dim
        r = shape.num_attention_heads // ng
        grouped = t.reshape(ng, (r + 2) * hd, -1)
        q = grouped[:, : r * hd].reshape(ng * r * hd, -1)
        k = grouped[:, r * hd : (r + 1) * hd].reshape(ng * hd, -1)
        v = grouped[:, (r + 1) * hd :].reshape(ng * hd, -1)
        return {mapping.hf[0]: q, mapping.hf[1]: k, mapping.hf[2]: v}
    if mapping.op == "router_mlp":
        row = (torch.zeros(1, t.shape[1], dtype=t.dtype) if shared_router_row is None
               else shared_router_row.reshape(1, -1).to(t.dtype))
        return {mapping.hf[0]: torch.cat([t[:routed], row], dim=0)}
    raise ValueError(f"unknown op {mapping.op!r}")


def to_mcore_tensor(mapping: Mapping, hf: dict[str, torch.Tensor], shape: EmoShape,
                    dtype: torch.dtype = torch.float32
                    ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """HF tensors of ``mapping`` -> (Megatron tensor, shared router row for ``router_mlp``).

    ``dtype`` is used only for op ``zeros`` (padding experts), which has no HF tensor.
    """
    expected = hf_shapes_for(mapping, shape)
    for name in mapping.hf:
        if name not in hf:
            raise KeyError(f"missing HF tensor {name} (needed for {mapping.mcore})")
        _check(name, hf[name], expected[name])
    routed, pad = shape.num_routed_experts, mapping.num_padding
    if mapping.op == "zeros":
        return torch.zeros(mcore_shape(mapping, shape), dtype=dtype), None
    if mapping.op == "router" and pad:
        g = hf[mapping.hf[0]]
        zeros = torch.zeros(pad, g.shape[1], dtype=g.dtype)
        return torch.cat([g[:routed], zeros, g[routed:]], dim=0), None
    if mapping.op in ("copy", "router"):
        return hf[mapping.hf[0]], None
    if mapping.op == "glu":
        return torch.cat([hf[mapping.hf[0]], hf[mapping.hf[1]]], dim=0), None
    if mapping.op == "qkv":
        ng, hd = shape.num_key_value_heads, shape.head_dim
        r = shape.num_attention_heads // ng
        h = shape.hidden_size
        q = hf[mapping.hf[0]].reshape(ng, r * hd, h)
        k = hf[mapping.hf[1]].reshape(ng, hd, h)
        v = hf[mapping.hf[2]].reshape(ng, hd, h)
        return torch.cat([q, k, v], dim=1).reshape(ng * (r + 2) * hd, h), None
    if mapping.op == "router_mlp":
        g = hf[mapping.hf[0]]
        if pad:
            zeros = torch.zeros(pad, g.shape[1], dtype=g.dtype)
            return torch.cat([g[:routed], zeros], dim=0), g[routed].clone()
        return g[:routed], g[routed].clone()
    raise ValueError(f"unknown op {mapping.op!r}")


def hf_shapes_for(mapping: Mapping, shape: EmoShape) -> dict[str, tuple[int, ...]]:
    """Expected HF shapes of the tensors of one mapping."""
    h, f = shape.hidden_size, shape.intermediate_size
    q, kv = shape.num_attention_heads * shape.head_dim, shape.num_key_value_heads * shape.head_dim
    if mapping.op == "qkv":
        return dict(zip(mapping.hf, [(q, h), (kv, h), (kv, h)], strict=True))
    if mapping.op == "glu":
        return {mapping.hf[0]: (f, h), mapping.hf[1]: (f, h)}
    if mapping.op in ("router", "router_mlp"):
        return {mapping.hf[0]: (shape.num_experts, h)}
    if mapping.op == "zeros":
        return {}
    return {mapping.hf[0]: mcore_shape(mapping, shape)}
