"""The HF side of the format: ``config.json`` fields (emo_spec.md 4.1) and the model directory.

Pure python/json: imports neither megatron nor transformers.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass

__all__ = ["EmoShape", "MODELING_DIR", "copy_modeling_files", "hf_config_dict",
           "shape_from_hf_config", "write_config", "write_generation_config"]

MODELING_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "hf_modeling")
MODELING_FILES = ("configuration_emo.py", "modeling_emo.py")


@dataclass(frozen=True)
class EmoShape:
    """Everything the weight mapping needs to know about a model, in HF terms.

    ``num_experts`` counts every expert of a layer in HF, shared ones included (last indices).
    """

    num_layers: int
    hidden_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    num_experts: int
    num_shared_experts: int
    num_experts_per_tok: int
    vocab_size: int
    max_position_embeddings: int = 4096
    rope_theta: float = 500000.0
    rms_norm_eps: float = 1e-6
    eos_token_id: int | None = 100257
    pad_token_id: int | None = 100277
    bos_token_id: int | None = None

    @property
    def num_routed_experts(self) -> int:
        """Routed experts per layer: ``num_experts`` minus the shared ones."""
        return self.num_experts - self.num_shared_experts


def hf_config_dict(shape: EmoShape, torch_dtype: str = "float32") -> dict:
    """``config.json`` content: every field of emo_spec.md 4.1 plus ``auto_map``."""
    return {
        "architectures": ["EmoForCausalLM"],
        "auto_map": {
            "AutoConfig": "configuration_emo.EmoConfig",
            "AutoModelForCausalLM": "modeling_emo.EmoForCausalLM",
        },
        "model_type": "emo",
        "vocab_size": shape.vocab_size,
        "hidden_size": shape.hidden_size,
        "intermediate_size": shape.intermediate_size,
        "num_hidden_layers": shape.num_layers,
        "num_attention_heads": shape.num_attention_heads,
        "num_key_value_heads": shape.num_key_value_heads,
        "head_dim": shape.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": shape.max_position_embeddings,
        "rope_theta": shape.rope_theta,
        "rope_scaling": None,
        "rms_norm_eps": shape.rms_norm_eps,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "num_experts": shape.num_experts,
        "num_experts_per_tok": shape.num_experts_per_tok,
        "num_shared_experts": shape.num_shared_experts,
        "norm_topk_prob": False,
        "output_router_logits": True,
        "router_aux_loss_coef": 0.01,
        "tie_word_embeddings": False,
        "pad_token_id": shape.pad_token_id,
        "eos_token_id": shape.eos_token_id,
        "bos_token_id": shape.bos_token_id,
        "always_active_experts": None,
        "num_experts_per_layer": None,
        "num_shared_experts_per_layer": None,
        "dense_intermediate_size": None,
        "dense_mlp_bias": False,
        "initializer_range": 0.02,
        "use_cache": True,
        "torch_dtype": torch_dtype,
    }


def shape_from_hf_config(cfg: dict) -> EmoShape:
    """Reads an HF ``config.json`` dict (published or ours), refusing what the mapping lacks."""
    if cfg.get("model_type") != "emo":
        raise ValueError(f"config.json model_type must be 'emo', got {cfg.get('model_type')!r}")
    for key in ("always_active_experts", "num_experts_per_layer", "num_shared_experts_per_layer"):
        if cfg.get(key):
            raise ValueError(f"config.json field {key}={cfg[key]!r} is not supported")
    if cfg.get("tie_word_embeddings", False):
        raise ValueError("config.json tie_word_embeddings=true is not supported (EMO is untied)")
    heads = cfg["num_attention_heads"]
    num_experts = cfg["num_experts"]
    return EmoShape(
        num_layers=cfg["num_hidden_layers"],
        hidden_size=cfg["hidden_size"],
        num_attention_heads=heads,
        num_key_value_heads=cfg.get("num_key_value_heads") or heads,
        head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
        intermediate_size=cfg["intermediate_size"],
        num_experts=num_experts,
        num_shared_experts=cfg.get("num_shared_experts", 0),
        num_experts_per_tok=min(cfg["num_experts_per_tok"], num_experts),
        vocab_size=cfg["vocab_size"],
        max_position_embeddings=cfg.get("max_position_embeddings", 4096),
        rope_theta=cfg.get("rope_theta", 500000.0),
        rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
        eos_token_id=cfg.get("eos_token_id"),
        pad_token_id=cfg.get("pad_token_id"),
        bos_token_id=cfg.get("bos_token_id"),
    )


def copy_modeling_files(output_dir: str) -> None:
    """Copies ``configuration_emo.py`` and ``modeling_emo.py`` next to the weights."""
    for name in MODELING_FILES:
        shutil.copyfile(os.path.join(MODELING_DIR, name), os.path.join(output_dir, name))


def write_generation_config(output_dir: str, shape: EmoShape) -> None:
    """``generation_config.json`` with the model's special tokens."""
    gen = {"eos_token_id": shape.eos_token_id, "pad_token_id": shape.pad_token_id,
           "bos_token_id": shape.bos_token_id}
    with open(os.path.join(output_dir, "generation_config.json"), "w") as f:
        json.dump(gen, f, indent=2)


def write_config(output_dir: str, shape: EmoShape, torch_dtype: str) -> None:
    """Writes ``config.json`` of ``shape`` (weights in ``torch_dtype``) to ``output_dir``."""
    with open(os.path.join(output_dir, "config.json"), "w") as f:
        json.dump(hf_config_dict(shape, torch_dtype), f, indent=2)


def shape_dict(shape: EmoShape) -> dict:
    return asdict(shape)
