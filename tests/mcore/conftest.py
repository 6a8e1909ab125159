"""Every test here runs real Megatron-Core modules through the CPU backend (1 gloo rank)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session", autouse=True)
def _megatron_cpu_for_every_test(megatron_cpu):
    """``megatron_cpu`` (``tests/conftest.py``) for each test of this folder."""
    yield
