"""Fixtures for tests that run real Megatron-Core modules through the CPU backend (1 gloo rank)."""

from __future__ import annotations

import pytest
import torch.distributed as dist

from helpers import free_port, init_gloo


@pytest.fixture(scope="session", autouse=True)
def megatron_cpu_world():
    """One gloo rank with Megatron's model-parallel state and the CPU backend installed."""
    from megatron_emo.mcore.cpu_backend import initialize_model_parallel_cpu

    init_gloo(0, 1, free_port())
    initialize_model_parallel_cpu(seed=1234)
    yield
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
