"""Fixtures for conversion tests. Megatron-facing tests request ``megatron_cpu``; the HF-only
tests (``test_key_map.py``, ``test_hf_modeling.py``) import neither megatron nor this fixture."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def megatron_cpu():
    """One gloo rank with Megatron's model-parallel state and the CPU backend installed."""
    from helpers import free_port, init_gloo

    from megatron_emo.mcore.cpu_backend import initialize_model_parallel_cpu

    init_gloo(0, 1, free_port())
    initialize_model_parallel_cpu(seed=1234)
    yield
