"""Distributed glue for the routing math: layouts over process groups, and ``reduce_fn``s.

``RoutingLayout``/``BatchLayout`` hold every parallel decision of a router and of a micro-batch;
``all_reduce_fn`` is the collective they inject into ``megatron_emo.routing``.
"""

from megatron_emo.parallel.layout import BatchLayout, ReduceFn, RoutingLayout
from megatron_emo.parallel.reduce import all_reduce_fn

__all__ = ["BatchLayout", "ReduceFn", "RoutingLayout", "all_reduce_fn"]
