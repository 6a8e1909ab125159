"""Fixtures for expert-subset tests.

A tiny EMO HF directory (``hf_tiny`` from ``tests/conversion``). The process-group fixtures come
from ``tests/conftest.py``.
"""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tiny_hf_dir(tmp_path_factory):
    """A random tiny EMO HF directory (2 layers, 8 experts incl. 1 shared, top-3)."""
    from hf_tiny import random_hf_state_dict, write_hf_dir

    path = tmp_path_factory.mktemp("tiny") / "hf"
    write_hf_dir(path, random_hf_state_dict(seed=21, std=0.3))
    return str(path)
