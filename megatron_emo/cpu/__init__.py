"""CPU backend: runs real Megatron-Core MoE GPT models on a machine without CUDA (tests, ``--cpu``).

The project's single CPU room (STYLE.md), never imported on GPU runs. Plugin-side subclasses
first (``modules.py``: F1-F3, F5, F6 of ``../shared/docs/cpu_megatron.md``, injected into
``megatron_emo.mcore.model.build_emo_gpt_model`` as ``CPU_MODEL_ADAPTER``); process-level
patches only where megatron leaves no seam (``patches.py``: one table, each row naming the
megatron-core 0.19.2 site it covers). ``enable()`` applies them, ``disable()`` undoes them
(every original attribute restored, the torch function mode exited); ``enabled()`` does both
around a block.

Megatron symbols: ``tensor_parallel.random.{_CUDA_RNG_STATE_TRACKER,
_*_RNG_TRACKER_NAME}`` (model-parallel state comes from ``megatron_emo.mcore.process_groups``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np
import torch
from megatron.core.tensor_parallel import random as mcore_random

from megatron_emo.cpu.modules import (
    CPU_MODEL_ADAPTER,
    CPUAlltoAllTokenDispatcher,
    CPUGlobalMemoryBuffer,
    CPURNGStatesTracker,
    CPURotaryEmbedding,
    CPUSequenceParallelNorm,
    adapt_model_for_cpu,
    adapt_spec_for_cpu,
)
from megatron_emo.cpu.patches import PATCHES, TRAINING_CONTEXTS
from megatron_emo.mcore.process_groups import initialize_model_parallel
from megatron_emo.patching import PatchSet

__all__ = [
    "CPU_MODEL_ADAPTER",
    "CPUAlltoAllTokenDispatcher",
    "CPUGlobalMemoryBuffer",
    "CPURNGStatesTracker",
    "CPURotaryEmbedding",
    "CPUSequenceParallelNorm",
    "PATCHES",
    "adapt_model_for_cpu",
    "adapt_spec_for_cpu",
    "disable",
    "enable",
    "enabled",
    "initialize_model_parallel_cpu",
    "is_enabled",
]

_BACKEND = PatchSet(p for p in PATCHES if p.group == "backend")
_TRAINING = PatchSet((p for p in PATCHES if p.group == "training"), contexts=TRAINING_CONTEXTS)


def is_enabled(*, training: bool = False) -> bool:
    """Whether the backend (and, with ``training``, the training patches) is enabled."""
    return _BACKEND.applied and (_TRAINING.applied or not training)


def enable(*, training: bool = False) -> tuple[bool, bool]:
    """Applies the backend's patches (idempotent).

    With ``training`` it also applies what ``megatron.training.pretrain()`` needs: host
    stand-ins for ``torch.cuda`` streams, RNG and memory queries, the distributed optimizer's
    fixes (F8-F11), no JIT warm-up, and a torch function mode mapping CUDA placement to the
    host (``patches.py``).

    Args:
        training: also apply the ``"training"`` group.

    Returns:
        Whether this call applied the backend group and the training group.

    Raises:
        RuntimeError: on a machine with CUDA, where the backend must not be used.
    """
    if not _BACKEND.applied and torch.cuda.is_available():
        raise RuntimeError("the CPU backend is for machines without CUDA; this one has a GPU")
    backend = _BACKEND.apply()
    return backend, _TRAINING.apply() if training else False


def disable() -> None:
    """Undoes ``enable()``: exits the torch function mode and restores every patched attribute.

    Model-parallel state and models built meanwhile stay as they are.
    """
    _TRAINING.undo()
    _BACKEND.undo()


@contextlib.contextmanager
def enabled(*, training: bool = False) -> Iterator[None]:
    """``enable()`` for a block, then undoes what this call applied (nothing if it was on)."""
    backend, train = enable(training=training)
    try:
        yield
    finally:
        if train:
            _TRAINING.undo()
        if backend:
            _BACKEND.undo()


def initialize_model_parallel_cpu(*, seed: int = 1234, **parallel_sizes: int | None) -> None:
    """Sets up a CPU run: the backend, model-parallel state, CPU RNG tracker and scratch buffer.

    Needs an initialised gloo group; the model-parallel state comes from
    ``megatron_emo.mcore.process_groups.initialize_model_parallel``.

    Args:
        seed: model seed (Megatron's offsets: +2718 + tp_rank for TP, +1024 + 100 * ep_rank +
            etp_rank for experts).
        **parallel_sizes: the sizes of ``initialize_model_parallel``
            (``tensor_model_parallel_size``, ``expert_model_parallel_size``, ...; 1 when left
            out).
    """
    enable()
    ranks = initialize_model_parallel(
        **parallel_sizes,
        global_memory_buffer=CPUGlobalMemoryBuffer(),  # F2: utils.py:715 allocates on CUDA
    )
    tracker = mcore_random._CUDA_RNG_STATE_TRACKER
    tracker.reset()
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    tracker.add(mcore_random._DATA_PARALLEL_RNG_TRACKER_NAME, seed)
    tp_rank = ranks.tensor_model_parallel_rank
    tracker.add(mcore_random._MODEL_PARALLEL_RNG_TRACKER_NAME, seed + 2718 + tp_rank)
    tracker.add(
        mcore_random._EXPERT_PARALLEL_RNG_TRACKER_NAME,
        seed + 1024 + 100 * ranks.expert_model_parallel_rank + ranks.expert_tensor_parallel_rank,
    )
