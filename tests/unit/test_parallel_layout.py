"""``RoutingLayout``/``BatchLayout`` decisions and the routing-metrics tracker, on one process.

Process groups are stand-ins with ``size()``/``rank()``: the layouts only ask groups those two
questions at construction (the collectives themselves are tested over gloo in
``tests/distributed``).
Run: ``OMP_NUM_THREADS=1 .venv/bin/python -m pytest tests/unit/test_parallel_layout.py -q``
"""

from __future__ import annotations

import pytest
import torch

from megatron_emo.parallel import BatchLayout, RoutingLayout
from megatron_emo.routing import ROUTING_METRIC_NAMES


class _Group:
    def __init__(self, name: str, size: int, rank: int = 0) -> None:
        self.name, self._size, self._rank = name, size, rank

    def size(self) -> int:
        return self._size

    def rank(self) -> int:
        return self._rank


def _layout(*, sequence_parallel: bool, tp: int = 2, cp: int = 2, dp: int = 2, tp_rank: int = 1):
    return RoutingLayout.from_process_groups(
        tp_group=_Group("tp", tp, tp_rank),
        cp_group=_Group("cp", cp),
        tp_cp_group=_Group("tp_cp", tp * cp),
        tp_dp_cp_group=_Group("tp_dp_cp", tp * dp * cp),
        sequence_parallel=sequence_parallel,
    )


@pytest.mark.parametrize(
    ("sequence_parallel", "pool_group"), [(True, "tp_cp"), (False, "cp")], ids=["sp", "no-sp"]
)
def test_routing_layout_groups(sequence_parallel: bool, pool_group: str) -> None:
    layout = _layout(sequence_parallel=sequence_parallel)
    assert layout.pool_group.name == pool_group
    assert layout.lb_group.name == "tp_dp_cp" and layout.metrics_group.name == "tp_dp_cp"
    assert layout.pool_reduce_fn is not None and layout.lb_reduce_fn is not None
    assert layout.num_loss_ranks == 4 and layout.loss_share(0.1) == 0.1 / 4


def test_one_rank_layout_has_no_collectives() -> None:
    layout = _layout(sequence_parallel=True, tp=1, cp=1, dp=1, tp_rank=0)
    assert layout.pool_reduce_fn is None and layout.lb_reduce_fn is None
    assert layout.loss_share(0.25) == 0.25


def test_local_doc_ids_slices_the_sequence_parallel_shard() -> None:
    doc_ids_BS = torch.arange(16).reshape(2, 8)
    layout = _layout(sequence_parallel=True)  # TP rank 1 of 2
    assert torch.equal(layout.local_doc_ids(doc_ids_BS, 4), doc_ids_BS[:, 4:])
    assert layout.local_doc_ids(doc_ids_BS, 8) is doc_ids_BS
    with pytest.raises(ValueError, match=r"cover 8 positions but the router sees 3"):
        layout.local_doc_ids(doc_ids_BS, 3)
    with pytest.raises(ValueError, match=r"sequence_parallel=False"):
        _layout(sequence_parallel=False).local_doc_ids(doc_ids_BS, 4)


def test_batch_layout_reads_on_tp_rank_zero_and_shards_only_under_cp() -> None:
    batch = {"tokens": torch.arange(4)}
    layout = BatchLayout(tp_group=None, tp_src_rank=0, tp_rank=0)
    assert layout.read(iter([batch])) is batch
    assert layout.shard(batch) is batch
    halves = BatchLayout(None, 0, 0, cp_size=2, cp_shard_fn=lambda b: {"tokens": b["tokens"][:2]})
    assert halves.shard(batch)["tokens"].tolist() == [0, 1]
    with pytest.raises(ValueError, match=r"context parallel size 2 needs a cp_shard_fn"):
        BatchLayout(None, 0, 0, cp_size=2).shard(batch)


def test_metrics_tracker_averages_micro_batches_per_layer_and_clears() -> None:
    from megatron_emo.mcore.routing_context import RoutingMetricsTracker

    layout = _layout(sequence_parallel=False, tp=1, cp=1, dp=1, tp_rank=0)
    tracker = RoutingMetricsTracker()
    assert tracker.report(num_layers=4) is None

    def metrics(value: float) -> dict[str, torch.Tensor]:
        out = {name: torch.tensor(value) for name in ROUTING_METRIC_NAMES}
        out["expert_load"] = torch.full((3,), value)
        return out

    tracker.record(1, metrics(1.0), layout)
    tracker.record(1, metrics(3.0), layout)
    tracker.record(3, metrics(5.0), layout)
    assert tracker.count(1) == 2 and tracker.count(2) == 0
    reported = tracker.report(num_layers=4)
    assert reported.layers == [0, 2]
    assert reported.values_ML[:, 0].tolist() == [2.0] * len(ROUTING_METRIC_NAMES)
    assert reported.values_ML[:, 1].tolist() == [0.0] * len(ROUTING_METRIC_NAMES)
    assert reported.load_LR[0].tolist() == [4.0] * 3  # loads are sums, not means
    assert reported.means() == {name: 3.5 for name in ROUTING_METRIC_NAMES}
    assert tracker.count(1) == 0 and tracker.report(num_layers=4) is None
