"""Shared pytest setup: ``tests/`` importable (``helpers``, ``reference``), the gpu skip.

Without CUDA it also turns on Triton's interpreter (``TRITON_INTERPRET=1``, read when triton is
first imported, so it must be set here, before any test module imports megatron or triton): the
fused routing kernels then run on CPU tensors (``tests/unit/test_fused_routing.py``).
"""

from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))
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
