"""Distributed glue for the routing math: ``reduce_fn`` factories over process groups."""

from megatron_emo.parallel.reduce import all_reduce_fn

__all__ = ["all_reduce_fn"]
