"""Start-up fixes for the megatron-core pip wheel, needed on GPU and CPU alike.

* ``megatron/training/initialize.py:178`` calls ``megatron.core.datasets.utils.compile_helpers``,
  which runs ``make`` in the installed ``megatron/core/datasets`` folder. The wheel ships the
  compiled ``helpers_cpp`` extension but no Makefile, so ``make`` fails and Megatron calls
  ``sys.exit(1)`` (``datasets/utils.py:20-30``). ``use_prebuilt_dataset_helpers`` keeps the
  original for source checkouts and skips it when the prebuilt extension imports.
* ``--help`` crashes with ``ValueError: unsupported format character ')'``: the help of
  ``--moe-paged-stash-buffer-size-factor-cuda`` (``training/arguments.py``) contains a bare
  ``%``, which argparse treats as a format directive. ``escape_bare_percent_in_help`` escapes it.

Megatron symbols: ``core.datasets.utils.compile_helpers``, ``core.datasets.helpers_cpp``.
"""

from __future__ import annotations

import argparse
import importlib
import re

__all__ = ["escape_bare_percent_in_help", "use_prebuilt_dataset_helpers"]

_PERCENT = re.compile(r"%(%|\()?")


def escape_bare_percent_in_help(parser: argparse.ArgumentParser) -> None:
    """Escapes ``%`` signs that are not argparse format directives in every help string."""
    for action in parser._actions:
        if action.help and action.help is not argparse.SUPPRESS:
            # Keep "%%" and "%(name)s"; double every other "%".
            action.help = _PERCENT.sub(lambda m: m.group(0) if m.group(1) else "%%", action.help)


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
