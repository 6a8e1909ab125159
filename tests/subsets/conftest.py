"""Fixtures for expert-subset tests: tiny EMO HF directories (helpers from ``tests/conversion``)
and, for the Megatron tests, one gloo rank with the CPU backend."""

from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "conversion"))


@pytest.fixture(scope="session")
def megatron_cpu():
    """One gloo rank with Megatron's model-parallel state and the CPU backend installed."""
    from helpers import free_port, init_gloo
    from megatron.core import parallel_state

    from megatron_emo.mcore.cpu_backend import initialize_model_parallel_cpu

    init_gloo(0, 1, free_port())
    if not parallel_state.model_parallel_is_initialized():
        initialize_model_parallel_cpu(seed=1234)
    yield


@pytest.fixture(scope="session")
def tiny_hf_dir(tmp_path_factory):
    """A random tiny EMO HF directory (2 layers, 8 experts incl. 1 shared, top-3)."""
    from hf_tiny import random_hf_state_dict, write_hf_dir

    path = tmp_path_factory.mktemp("tiny") / "hf"
    write_hf_dir(path, random_hf_state_dict(seed=21, std=0.3))
    return str(path)
