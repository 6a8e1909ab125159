"""The bootstrap of Megatron's model-parallel state on an initialised process group.

STYLE rule 14: ``initialize_model_parallel`` here is megatron_emo's one function that sets up
``parallel_state`` (``destroy_model_parallel`` is its undo); everything else takes process
groups (``pg_collection``). Conversion, subsets and GPU runs need only this; CPU runs add the
CPU backend on top (``megatron_emo.cpu.initialize_model_parallel_cpu``).

Megatron symbols: ``parallel_state.{initialize_model_parallel, destroy_model_parallel,
_GLOBAL_MEMORY_BUFFER, get_tensor_model_parallel_rank, get_expert_model_parallel_rank,
get_expert_tensor_parallel_rank}``, ``utils.GlobalMemoryBuffer``.
"""

from __future__ import annotations

import dataclasses

from megatron.core import parallel_state
from megatron.core.utils import GlobalMemoryBuffer

__all__ = [
    "ModelParallelRanks",
    "destroy_model_parallel",
    "initialize_model_parallel",
    "model_parallel_is_initialized",
]


@dataclasses.dataclass(frozen=True)
class ModelParallelRanks:
    """This process's ranks in the groups that offset the model's RNG seeds."""

    tensor_model_parallel_rank: int
    expert_model_parallel_rank: int
    expert_tensor_parallel_rank: int


def initialize_model_parallel(
    *,
    tensor_model_parallel_size: int = 1,
    pipeline_model_parallel_size: int = 1,
    expert_model_parallel_size: int = 1,
    context_parallel_size: int = 1,
    virtual_pipeline_model_parallel_size: int | None = None,
    expert_tensor_parallel_size: int | None = None,
    global_memory_buffer: GlobalMemoryBuffer | None = None,
) -> ModelParallelRanks:
    """(Re)initialises Megatron's model-parallel state on the default process group.

    The default ``torch.distributed`` group must be initialised (gloo or nccl).

    Args:
        tensor_model_parallel_size: TP size.
        pipeline_model_parallel_size: PP size.
        expert_model_parallel_size: EP size.
        context_parallel_size: CP size.
        virtual_pipeline_model_parallel_size: virtual pipeline chunks per stage (None: none).
        expert_tensor_parallel_size: expert TP size (None: the TP size, as in Megatron).
        global_memory_buffer: replaces Megatron's scratch buffer (None: Megatron's own).

    Returns:
        This process's TP, EP and expert-TP ranks.
    """
    parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tensor_model_parallel_size,
        pipeline_model_parallel_size=pipeline_model_parallel_size,
        expert_model_parallel_size=expert_model_parallel_size,
        context_parallel_size=context_parallel_size,
        virtual_pipeline_model_parallel_size=virtual_pipeline_model_parallel_size,
        expert_tensor_parallel_size=expert_tensor_parallel_size,
    )
    if global_memory_buffer is not None:
        parallel_state._GLOBAL_MEMORY_BUFFER = global_memory_buffer
    return ModelParallelRanks(
        tensor_model_parallel_rank=parallel_state.get_tensor_model_parallel_rank(),
        expert_model_parallel_rank=parallel_state.get_expert_model_parallel_rank(),
        expert_tensor_parallel_rank=parallel_state.get_expert_tensor_parallel_rank(),
    )


def model_parallel_is_initialized() -> bool:
    """Whether Megatron's model-parallel state is set up."""
    return parallel_state.model_parallel_is_initialized()


def destroy_model_parallel() -> None:
    """Tears Megatron's model-parallel state down (the process group stays)."""
    parallel_state.destroy_model_parallel()
