"""``EMOTransformerConfig``: Megatron's ``TransformerConfig`` plus the ``emo_*`` fields.

Megatron symbols: ``megatron.core.transformer.transformer_config.TransformerConfig``.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Literal

from megatron.core.transformer.transformer_config import TransformerConfig

__all__ = ["EMOTransformerConfig"]


@dataclass
class EMOTransformerConfig(TransformerConfig):
    """Transformer config with EMO document-pool routing.

    ``moe_router_topk`` counts every expert a token uses, including the
    ``emo_num_shared_experts`` always-on experts that sit in the router's last columns. Pool sizes
    count routed (non-shared) experts only. Megatron's own ``SharedExpertMLP``
    (``moe_shared_expert_intermediate_size``) is the other way to get EMO's shared expert: it is
    computed outside the router, so then ``emo_num_shared_experts`` stays 0.
    """

    emo_routing: Literal["emo", "standard"] = "emo"
    """'emo': document pools; 'standard': the same router with pools off (the standard-MoE
    baseline: softmax over all routed experts, same shared expert and load balancing)."""

    emo_pool_size_min: int = 8
    """Smallest pool size drawn per document in training (routed experts, inclusive)."""

    emo_pool_size_max: int = 128
    """Largest pool size drawn per document in training (inclusive); >= routed experts means
    that draw applies no mask."""

    emo_pool_size_eval: int = 32
    """Pool size of every document in evaluation."""

    emo_num_shared_experts: int = 0
    """Shared experts inside the router: the last router columns, always selected, weight 1.0."""

    emo_num_padding_experts: int = 0
    """Never-routed padding experts (columns ``[routed | padding | shared]``) that make the expert
    count a multiple of the expert-parallel size; dropped on HF export, re-created on import."""

    emo_pool_size_seed: int = 12536
    """Seed of the counter-based pool-size draw, keyed by (seed, iteration, layer, document)."""

    emo_renormalize_probs: bool = False
    """Renormalise the chosen routed weights to sum 1 (EMO does not)."""

    emo_lb_accumulate_microbatches: bool = False
    """Balance over all micro-batches of the step seen so far (running counts, reset when the
    iteration changes) instead of each micro-batch alone, as the reference does."""

    emo_scale_aux_loss_by_num_layers: bool = True
    """Divide ``moe_aux_loss_coeff`` and ``moe_z_loss_coeff`` by the number of MoE layers, so the
    flags give the total weight (EMO: 0.1 and 1e-3 over 16 layers, 0.00625 and 6.25e-5 each)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.num_moe_experts:
            raise ValueError(f"EMO routing needs an MoE model: num_moe_experts is {self.num_moe_experts}")
        if self.emo_routing not in ("emo", "standard"):
            raise ValueError(f"emo_routing must be 'emo' or 'standard', got {self.emo_routing!r}")
        num_shared = self.emo_num_shared_experts
        num_routed = self.num_moe_experts - num_shared
        if not 0 <= num_shared < self.num_moe_experts:
            raise ValueError(
                f"emo_num_shared_experts ({num_shared}) must be in [0, num_moe_experts "
                f"({self.num_moe_experts}))"
            )
        num_slots = self.moe_router_topk - num_shared
        if not 1 <= num_slots <= num_routed:
            raise ValueError(
                f"moe_router_topk ({self.moe_router_topk}) counts the emo_num_shared_experts "
                f"({num_shared}) too, so it must leave between 1 and {num_routed} routed slots"
            )
        if self.emo_routing == "emo":
            if not num_slots <= self.emo_pool_size_min <= self.emo_pool_size_max:
                raise ValueError(
                    f"need moe_router_topk - emo_num_shared_experts ({num_slots}) <= "
                    f"emo_pool_size_min ({self.emo_pool_size_min}) <= emo_pool_size_max "
                    f"({self.emo_pool_size_max})"
                )
            if self.emo_pool_size_eval < num_slots:
                raise ValueError(
                    f"emo_pool_size_eval ({self.emo_pool_size_eval}) must be >= the routed slots "
                    f"per token, moe_router_topk - emo_num_shared_experts ({num_slots})"
                )
        self._check_megatron_options()

    def _check_megatron_options(self) -> None:
        """Refuses Megatron options that contradict EMO routing, naming them."""
        if self.moe_router_score_function not in ("softmax", "sigmoid"):
            raise ValueError(
                f"EMO routing supports moe_router_score_function 'softmax' or 'sigmoid', got "
                f"{self.moe_router_score_function!r}"
            )
        lb_types = self.moe_router_load_balancing_type
        lb_types = lb_types if isinstance(lb_types, list) else [lb_types]
        bad = [t for t in lb_types if t not in ("aux_loss", "none")]
        if bad:
            raise ValueError(
                f"EMO routing does its own global load balancing: moe_router_load_balancing_type "
                f"must be 'aux_loss' or 'none', got {self.moe_router_load_balancing_type!r}"
            )
        if isinstance(self.moe_aux_loss_coeff, list):
            raise ValueError(f"moe_aux_loss_coeff must be one number, got {self.moe_aux_loss_coeff}")
        refused = {
            "moe_router_num_groups (group-limited routing)": self.moe_router_num_groups,
            "moe_router_fusion (TE fused top-k cannot apply pools)": self.moe_router_fusion,
            "moe_enable_routing_replay": self.moe_enable_routing_replay,
            "mtp_num_layers (MTP layers shift tokens across documents)": self.mtp_num_layers,
            "overlap_moe_expert_parallel_comm (routes outside the forward step)": (
                self.overlap_moe_expert_parallel_comm
            ),
            "moe_router_force_load_balancing (replaces the logits)": (
                self.moe_router_force_load_balancing
            ),
            "moe_router_force_biased (replaces the logits)": self.moe_router_force_biased,
        }
        for name, value in refused.items():
            if value:
                raise ValueError(f"EMO routing does not support {name}; got {value!r}")
        if self.cuda_graph_impl != "none":
            raise ValueError(
                f"EMO routing reads per-micro-batch documents in Python: cuda_graph_impl must be "
                f"'none', got {self.cuda_graph_impl!r}"
            )
        if self.recompute_granularity == "full" or (
            self.recompute_granularity == "selective" and "moe" in (self.recompute_modules or [])
        ):
            raise ValueError(
                "EMO routing takes document ids from the forward step, which a recompute in the "
                f"backward pass cannot see: recompute_granularity={self.recompute_granularity!r} "
                f"with recompute_modules={self.recompute_modules} is not supported; recompute "
                "'core_attn', 'moe_act', 'layernorm' or 'shared_experts' instead"
            )
        if self.moe_router_pre_softmax:
            warnings.warn(
                "moe_router_pre_softmax has no effect with EMO routing: probabilities are always "
                "a softmax over the pool; use emo_renormalize_probs to renormalise",
                stacklevel=3,
            )

    @property
    def emo_num_routed_experts(self) -> int:
        """Routed (non-shared) experts per layer: the ones pools choose from."""
        return self.num_moe_experts - self.emo_num_shared_experts
