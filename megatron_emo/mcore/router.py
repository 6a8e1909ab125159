"""``EMORouter``: Megatron's ``TopKRouter`` with EMO document-pool routing.

Megatron symbols: ``transformer.moe.router.TopKRouter`` (``forward``, ``gating``, ``routing``,
``attach_and_log_load_balancing_loss``, ``_apply_expert_bias``, ``tp_cp_group``,
``tp_dp_cp_group``, ``layer_number``), ``transformer.moe.moe_utils.{MoEAuxLossAutoScaler,
router_gating_linear, apply_router_token_dropping}``, ``transformer.moe.moe_logging.
get_moe_metrics_tracker``.
"""

from __future__ import annotations

import functools
import importlib

import torch
from megatron.core.transformer.moe.moe_logging import get_moe_metrics_tracker
from megatron.core.transformer.moe.moe_utils import (
    MoEAuxLossAutoScaler,
    apply_router_token_dropping,
    router_gating_linear,
)
from megatron.core.transformer.moe.router import TopKRouter

from megatron_emo.mcore.config import EMOTransformerConfig
from megatron_emo.mcore.routing_context import current_context
from megatron_emo.parallel import RoutingLayout
from megatron_emo.routing import (
    DocumentBatch,
    document_pool_mask,
    eval_pool_sizes,
    expert_load,
    load_balancing_loss,
    route_within_pools,
    routing_metrics,
    sample_pool_sizes,
    z_loss,
)

__all__ = ["EMORouter", "num_moe_layers"]


@functools.cache
def _import_fused_routing():
    """The fused Triton routing module, or None where triton does not import (imported once)."""
    try:
        return importlib.import_module("megatron_emo.routing.fused")
    except ImportError:
        return None


def num_moe_layers(config: EMOTransformerConfig) -> int:
    """Number of MoE layers implied by ``moe_layer_freq`` (int period or 0/1 list)."""
    freq = config.moe_layer_freq
    if isinstance(freq, int):
        return sum(1 for i in range(config.num_layers) if i % freq == 0)
    return int(sum(freq))


class EMORouter(TopKRouter):
    """Top-k router whose tokens may only use their document's expert pool (EMO).

    Per micro-batch it reads ``routing_context`` once (the ``DocumentBatch`` and, on logging
    steps, the metrics tracker to record into), draws a pool size per document (training:
    uniform in ``[emo_pool_size_min, emo_pool_size_max]``, keyed by seed, iteration, layer and
    document key; evaluation: ``emo_pool_size_eval``), selects every document's pool from its
    summed fp32 softmax, and routes inside the pool with ``megatron_emo.routing``. Every
    parallel decision (which ranks complete a document's sums, the global TP x DP x CP balance
    counts, the SP slice, loss shares, the metrics group) is its ``RoutingLayout``
    (``self.layout``), built once from the process groups, so balance is global while documents
    specialise. With ``emo_routing='standard'`` the same code routes without pools (the
    standard-MoE baseline). ``emo_router_fusion`` selects the fused Triton kernels
    (``megatron_emo.routing.fused``; by default on CUDA) or the pure-torch functions; both give
    the same routing.

    Outside ``routing_context`` the router raises in training; in evaluation each sequence is
    one document.
    """

    def __init__(
        self,
        config: EMOTransformerConfig,
        pg_collection=None,
        is_mtp_layer: bool = False,
        **kwargs,
    ):
        if not isinstance(config, EMOTransformerConfig):
            raise TypeError(f"EMORouter needs an EMOTransformerConfig, got {type(config).__name__}")
        super().__init__(
            config=config, pg_collection=pg_collection, is_mtp_layer=is_mtp_layer, **kwargs
        )
        self.num_shared_experts = config.emo_num_shared_experts
        self.num_padding_experts = config.emo_num_padding_experts
        self.num_routed_experts = config.emo_num_routed_experts
        if self.enable_expert_bias:
            # Only routed experts have a bias. Megatron sizes both buffers (E,) and pushes every
            # column towards the mean over all E columns (moe_utils.py:1163
            # get_updated_expert_bias, via finalize_model_grads.py:334), which the always-on
            # shared columns would inflate; with (R,) buffers its update uses the routed mean.
            device = self.expert_bias.device
            self.register_buffer(
                "local_tokens_per_expert",
                torch.zeros(self.num_routed_experts, dtype=torch.float32, device=device),
                persistent=False,
            )
            self.register_buffer(
                "expert_bias",
                torch.zeros(self.num_routed_experts, dtype=torch.float32, device=device),
            )
        # Every parallel decision of this router (pools, balance counts, SP slice, loss shares,
        # metrics group), from the process groups Megatron gave it.
        self.layout = RoutingLayout.from_process_groups(
            tp_group=self.tp_group,
            cp_group=self.cp_group,
            tp_cp_group=self.tp_cp_group,
            tp_dp_cp_group=self.tp_dp_cp_group,
            sequence_parallel=config.sequence_parallel,
        )
        scale = num_moe_layers(config) if config.emo_scale_aux_loss_by_num_layers else 1
        lb_coeff = config.moe_aux_loss_coeff if self.get_aux_loss_coeff("aux_loss") else 0.0
        self.lb_coeff = lb_coeff / scale
        self.z_coeff = (config.moe_z_loss_coeff or 0.0) / scale
        # Running fp32 expert load of the current step (emo_lb_accumulate_microbatches); not a
        # buffer, so Megatron's Float16Module cannot cast the counts to bf16.
        self._step_load_R1: torch.Tensor | None = None
        self._step_load_iteration: int | None = None

    def gating(self, input: torch.Tensor) -> torch.Tensor:
        """Router logits; the weights follow the input's device (Megatron moves them to CUDA)."""
        if self.weight.device != input.device:
            self.weight.data = self.weight.data.to(input.device)
        if self.bias is not None and self.bias.device != input.device:
            self.bias.data = self.bias.data.to(input.device)
        router_dtype = input.dtype
        if self.config.moe_router_dtype == "fp32":
            router_dtype = torch.float32
        elif self.config.moe_router_dtype == "fp64":
            router_dtype = torch.float64
        return router_gating_linear(input, self.weight, self.bias, router_dtype)

    def _document_ids_and_pools(
        self, docs: DocumentBatch | None, seq_length: int, bsz: int, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """This shard's ``(T,)`` document ids in router order ``[s, b]`` and ``(D,)`` pool sizes."""
        config = self.config
        if docs is None:
            if self.training:
                raise RuntimeError(
                    f"EMORouter (layer {self.layer_number}) found no documents in training: run "
                    "the model forward inside "
                    "megatron_emo.mcore.routing_context(DocumentBatch(...))"
                )
            # Evaluation without document ids: every sequence is one document.
            doc_ids_T = torch.arange(bsz, device=device).repeat(seq_length)
            return doc_ids_T, eval_pool_sizes(bsz, size=config.emo_pool_size_eval, device=device)

        doc_ids_BS = docs.doc_ids
        if doc_ids_BS.shape[0] != bsz:
            raise ValueError(f"doc_ids batch size {doc_ids_BS.shape[0]} != router batch size {bsz}")
        doc_ids_BS = self.layout.local_doc_ids(doc_ids_BS, seq_length)
        doc_ids_T = doc_ids_BS.to(device, non_blocking=True).t().reshape(-1)
        keys_D = docs.doc_keys.to(device, non_blocking=True)
        if self.training:
            pool_sizes_D = sample_pool_sizes(
                keys_D,
                seed=config.emo_pool_size_seed,
                iteration=docs.iteration,
                layer=self.layer_number or 0,
                min_size=config.emo_pool_size_min,
                max_size=config.emo_pool_size_max,
            )
        else:
            pool_sizes_D = eval_pool_sizes(
                docs.num_docs, size=config.emo_pool_size_eval, device=device
            )
        return doc_ids_T, pool_sizes_D

    def routing(self, logits: torch.Tensor, padding_mask: torch.Tensor | None = None):
        """EMO routing of ``[s, b, E]`` logits.

        Columns are ``[routed R | padding Pd | shared S]``. The padding columns are cut out
        before routing and come back as zero columns of ``probs`` and ``routing_map``, so the
        pure routing functions never see them and their logits get no gradient.

        Args:
            logits: ``[s, b, E]`` router logits (``s`` is this rank's sequence shard).
            padding_mask: optional ``[s, b]`` bool, True for padding (excluded from the losses).

        Returns:
            ``(probs, routing_map)``, both ``[s * b, E]``.
        """
        seq_length, bsz = logits.shape[:2]
        num_routed, num_padding = self.num_routed_experts, self.num_padding_experts
        logits_TE = logits.reshape(-1, self.config.num_moe_experts)
        valid_T = None if padding_mask is None else ~padding_mask.reshape(-1)
        routed_logits_TR = logits_TE[:, :num_routed]
        if num_padding:
            logits_TX = torch.cat([routed_logits_TR, logits_TE[:, num_routed + num_padding :]], 1)
        else:
            logits_TX = logits_TE  # X = R + S: the columns that take part in routing

        context = current_context()  # read once per call
        docs = None if context is None else context.documents
        tracker = None if context is None or self.layer_number is None else context.metrics
        collect_metrics = tracker is not None
        layout = self.layout
        fused = self._fused_routing(logits)
        if self.config.emo_routing == "emo":
            doc_ids_T, pool_sizes_D = self._document_ids_and_pools(
                docs, seq_length, bsz, logits.device
            )
            if fused is not None:
                # [s, b] token order: documents run along s (num_interleaved = b).
                in_pool_DR = fused.fused_document_pools(
                    routed_logits_TR,
                    doc_ids_T,
                    pool_sizes_D,
                    reduce_fn=layout.pool_reduce_fn,
                    num_interleaved=bsz,
                )
                in_pool_TR = in_pool_DR.index_select(0, doc_ids_T) if collect_metrics else None
            else:
                in_pool_TR = document_pool_mask(
                    routed_logits_TR, doc_ids_T, pool_sizes_D, reduce_fn=layout.pool_reduce_fn
                )
        else:
            in_pool_TR = torch.ones_like(routed_logits_TR, dtype=torch.bool)
            if collect_metrics:
                doc_ids_T, _ = self._document_ids_and_pools(docs, seq_length, bsz, logits.device)
                pool_sizes_D = torch.full(
                    (docs.num_docs,), self.num_routed_experts, device=logits.device
                )

        if fused is not None:
            with_pools = self.config.emo_routing == "emo"
            result = fused.fused_route_within_pools(
                logits_TX,
                doc_ids_T if with_pools else None,
                in_pool_DR if with_pools else None,
                topk=self.topk,
                num_shared_experts=self.num_shared_experts,
                renormalize=self.config.emo_renormalize_probs,
                scaling_factor=self.config.moe_router_topk_scaling_factor,
            )
        else:
            result = route_within_pools(
                logits_TX,
                in_pool_TR,
                topk=self.topk,
                num_shared_experts=self.num_shared_experts,
                renormalize=self.config.emo_renormalize_probs,
                score_function=self.score_function,
                expert_bias_R=self.expert_bias,
                scaling_factor=self.config.moe_router_topk_scaling_factor,
            )
        probs_TX, routing_map_TX = result.probs, result.routing_map
        with_losses = self.training and torch.is_grad_enabled()
        if with_losses and self.z_coeff > 0:
            # On the pool-masked routed logits both paths return; rides on probs like the
            # balancing loss.
            z = z_loss(result.masked_logits, valid_T=valid_T)
            z = z * layout.loss_share(self.z_coeff)
            probs_TX = self._attach_aux_loss(probs_TX, z, "z_loss", self.z_coeff, valid_T)
        if collect_metrics:
            metrics = routing_metrics(
                result.scores, result.routed_map, in_pool_TR, doc_ids_T, pool_sizes_D,
                reduce_fn=layout.pool_reduce_fn,
            )
            tracker.record(self.layer_number, metrics, layout)

        if self.config.moe_expert_capacity_factor is not None:
            # Capacity applies among the routed columns only: the shared experts take every
            # token (Megatron's drop over the whole map would cap them like a routed expert).
            dropped_probs_TR, dropped_map_TR = apply_router_token_dropping(
                probs_TX[:, :num_routed],
                routing_map_TX[:, :num_routed],
                router_topk=self.topk - self.num_shared_experts,
                capacity_factor=self.config.moe_expert_capacity_factor,
                drop_policy=self.config.moe_token_drop_policy,
                pad_to_capacity=self.config.moe_pad_expert_input_to_capacity,
            )
            probs_TX = torch.cat([dropped_probs_TR, probs_TX[:, num_routed:]], dim=1)
            routing_map_TX = torch.cat([dropped_map_TR, routing_map_TX[:, num_routed:]], dim=1)

        if with_losses and self.lb_coeff > 0:
            load_R1 = expert_load(result.routed_map, reduce_fn=layout.lb_reduce_fn, valid_T=valid_T)
            if self.config.emo_lb_accumulate_microbatches:
                load_R1 = self._accumulate_step_load(load_R1, docs)
            lb = load_balancing_loss(
                result.scores,
                result.routed_map,
                topk=self.topk - self.num_shared_experts,
                valid_T=valid_T,
                load_R1=load_R1,
            )
            # The rank's share (local mean scores, global counts): see RoutingLayout.loss_share.
            lb = lb * layout.loss_share(self.lb_coeff)
            probs_TX = self._attach_aux_loss(
                probs_TX, lb, "load_balancing_loss", self.lb_coeff, valid_T
            )

        padding_T = None if valid_T is None else ~valid_T
        self._apply_expert_bias(routing_map_TX[:, :num_routed], padding_mask=padding_T)
        if num_padding:
            probs_TX = self._insert_padding_columns(probs_TX)
            routing_map_TX = self._insert_padding_columns(routing_map_TX)
        return probs_TX, routing_map_TX

    def _insert_padding_columns(self, x_TX: torch.Tensor) -> torch.Tensor:
        """``[routed | shared]`` columns -> ``[routed | padding (zeros / False) | shared]``."""
        num_routed = self.num_routed_experts
        zeros_TP = x_TX.new_zeros((x_TX.shape[0], self.num_padding_experts))
        return torch.cat([x_TX[:, :num_routed], zeros_TP, x_TX[:, num_routed:]], dim=1)

    def _apply_expert_bias(
        self, routing_map: torch.Tensor, padding_mask: torch.Tensor | None = None
    ) -> None:
        """Adds the routed assignments ``(T, R)`` of non-padding tokens to the bias counts.

        Replaces Megatron's version (router.py:728), whose ``(T, E) & (T,)`` padding mask does
        not broadcast; like it, counts nothing in evaluation or recomputation without grad.
        """
        if self.enable_expert_bias and torch.is_grad_enabled():
            with torch.no_grad():
                if padding_mask is not None:
                    routing_map = routing_map & ~padding_mask[:, None]
                self.local_tokens_per_expert += routing_map.sum(dim=0)

    def _fused_routing(self, logits: torch.Tensor):
        """``megatron_emo.routing.fused`` if this call takes the fused path, else None.

        ``emo_router_fusion``: 'off' never, 'on' always (the config checked softmax scoring,
        which excludes an expert bias, and that triton imports), 'auto' on CUDA with softmax.
        """
        mode = self.config.emo_router_fusion
        if mode == "off":
            return None
        if mode == "auto" and not (logits.is_cuda and self.score_function == "softmax"):
            return None
        fused = _import_fused_routing()
        if fused is None or not fused.fused_routing_available(logits.device):
            if mode == "on":
                raise RuntimeError(
                    f"emo_router_fusion='on' but the fused kernels cannot run on {logits.device} "
                    "(they need CUDA, or TRITON_INTERPRET=1 set before triton is imported)"
                )
            return None
        return fused

    def _accumulate_step_load(
        self, load_R1: torch.Tensor, docs: DocumentBatch | None
    ) -> torch.Tensor:
        """Adds a micro-batch's expert load to the step's running load and returns the total."""
        if docs is None:
            raise RuntimeError(
                "emo_lb_accumulate_microbatches needs the iteration from routing_context to know "
                "when a step starts; run the forward inside routing_context(DocumentBatch(...))"
            )
        iteration = docs.iteration
        if iteration != self._step_load_iteration or self._step_load_R1 is None:
            self._step_load_R1 = torch.zeros_like(load_R1)  # first micro-batch of a new step
            self._step_load_iteration = iteration
        self._step_load_R1 = self._step_load_R1 + load_R1
        return self._step_load_R1

    def _attach_aux_loss(
        self,
        activation: torch.Tensor,
        loss: torch.Tensor,
        name: str,
        coeff: float,
        valid_T: torch.Tensor | None,
    ) -> torch.Tensor:
        """Attaches ``loss`` to ``activation``'s gradient (Megatron's autoscaler); logs it.

        The schedule sets the autoscaler's scale to ``cp_size / num_microbatches`` (or the
        per-token-loss scale), exactly as for Megatron's own aux losses.
        """
        layer_number = self.layer_number
        if layer_number is not None:
            get_moe_metrics_tracker().record(
                name,
                loss.detach() / coeff,
                layer_number,
                self.config.num_layers,
                reduce_group=self.layout.loss_group,
                needs_dp_avg=True,
            )
        if self.calculate_per_token_loss:
            num_local = valid_T.sum() if valid_T is not None else activation.shape[0]
            loss = loss * num_local * self.layout.num_loss_ranks
        return MoEAuxLossAutoScaler.apply(activation, loss)
