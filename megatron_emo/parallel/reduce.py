"""``reduce_fn`` factories: the collectives injected into ``megatron_emo.routing``.

The routing math only ever reduces statistics that carry no gradient (per-document probability
sums for pool selection, expert counts for load balancing), so these reductions are plain
all-reduces on detached tensors and define no backward.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist

__all__ = ["all_reduce_fn"]


def all_reduce_fn(group: dist.ProcessGroup | None) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """A ``reduce_fn`` that sums a tensor over ``group``; None when the group has one rank.

    Args:
        group: the ranks whose partial sums make up the whole statistic, e.g. the TP (under
            sequence parallelism) and CP ranks for per-document sums, or the TP x DP x CP ranks
            for load-balancing counts.

    Returns:
        ``fn(x) -> sum over group of x`` (a new tensor; ``x`` is not modified), or None.
    """
    if group is None or group.size() == 1:
        return None

    def _all_reduce(x: torch.Tensor) -> torch.Tensor:
        # SUM over `group`; the input is detached statistics, so there is no backward.
        out = x.detach().clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
        return out

    return _all_reduce
