"""Shared pytest setup: importable test helpers, the gpu skip, and the process-group fixtures.

``tests/`` is importable (``helpers``, ``reference``) and so is ``tests/conversion`` (``hf_tiny``,
``mcore_tiny``: tiny EMO checkpoints the subset and evaluation tests reuse). Fixtures:

* ``gloo_world``: the default process group, one gloo rank.
* ``model_parallel``: plus Megatron's model-parallel state (checkpoint IO and export; no CPU
  backend).
* ``megatron_cpu``: plus the CPU backend, its RNG tracker and scratch buffer (tests that build or
  run Megatron models on CPU).

Without CUDA it also turns on Triton's interpreter (``TRITON_INTERPRET=1``, read when triton is
first imported, so it must be set here, before any test module imports megatron or triton): the
fused routing kernels then run on CPU tensors (``tests/unit/test_fused_routing.py``).
"""

from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(1, os.path.join(os.path.dirname(__file__), "conversion"))
os.environ.setdefault("OMP_NUM_THREADS", "1")
if "TRITON_INTERPRET" not in os.environ and "triton" not in sys.modules:
    import torch

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"


def pytest_collection_modifyitems(config, items):
    """Skips ``gpu``-marked tests when CUDA is absent (they are deselected by default anyway)."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords or "multi_gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def gloo_world():
    """The default ``torch.distributed`` group: one gloo rank on the loopback address."""
    import torch.distributed as dist

    from helpers import free_port, init_gloo

    init_gloo(0, 1, free_port())
    yield
    if dist.is_initialized():
        dist.destroy_process_group()


@pytest.fixture(scope="session")
def model_parallel(gloo_world):
    """Megatron's model-parallel state (all sizes 1) on ``gloo_world``, without the CPU backend.

    A state ``megatron_cpu`` set up first is kept.
    """
    from megatron_emo.mcore import process_groups

    if not process_groups.model_parallel_is_initialized():
        process_groups.initialize_model_parallel()
    yield
    process_groups.destroy_model_parallel()


@pytest.fixture(scope="session")
def megatron_cpu(gloo_world):
    """One gloo rank with the CPU backend and model-parallel state, RNG tracker seeded with 1234.

    The backend is disabled again at the end of the session.
    """
    from megatron_emo import cpu
    from megatron_emo.mcore import process_groups

    cpu.initialize_model_parallel_cpu(seed=1234)
    yield
    process_groups.destroy_model_parallel()
    cpu.disable()
