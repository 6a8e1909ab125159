"""Start-up fixes for the megatron-core pip wheel, needed on GPU and CPU alike.

* ``megatron/training/initialize.py:178`` calls ``megatron.core.datasets.utils.compile_helpers``,
  which runs ``make`` in the installed ``megatron/core/datasets`` folder. The wheel ships the
  compiled ``helpers_cpp`` extension but no Makefile, so ``make`` fails and Megatron calls
  ``sys.exit(1)`` (``datasets/utils.py:20-30``). ``use_prebuilt_dataset_helpers`` keeps the
  original for source checkouts and skips it when the prebuilt extension imports.

Megatron symbols: ``core.datasets.utils.compile_helpers``, ``core.datasets.helpers_cpp``.
"""

from __future__ import annotations

import importlib

__all__ = ["use_prebuilt_dataset_helpers"]


def use_prebuilt_dataset_helpers() -> bool:
    """Makes Megatron's start-up use the wheel's prebuilt dataset helpers when they import.

    Returns:
        True if the prebuilt extension imports (compilation is skipped), False otherwise (the
        original ``compile_helpers`` stays in place).
    """
    utils = importlib.import_module("megatron.core.datasets.utils")
    try:
        importlib.import_module("megatron.core.datasets.helpers_cpp")
    except ImportError:
        return False
    utils.compile_helpers = lambda: None
    return True
