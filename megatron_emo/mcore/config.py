"""``EMOTransformerConfig``: Megatron's ``TransformerConfig`` plus the ``emo_*`` fields.

Each field's attribute docstring is also its ``--emo-*`` flag's help (``training/arguments.py``).

Megatron symbols: ``megatron.core.transformer.transformer_config.TransformerConfig``.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Literal

from megatron.core.transformer.transformer_config import TransformerConfig

__all__ = ["EMOTransformerConfig", "uniform_routing_ep_loads"]


@dataclass
class EMOTransformerConfig(TransformerConfig):
    """Transformer config with EMO document-pool routing.

    Router columns and Megatron experts are ordered ``[routed R | padding Pd | shared S]`` with
    ``num_moe_experts = R + Pd + S``. ``moe_router_topk`` counts every expert a token uses,
    including the ``emo_num_shared_experts`` always-on experts in the last columns. Pool sizes
    and the load-balancing loss count routed experts only. Megatron's own ``SharedExpertMLP``
    (``moe_shared_expert_intermediate_size``) is the other way to get EMO's shared expert,
    computed outside the router on every rank (``emo_num_shared_experts`` 0); at expert-parallel
    size > 1 that layout keeps the ranks balanced, with ``emo_num_padding_experts`` padding the
    routed experts to a multiple of the EP size (EMO 1B14B at EP 8: 127 routed + 1 padding).
    """

    emo_routing: Literal["emo", "standard"] = "emo"
    """'emo': every token routes inside its document's expert pool; 'standard': the same router
    with pools off (the standard-MoE baseline: softmax over all routed experts, same shared expert
    and load balancing)."""

    emo_pool_size_min: int = 8
    """Smallest pool size drawn per document in training (routed experts, inclusive)."""

    emo_pool_size_max: int = 128
    """Largest pool size drawn per document in training (inclusive); >= routed experts means
    that draw applies no mask."""

    emo_pool_size_eval: int = 32
    """Pool size of every document in evaluation."""

    emo_num_shared_experts: int = 0
    """Shared experts inside the router: the last router columns, always selected, weight 1.0.
    They count in ``num_moe_experts`` (``--num-experts``) and ``moe_router_topk``
    (``--moe-router-topk``). At expert-parallel size > 1 they overload one expert-parallel rank:
    use ``--moe-shared-expert-intermediate-size`` with ``--emo-num-padding-experts`` instead."""

    emo_num_padding_experts: int = 0
    """Never-routed experts between the routed and the shared columns, counted in
    ``num_moe_experts`` (``--num-experts``), so that the expert count divides the expert-parallel
    size without an always-busy expert: ``(-R) mod EP`` for R routed experts (EMO 1B14B at EP 8:
    127 routed + 1 padding with ``--moe-shared-expert-intermediate-size 1024``). They are
    ordinary Megatron experts (weights exist, EP-sharded like the others) that are left out of
    pools, scores, top-k, the losses, the expert bias and the metrics: they receive no token and
    no gradient, and neither do their router rows."""

    emo_pool_size_seed: int = 12536
    """Seed of the counter-based pool-size draw, keyed by (seed, iteration, layer, document)."""

    emo_renormalize_probs: bool = False
    """Renormalise the chosen routed weights to sum to 1 (EMO does not)."""

    emo_lb_accumulate_microbatches: bool = False
    """Balance over all micro-batches of the step seen so far (running counts, reset when the
    iteration changes) instead of each micro-batch alone, as the reference does."""

    emo_router_fusion: Literal["auto", "on", "off"] = "auto"
    """Fused (Triton) EMO routing: 'auto' uses it on CUDA when triton imports and the router
    scores with softmax (so without expert bias), otherwise the pure-torch path; 'on' requires
    it; 'off' always takes the pure-torch path (``megatron_emo.routing.fused``)."""

    emo_scale_aux_loss_by_num_layers: bool = True
    """Divide ``moe_aux_loss_coeff`` and ``moe_z_loss_coeff`` by the number of MoE layers, so the
    flags give the total weight (EMO: 0.1 and 1e-3 over 16 layers, 0.00625 and 6.25e-5 each).
    ``--emo-no-scale-aux-loss-by-num-layers`` applies ``--moe-aux-loss-coeff`` and
    ``--moe-z-loss-coeff`` per layer instead."""

    def __post_init__(self) -> None:
        if self.moe_router_dtype is None:
            # EMO computes router logits in fp32 (emo_spec.md 1.2 step 3); Megatron's default runs
            # the router GEMM in the activation dtype (router.py:87 gating), bf16 in the recipe.
            self.moe_router_dtype = "fp32"
        super().__post_init__()
        if not self.num_moe_experts:
            raise ValueError(
                f"EMO routing needs an MoE model: num_moe_experts is {self.num_moe_experts}"
            )
        if self.emo_routing not in ("emo", "standard"):
            raise ValueError(f"emo_routing must be 'emo' or 'standard', got {self.emo_routing!r}")
        num_shared = self.emo_num_shared_experts
        num_padding = self.emo_num_padding_experts
        if num_shared < 0 or num_padding < 0:
            raise ValueError(
                f"emo_num_shared_experts ({num_shared}) and emo_num_padding_experts "
                f"({num_padding}) must be >= 0"
            )
        num_routed = self.emo_num_routed_experts
        if num_routed < 1:
            raise ValueError(
                f"num_moe_experts ({self.num_moe_experts}) must leave at least one routed expert "
                f"besides emo_num_shared_experts ({num_shared}) and emo_num_padding_experts "
                f"({num_padding})"
            )
        num_slots = self.moe_router_topk - num_shared
        if not 1 <= num_slots <= num_routed:
            raise ValueError(
                f"moe_router_topk ({self.moe_router_topk}) counts the emo_num_shared_experts "
                f"({num_shared}) too, so it must leave between 1 and {num_routed} routed slots "
                f"(routed experts: num_moe_experts {self.num_moe_experts} - shared - "
                f"emo_num_padding_experts {num_padding})"
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
        if self.emo_renormalize_probs and num_slots == 1:
            raise ValueError(
                "emo_renormalize_probs with one routed slot (moe_router_topk "
                f"{self.moe_router_topk} - emo_num_shared_experts {num_shared}) makes every "
                "routed weight 1.0, so the LM loss gives the router no gradient"
            )
        self._check_megatron_options()
        self._warn_about_unbalanced_expert_parallel_ranks()
        self._check_router_fusion()

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
            raise ValueError(
                f"moe_aux_loss_coeff must be one number, got {self.moe_aux_loss_coeff}"
            )
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
        for name in ("mlp_chunks_for_training", "mlp_chunks_for_prefill"):
            if getattr(self, name) > 1:
                raise ValueError(
                    f"EMO routing does not support {name}={getattr(self, name)}: chunking the "
                    "sequence splits documents over separate router calls, so no call sees a "
                    "whole document's pool statistics; leave it at 1"
                )
        if self.moe_pad_expert_input_to_capacity and (
            self.emo_num_shared_experts or self.emo_num_padding_experts
        ):
            raise ValueError(
                "moe_pad_expert_input_to_capacity=True fills every expert to the same capacity "
                "(token_dispatcher.py:511), so the in-router shared experts would lose tokens and "
                "the padding experts would receive some; not supported with "
                f"emo_num_shared_experts={self.emo_num_shared_experts} or "
                f"emo_num_padding_experts={self.emo_num_padding_experts}"
            )
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

    def _warn_about_unbalanced_expert_parallel_ranks(self) -> None:
        """Warns when in-router shared experts overload one expert-parallel rank."""
        ep = self.expert_model_parallel_size
        num_shared = self.emo_num_shared_experts
        if ep <= 1 or num_shared == 0:
            return
        loads = uniform_routing_ep_loads(
            num_routed=self.emo_num_routed_experts,
            num_padding=self.emo_num_padding_experts,
            num_shared=num_shared,
            num_slots=self.moe_router_topk - num_shared,
            ep_size=ep,
        )
        mean = sum(loads) / len(loads)
        busiest = max(loads)
        others = [x for x in loads if x != busiest] or loads
        num_routed = self.emo_num_routed_experts
        num_padding = (-num_routed) % ep
        warnings.warn(
            f"emo_num_shared_experts={num_shared} at expert_model_parallel_size={ep}: every "
            f"token also goes to the shared expert(s), so under uniform routing the EP rank that "
            f"hosts them receives {busiest / mean:.2f}x the mean token-expert assignments per "
            f"rank ({busiest / max(others):.2f}x the other ranks) and all ranks wait for it. "
            "Balanced layout: the shared expert as Megatron's SharedExpertMLP and never-routed "
            f"padding experts: --emo-num-shared-experts 0 --moe-shared-expert-intermediate-size "
            f"{num_shared * (self.moe_ffn_hidden_size or self.ffn_hidden_size)} --num-experts "
            f"{num_routed + num_padding} --emo-num-padding-experts {num_padding} "
            f"--moe-router-topk {self.moe_router_topk - num_shared} "
            "(optionally --moe-shared-expert-overlap)",
            stacklevel=3,
        )

    def _check_router_fusion(self) -> None:
        """Refuses ``emo_router_fusion='on'`` where the fused kernels cannot route."""
        if self.emo_router_fusion not in ("auto", "on", "off"):
            raise ValueError(
                f"emo_router_fusion must be 'auto', 'on' or 'off', got {self.emo_router_fusion!r}"
            )
        if self.emo_router_fusion != "on":
            return
        # An expert bias implies sigmoid scoring (transformer_config.py:2284), so this refuses it.
        if self.moe_router_score_function != "softmax":
            raise ValueError(
                "emo_router_fusion='on' fuses softmax scoring only, got moe_router_score_function "
                f"{self.moe_router_score_function!r}; use emo_router_fusion 'auto' or 'off'"
            )
        try:
            import triton  # noqa: F401
        except ImportError as exc:
            raise ValueError(
                f"emo_router_fusion='on' needs triton, which does not import here ({exc}); use "
                "emo_router_fusion 'auto' or 'off'"
            ) from exc

    @property
    def emo_num_routed_experts(self) -> int:
        """Routed experts per layer (neither shared nor padding): the ones pools choose from."""
        return self.num_moe_experts - self.emo_num_shared_experts - self.emo_num_padding_experts


def uniform_routing_ep_loads(
    *, num_routed: int, num_padding: int, num_shared: int, num_slots: int, ep_size: int
) -> list[float]:
    """Token-expert assignments each EP rank receives per token under uniform routing.

    Experts are laid out ``[routed | padding | shared]`` and split into ``ep_size`` contiguous
    blocks (Megatron's expert-parallel sharding). A routed expert receives ``num_slots /
    num_routed`` assignments per token, a padding expert none, a shared expert one.

    Args:
        num_routed: routed experts R.
        num_padding: never-routed padding experts.
        num_shared: in-router shared experts.
        num_slots: routed slots per token.
        ep_size: expert-parallel size; must divide the expert count.

    Returns:
        One float per EP rank.
    """
    num_experts = num_routed + num_padding + num_shared
    if num_experts % ep_size:
        raise ValueError(f"num_experts ({num_experts}) must be divisible by ep_size ({ep_size})")
    per_expert = [num_slots / num_routed] * num_routed + [0.0] * num_padding + [1.0] * num_shared
    block = num_experts // ep_size
    return [sum(per_expert[r * block : (r + 1) * block]) for r in range(ep_size)]
