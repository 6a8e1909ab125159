"""Every parallel decision of EMO routing, in one place: which ranks share what.

``RoutingLayout`` is built once per router from Megatron's process groups (``pg_collection``):
which group completes a document's partial sums (pools), which group completes the
load-balancing counts, which slice of the sequence this rank routes (sequence parallelism),
the share of an auxiliary loss this rank's router gradient carries, and the group the routing
diagnostics are averaged over. ``BatchLayout`` is the same for the micro-batch: which TP rank
reads it and how context parallelism shards it. Adding a parallel dimension touches this file.

Groups are duck-typed ``torch.distributed.ProcessGroup`` objects (``.size()``, ``.rank()``);
nothing here imports megatron.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from megatron_emo.parallel.reduce import all_reduce_fn

__all__ = ["BatchLayout", "ReduceFn", "RoutingLayout"]

ReduceFn = Callable[[torch.Tensor], torch.Tensor]


def _size(group: dist.ProcessGroup | None) -> int:
    return 1 if group is None else group.size()


@dataclass(frozen=True)
class RoutingLayout:
    """Which ranks share a router's statistics, and this rank's place among them.

    Attributes:
        pool_group: the ranks that hold shards of the same sequences, whose per-document
            partial sums make up a document's statistics: TP x CP under sequence parallelism,
            CP otherwise.
        lb_group: every rank that routes tokens of the step (TP x DP x CP): load-balancing
            counts are summed over it, so balance is global.
        pool_reduce_fn: the sum over ``pool_group`` injected into the routing math; None on
            one rank.
        lb_reduce_fn: the sum over ``lb_group``; None on one rank.
        loss_group: the TP x CP group whose router-weight gradients are summed (SP) or averaged
            with DP (CP); Megatron's aux-loss tracker reduces over it.
        metrics_group: the TP x DP x CP group the routing diagnostics are averaged over.
        tp_rank: this rank's tensor-parallel rank.
        tp_size: the tensor-parallel size.
        sequence_parallel: whether the router sees a ``1 / tp_size`` slice of the sequence.
    """

    pool_group: dist.ProcessGroup | None
    lb_group: dist.ProcessGroup | None
    pool_reduce_fn: ReduceFn | None
    lb_reduce_fn: ReduceFn | None
    loss_group: dist.ProcessGroup | None
    metrics_group: dist.ProcessGroup | None
    tp_rank: int = 0
    tp_size: int = 1
    sequence_parallel: bool = False

    @classmethod
    def from_process_groups(
        cls,
        *,
        tp_group: dist.ProcessGroup | None,
        cp_group: dist.ProcessGroup | None,
        tp_cp_group: dist.ProcessGroup | None,
        tp_dp_cp_group: dist.ProcessGroup | None,
        sequence_parallel: bool,
    ) -> RoutingLayout:
        """The layout of a router whose Megatron process groups are given.

        Args:
            tp_group: tensor-parallel group (``pg_collection.tp``).
            cp_group: context-parallel group (``pg_collection.cp``).
            tp_cp_group: TP x CP group (``pg_collection.tp_cp``).
            tp_dp_cp_group: TP x DP x CP group (``pg_collection.tp_dp_cp``).
            sequence_parallel: Megatron's ``sequence_parallel`` flag.

        Returns:
            The router's ``RoutingLayout``.
        """
        # Document partial sums live on the ranks that hold shards of the same sequences.
        pool_group = tp_cp_group if sequence_parallel else cp_group
        return cls(
            pool_group=pool_group,
            lb_group=tp_dp_cp_group,
            pool_reduce_fn=all_reduce_fn(pool_group),
            lb_reduce_fn=all_reduce_fn(tp_dp_cp_group),
            loss_group=tp_cp_group,
            metrics_group=tp_dp_cp_group,
            tp_rank=0 if tp_group is None else tp_group.rank(),
            tp_size=_size(tp_group),
            sequence_parallel=sequence_parallel,
        )

    @property
    def num_loss_ranks(self) -> int:
        """TP x CP: the ranks over which one auxiliary loss's router gradient is split."""
        return _size(self.loss_group)

    def loss_share(self, coeff: float) -> float:
        """This rank's share of a loss coefficient: ``coeff / (TP x CP)``.

        With local mean scores and global counts, dividing by the TP x CP ranks whose
        router-weight gradients are summed (SP) or averaged with DP (CP) makes DP gradient
        averaging yield the gradient of the global loss (see ``routing/losses``).
        """
        return coeff / self.num_loss_ranks

    def local_doc_ids(self, doc_ids_BS: torch.Tensor, seq_length: int) -> torch.Tensor:
        """The ``(B, s)`` document ids of the positions this rank's router sees.

        Args:
            doc_ids_BS: ``(B, S)`` ids of the whole (CP-local) sequence.
            seq_length: ``s``, the router's sequence length.

        Returns:
            ``doc_ids_BS`` itself, or under sequence parallelism this TP rank's even slice
            of it.

        Raises:
            ValueError: if the ids cover neither ``s`` nor ``s x tp_size`` positions under SP.
        """
        full_seq = doc_ids_BS.shape[1]
        if full_seq == seq_length:
            return doc_ids_BS
        if not (self.sequence_parallel and full_seq == seq_length * self.tp_size):
            raise ValueError(
                f"doc_ids cover {full_seq} positions but the router sees {seq_length} (tensor "
                f"parallel size {self.tp_size}, sequence_parallel={self.sequence_parallel})"
            )
        # Sequence parallelism scatters the sequence dimension evenly over the TP ranks.
        start = self.tp_rank * seq_length
        return doc_ids_BS[:, start : start + seq_length]

    def sum_metrics(self, *tensors: torch.Tensor) -> int:
        """Sums diagnostics in place over ``metrics_group``; returns the group's size.

        A collective: every rank of the group calls it at the same point. The tensors are
        detached statistics, so there is no backward.
        """
        group = self.metrics_group
        if group is None or not dist.is_initialized() or dist.get_world_size(group) == 1:
            return 1
        for tensor in tensors:
            # SUM over TP x DP x CP; no gradient involved.
            dist.all_reduce(tensor, group=group)
        return dist.get_world_size(group)


@dataclass(frozen=True)
class BatchLayout:
    """How one micro-batch reaches the model on this rank.

    The tensor-parallel ranks share one micro-batch: TP rank 0 reads it from the data iterator
    and broadcasts it; context-parallel ranks then keep their shard of every sequence tensor
    (document ids included, so routing and attention see the same tokens).

    Attributes:
        tp_group: tensor-parallel group, or None for one rank.
        tp_src_rank: the global rank of TP rank 0 of this rank's group.
        tp_rank: this rank's TP rank.
        cp_size: context-parallel size.
        cp_shard_fn: ``fn(batch) -> batch`` keeping this CP rank's shard of every sequence
            tensor of a dict (Megatron's ``get_batch_on_this_cp_rank``, injected by the
            training step); None when ``cp_size`` is 1.
    """

    tp_group: dist.ProcessGroup | None
    tp_src_rank: int
    tp_rank: int
    cp_size: int = 1
    cp_shard_fn: Callable[[dict[str, Any]], dict[str, Any]] | None = None

    def read(self, data_iterator: Iterator[dict[str, Any]]) -> dict[str, Any]:
        """The micro-batch on every TP rank: TP rank 0 reads it, the others receive it."""
        batch = next(data_iterator) if self.tp_rank == 0 else None
        if _size(self.tp_group) > 1:
            box = [batch]
            # Host objects over the TP group (pickled); no gradient is involved.
            dist.broadcast_object_list(box, src=self.tp_src_rank, group=self.tp_group)
            batch = box[0]
        return batch

    def shard(self, tensors: dict[str, Any]) -> dict[str, Any]:
        """This CP rank's shard of the micro-batch's sequence tensors (all of them at CP 1)."""
        if self.cp_size == 1:
            return tensors
        if self.cp_shard_fn is None:
            raise ValueError(f"context parallel size {self.cp_size} needs a cp_shard_fn")
        return self.cp_shard_fn(tensors)
