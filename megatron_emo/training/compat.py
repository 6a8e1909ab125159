"""Start-up fixes for the megatron-core pip wheel, needed on GPU and CPU alike.

* ``megatron/training/initialize.py:178`` calls ``megatron.core.datasets.utils.compile_helpers``,
  which runs ``make`` in the installed ``megatron/core/datasets`` folder. The wheel ships the
  compiled ``helpers_cpp`` extension but no Makefile, so ``make`` fails and Megatron calls
  ``sys.exit(1)`` (``datasets/utils.py:20-30``). ``use_prebuilt_dataset_helpers`` keeps the
  original for source checkouts and skips it when the prebuilt extension imports.
* ``--help`` crashes with ``ValueError: unsupported format character ')'``: the help of
  ``--moe-paged-stash-buffer-size-factor-cuda`` (``training/arguments.py``) contains a bare
  ``%``, which argparse treats as a format directive. ``escape_bare_percent_in_help`` escapes it.
* ``training/training.py:3584/3998`` passes ``is_first_iteration=True`` to ``training_log`` for
  the first iteration of every run (resumed ones included), and ``training_log`` then keeps its
  stdout sums (``should_reset = not is_first_iteration``, ``:2594``; reset at ``:2883``/``:2905``)
  so that a first iteration *inside* a ``--log-interval`` window stays in that window's mean.
  When the first iteration *ends* a window (every step with ``--log-interval 1``, or a resume
  from a multiple of it), it is printed and still kept, so the next printed ``lm loss``,
  ``load_balancing_loss``, ``z_loss`` average one window too many (TensorBoard is unaffected:
  it gets each step's own ``loss_dict`` and MoE-tracker values). ``reset_log_sums_on_window_end``
  passes ``is_first_iteration=False`` on a window end, so that step resets like any other.

Megatron symbols: ``core.datasets.utils.compile_helpers``, ``core.datasets.helpers_cpp``,
``training.training.training_log``, ``training.global_vars.get_args``.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import inspect
import re

__all__ = [
    "escape_bare_percent_in_help",
    "reset_log_sums_on_window_end",
    "use_prebuilt_dataset_helpers",
]

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


def reset_log_sums_on_window_end() -> bool:
    """Makes a run's first iteration reset Megatron's stdout loss sums when it ends a window.

    Wraps ``megatron.training.training.training_log`` (looked up as a module global by
    ``train()``, ``training.py:3985``). Idempotent.

    Returns:
        True if the wrapper was installed by this call, False if it already was.
    """
    training = importlib.import_module("megatron.training.training")
    get_args = importlib.import_module("megatron.training.global_vars").get_args
    original = training.training_log
    if getattr(original, "_emo_resets_on_window_end", False):
        return False
    signature = inspect.signature(original)

    @functools.wraps(original)
    def training_log(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        if bound.arguments.get("is_first_iteration") and (
            bound.arguments["iteration"] % get_args().log_interval == 0
        ):
            bound.arguments["is_first_iteration"] = False
        return original(*bound.args, **bound.kwargs)

    training_log._emo_resets_on_window_end = True
    training.training_log = training_log
    return True
