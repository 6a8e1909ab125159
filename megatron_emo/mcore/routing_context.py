"""The one channel to the EMO routers: ``routing_context`` (documents and a metrics sink).

The forward step wraps each micro-batch's ``model(...)`` call::

    with routing_context(DocumentBatch(doc_ids_BS, doc_keys_D, iteration), metrics=tracker):
        output = model(tokens, position_ids, attention_mask, labels=labels)

and every ``EMORouter`` of every pipeline stage reads ``current_context()`` once per call: the
micro-batch's documents, and on logging steps the ``RoutingMetricsTracker`` that collects its
routing diagnostics (None otherwise, so the hot path stays lean). The context variable is the
only sanctioned global of the package (STYLE.md rule 15); the tracker is an object its owner
(the training step, or a test) holds and reports from.

Why a context and not ``padding_mask``: the router also needs per-micro-batch host-side facts
(the number of documents D, which sizes the ``(D, R)`` pool table without a device sync, their
global keys, and the iteration, which seed the pool sizes). ``padding_mask`` carries one
``[b, s]`` tensor and Megatron casts it to bool inside ``MoELayer.forward``; packing the rest into
it would need a host sync per layer. The cost of a context is that a recompute in the backward
pass runs outside it, so ``EMOTransformerConfig`` refuses full and ``moe`` recompute, and the
router raises in training when no documents are set (also on paths that call ``route``
directly). Under sequence parallelism the router slices its sequence shard out of ``doc_ids``
(``RoutingLayout.local_doc_ids``); under context parallelism the forward step shards
``doc_ids`` like the tokens (``BatchLayout.shard``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from megatron_emo.parallel.layout import RoutingLayout
from megatron_emo.routing import ROUTING_METRIC_NAMES
from megatron_emo.routing.documents import DocumentBatch

__all__ = [
    "ReportedRoutingMetrics",
    "RoutingContext",
    "RoutingMetricsTracker",
    "current_context",
    "routing_context",
]


class RoutingMetricsTracker:
    """Routing diagnostics of this rank's routers, recorded per layer: record, report, clear.

    Like Megatron's ``MoEMetricsTracker`` (``moe_logging.py``): the routers record device
    tensors (no host sync) through ``routing_context(..., metrics=tracker)``; the owner reports
    once per logging step, which reduces over the routers' ``RoutingLayout.metrics_group`` and
    clears. Every model chunk of the rank (virtual pipeline stages included) records into the
    same tracker, keyed by layer number.
    """

    def __init__(self) -> None:
        self._sums: dict[int, dict[str, torch.Tensor]] = {}
        self._counts: dict[int, int] = {}
        self._layout: RoutingLayout | None = None

    def record(
        self, layer_number: int, metrics: dict[str, torch.Tensor], layout: RoutingLayout
    ) -> None:
        """Adds one layer's diagnostics of one micro-batch to the running sums.

        Args:
            layer_number: the router's 1-based global layer number.
            metrics: ``megatron_emo.routing.routing_metrics`` of the micro-batch.
            layout: the router's layout (names the group the report reduces over).
        """
        sums = self._sums.setdefault(layer_number, {})
        for name, value in metrics.items():
            value = value.detach()
            prev = sums.get(name)
            sums[name] = value if prev is None else prev + value
        self._counts[layer_number] = self._counts.get(layer_number, 0) + 1
        self._layout = layout

    def sums(self, layer_number: int) -> dict[str, torch.Tensor]:
        """The recorded sums of one layer (``{}`` when it recorded nothing); read-only view."""
        return dict(self._sums.get(layer_number, {}))

    def count(self, layer_number: int) -> int:
        """How many micro-batches a layer recorded since the last report."""
        return self._counts.get(layer_number, 0)

    def clear(self) -> None:
        """Forgets everything recorded."""
        self._sums.clear()
        self._counts.clear()

    def report(self, num_layers: int) -> ReportedRoutingMetrics | None:
        """Averages the recorded diagnostics over the micro-batches and the metrics group.

        A collective over the routers' TP x DP x CP group when anything was recorded (every
        rank of a pipeline stage records the same layers at the same steps); nothing crosses
        pipeline stages. Clears the tracker.

        Args:
            num_layers: transformer layers of the whole model (``--num-layers``).

        Returns:
            The stage's reduced diagnostics, or None when no layer recorded anything.
        """
        if not self._counts or self._layout is None:
            return None
        first = next(iter(self._sums.values()))
        device = first["expert_load"].device
        num_experts = first["expert_load"].shape[0]
        names = ROUTING_METRIC_NAMES
        values_ML = torch.zeros(len(names) + 1, num_layers, device=device)  # last row: present
        load_LR = torch.zeros(num_layers, num_experts, device=device)
        for layer_number, count in self._counts.items():
            layer = layer_number - 1
            sums = self._sums[layer_number]
            for i, name in enumerate(names):
                values_ML[i, layer] = sums[name] / count
            values_ML[-1, layer] = 1.0
            load_LR[layer] = sums["expert_load"]
        layout = self._layout
        self.clear()
        # Every TP x DP x CP rank of the stage routed its own tokens: average the diagnostics,
        # sum the loads.
        size = layout.sum_metrics(values_ML, load_LR)
        if size > 1:
            values_ML /= size
        present_L = values_ML[-1] > 0
        if not bool(present_L.any()):
            return None
        return ReportedRoutingMetrics(values_ML[:-1], load_LR, present_L)


@dataclass(frozen=True)
class ReportedRoutingMetrics:
    """One report of ``RoutingMetricsTracker``: per-layer means over the stage's ranks.

    Attributes:
        values_ML: ``(M, L)`` metric ``m`` (``ROUTING_METRIC_NAMES`` order) of layer ``l``.
        load_LR: ``(L, R)`` expert load of every layer, summed over the ranks.
        present_L: ``(L,)`` bool, the layers of this stage that recorded diagnostics.
    """

    values_ML: torch.Tensor
    load_LR: torch.Tensor
    present_L: torch.Tensor

    @property
    def layers(self) -> list[int]:
        """0-based indices of the present layers."""
        return self.present_L.nonzero().flatten().tolist()

    def means(self) -> dict[str, float]:
        """``{metric: mean over the present layers}``."""
        present_L = self.present_L
        return {
            name: float(self.values_ML[i, present_L].mean())
            for i, name in enumerate(ROUTING_METRIC_NAMES)
        }


@dataclass(frozen=True)
class RoutingContext:
    """What the routers of one micro-batch's forward read.

    Attributes:
        documents: the micro-batch's documents.
        metrics: where the routers record routing diagnostics, or None (not a logging step).
    """

    documents: DocumentBatch
    metrics: RoutingMetricsTracker | None = None


_CURRENT: RoutingContext | None = None


@contextlib.contextmanager
def routing_context(
    documents: DocumentBatch, *, metrics: RoutingMetricsTracker | None = None
) -> Iterator[RoutingContext]:
    """Makes ``documents`` (and a metrics sink) visible to the EMO routers for the block.

    Args:
        documents: the micro-batch's documents.
        metrics: a tracker the routers record their diagnostics into, or None.

    Yields:
        The active ``RoutingContext``.

    Raises:
        RuntimeError: if a context is already active (micro-batches never nest).
    """
    global _CURRENT
    if _CURRENT is not None:
        raise RuntimeError("routing_context is already active: micro-batch forwards do not nest")
    _CURRENT = RoutingContext(documents, metrics)
    try:
        yield _CURRENT
    finally:
        _CURRENT = None


def current_context() -> RoutingContext | None:
    """The active micro-batch's ``RoutingContext``, or None outside ``routing_context``."""
    return _CURRENT
