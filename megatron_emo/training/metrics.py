"""EMO routing diagnostics: collected by the routers on logging steps, written to TensorBoard.

On a step that ends at a multiple of ``--log-interval`` the forward step enters its micro-batches'
``routing_context`` with its ``RoutingMetricsTracker``; every ``EMORouter`` (of every model
chunk of the rank: all virtual pipeline chunks) then records
``megatron_emo.routing.routing_metrics`` into it (device tensors, no host sync).
``report_routing_metrics`` (called by the next step's first forward, and once after training)
has the tracker average them over the TP x DP x CP ranks of the pipeline stage and writes
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

from megatron.core import parallel_state

from megatron_emo.mcore.routing_context import RoutingMetricsTracker
from megatron_emo.routing import ROUTING_METRIC_NAMES

__all__ = ["report_routing_metrics"]


def report_routing_metrics(
    tracker: RoutingMetricsTracker,
    *,
    iteration: int,
    num_layers: int,
    writer=None,
) -> dict[str, float] | None:
    """Reports (and clears) what the routers recorded into ``tracker``, and writes it.

    A collective over this stage's TP x DP x CP group when anything was recorded (every rank
    of the stage must call it at the same point); nothing crosses pipeline stages.

    Args:
        tracker: the tracker the routers recorded into on the logging step.
        iteration: the iteration the diagnostics belong to (TensorBoard step).
        num_layers: transformer layers of the whole model (``--num-layers``).
        writer: TensorBoard ``SummaryWriter`` of this rank, or None (then nothing is written).

    Returns:
        ``{metric: mean over this stage's MoE layers}``, or None when no layer recorded
        anything.
    """
    reported = tracker.report(num_layers)
    if reported is None:
        return None
    means = reported.means()
    if writer is not None:
        layers = reported.layers
        pp_size = parallel_state.get_pipeline_model_parallel_world_size()
        suffix = (
            f"/pp_stage_{parallel_state.get_pipeline_model_parallel_rank()}" if pp_size > 1 else ""
        )
        for i, name in enumerate(ROUTING_METRIC_NAMES):
            writer.add_scalar(f"emo/{name}{suffix}", means[name], iteration)
            for layer in layers:
                value = float(reported.values_ML[i, layer])
                writer.add_scalar(f"emo/{name}/layer_{layer + 1}", value, iteration)
        for layer in layers:
            load_R = reported.load_LR[layer].float().cpu()
            writer.add_histogram(
                f"emo/expert_load/layer_{layer + 1}",
                load_R / load_R.mean().clamp_min(1e-20),
                iteration,
            )
    return means
