"""EMO routing diagnostics: collected by the routers on logging steps, written to TensorBoard.

On a step that ends at a multiple of ``--log-interval`` the forward step marks its micro-batches
``collect_metrics``; every ``EMORouter`` then adds ``megatron_emo.routing.routing_metrics`` to
its running sums (device tensors, no host sync). ``report_routing_metrics`` (called by the next
step's first forward, and once after training, with every model chunk of the rank: all virtual
pipeline chunks) averages them over the TP x DP x CP ranks of the pipeline stage and writes
``emo/<metric>/layer_<n>``, an ``emo/expert_load/layer_<n>`` histogram and the mean over the
stage's MoE layers (``emo/<metric>``, or ``emo/<metric>/pp_stage_<k>`` under pipeline
parallelism). No collective crosses pipeline stages: inside a forward step that would deadlock
against the schedule's point-to-point receives. Stages other than the last write their own
event file next to Megatron's. Load-balancing and z-loss are logged by Megatron's MoE tracker
(``load_balancing_loss``, ``z_loss``; per layer with ``--moe-per-layer-logging``).

Megatron symbols: ``core.parallel_state.{get_pipeline_model_parallel_rank,
get_pipeline_model_parallel_world_size}``.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megatron_emo.mcore.router import EMORouter
from megatron_emo.routing import ROUTING_METRIC_NAMES

__all__ = ["report_routing_metrics", "routers_of"]


def routers_of(model_chunks: Iterable[torch.nn.Module]) -> list[EMORouter]:
    """All ``EMORouter`` modules of the model chunks on this rank."""
    return [m for chunk in model_chunks for m in chunk.modules() if isinstance(m, EMORouter)]


def report_routing_metrics(
    model_chunks: Iterable[torch.nn.Module],
    *,
    iteration: int,
    num_layers: int,
    writer=None,
) -> dict[str, float] | None:
    """Reduces the routers' collected diagnostics, logs them and resets the routers.

    A collective over this stage's TP x DP x CP group (every rank of it must call it at the
    same point); nothing crosses pipeline stages.

    Args:
        model_chunks: this rank's model chunks.
        iteration: the iteration the diagnostics belong to (TensorBoard step).
        num_layers: transformer layers of the whole model (``--num-layers``).
        writer: TensorBoard ``SummaryWriter`` of this rank, or None (then nothing is written).

    Returns:
        ``{metric: mean over this stage's MoE layers}``, or None when no layer collected
        anything.
    """
    routers = routers_of(model_chunks)
    if not routers:
        return None
    device = routers[0].weight.device
    num_experts = routers[0].num_routed_experts
    names = ROUTING_METRIC_NAMES
    values_ML = torch.zeros(len(names) + 1, num_layers, device=device)  # last row: layer present
    load_LR = torch.zeros(num_layers, num_experts, device=device)
    for router in routers:
        if router.routing_metric_count == 0 or router.layer_number is None:
            continue
        layer = router.layer_number - 1
        count = router.routing_metric_count
        for i, name in enumerate(names):
            values_ML[i, layer] = router.routing_metric_sums[name] / count
        values_ML[-1, layer] = 1.0
        load_LR[layer] = router.routing_metric_sums["expert_load"]
        router.routing_metric_sums = {}
        router.routing_metric_count = 0

    # Every TP x DP x CP rank of the stage routed its own tokens: average the diagnostics, sum
    # the loads (no gradient involved).
    dp_group = routers[0].tp_dp_cp_group
    if dist.is_initialized() and dist.get_world_size(dp_group) > 1:
        size = dist.get_world_size(dp_group)
        dist.all_reduce(values_ML, group=dp_group)
        dist.all_reduce(load_LR, group=dp_group)
        values_ML /= size

    present_L = values_ML[-1] > 0
    if not bool(present_L.any()):
        return None
    layers = present_L.nonzero().flatten().tolist()
    means = {name: float(values_ML[i, present_L].mean()) for i, name in enumerate(names)}
    if writer is not None:
        pp_size = parallel_state.get_pipeline_model_parallel_world_size()
        suffix = f"/pp_stage_{parallel_state.get_pipeline_model_parallel_rank()}" if pp_size > 1 else ""
        for i, name in enumerate(names):
            writer.add_scalar(f"emo/{name}{suffix}", means[name], iteration)
            for layer in layers:
                writer.add_scalar(f"emo/{name}/layer_{layer + 1}", float(values_ML[i, layer]), iteration)
        for layer in layers:
            load_R = load_LR[layer].float().cpu()
            writer.add_histogram(
                f"emo/expert_load/layer_{layer + 1}", load_R / load_R.mean().clamp_min(1e-20), iteration
            )
    return means
