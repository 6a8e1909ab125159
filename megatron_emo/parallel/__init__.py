"""Distributed glue for the routing math: the routers' and batches' layouts over process groups,
and the ``reduce_fn`` collectives they inject into ``megatron_emo.routing``."""

from megatron_emo.parallel.layout import BatchLayout, ReduceFn, RoutingLayout
from megatron_emo.parallel.reduce import all_reduce_fn

__all__ = ["BatchLayout", "ReduceFn", "RoutingLayout", "all_reduce_fn"]
