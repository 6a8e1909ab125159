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
* Resuming a distributed-optimizer checkpoint saved in a fully reshardable format at EP=1 with
  EP > 1 (or the reverse) fails with ``RuntimeError: Expected 2 entries in state dict, but got
  4`` (``core/optimizer/optimizer.py:1577-1581``): at EP=1 (expert TP = TP) the expert weights
  are ordinary parameters and Megatron builds one ``DistributedOptimizer``, at EP > 1 a second
  one for the expert parameters (``optimizer/__init__.py:1143-1186``), and the loaded state
  keeps the saved nesting. The optimizer tensors themselves are stored in model space under
  the parameters' names (``distrib_optimizer.py:1813``) and load into either nesting;
  ``load_optimizer_state_across_expert_layouts`` regroups the common part (hyperparameters and
  ``step``) for the new chain.

The three process-wide replacements are ``megatron_emo.patching`` patches, applied once each.

Megatron symbols: ``core.datasets.utils.compile_helpers``, ``core.datasets.helpers_cpp``,
``core.optimizer.optimizer.ChainedOptimizer``, ``core.optimizer.distrib_optimizer.
DistributedOptimizer.checkpoint_fully_reshardable_formats``,
``training.training.training_log``, ``training.global_vars.get_args``.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import inspect
import re
from typing import Any

from megatron_emo.patching import Patch, PatchSet

__all__ = [
    "escape_bare_percent_in_help",
    "load_optimizer_state_across_expert_layouts",
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


_PREBUILT_HELPERS = PatchSet(
    [Patch("megatron.core.datasets.utils", "compile_helpers", lambda: None, "initialize.py:178")]
)


def use_prebuilt_dataset_helpers() -> bool:
    """Makes Megatron's start-up use the wheel's prebuilt dataset helpers when they import.

    Returns:
        True if the prebuilt extension imports (compilation is skipped), False otherwise (the
        original ``compile_helpers`` stays in place).
    """
    importlib.import_module("megatron.core.datasets.utils")
    try:
        importlib.import_module("megatron.core.datasets.helpers_cpp")
    except ImportError:
        return False
    _PREBUILT_HELPERS.apply()
    return True


def _resetting_log_sums(original):
    """``training_log`` that resets its sums when an iteration ends a ``--log-interval`` window.

    It passes ``is_first_iteration=False`` at the end of each window.
    """
    get_args = importlib.import_module("megatron.training.global_vars").get_args
    signature = inspect.signature(original)

    @functools.wraps(original)
    def training_log(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        if bound.arguments.get("is_first_iteration") and (
            bound.arguments["iteration"] % get_args().log_interval == 0
        ):
            bound.arguments["is_first_iteration"] = False
        return original(*bound.args, **bound.kwargs)

    return training_log


_LOG_SUMS = PatchSet(
    [Patch("megatron.training.training", "training_log", _resetting_log_sums,
           "training.py:3584/3998", wraps=True)]
)


def reset_log_sums_on_window_end() -> bool:
    """Makes a run's first iteration reset Megatron's stdout loss sums when it ends a window.

    Wraps ``megatron.training.training.training_log`` (looked up as a module global by
    ``train()``, ``training.py:3985``). Idempotent.

    Returns:
        True if the wrapper was installed by this call, False if it already was.
    """
    return _LOG_SUMS.apply()


def _expert_flag(optimizer) -> bool:
    flags = {bool(g.get("is_expert_parallel", False)) for g in optimizer.optimizer.param_groups}
    if len(flags) != 1:
        raise ValueError(f"an optimizer of the chain mixes expert and dense groups ({flags})")
    return flags.pop()


def _common_part(state: dict) -> dict:
    """A distributed optimizer's state without its tensors (``param_state``) or nested chains."""
    return {k: v for k, v in state.items() if k != "param_state" and not isinstance(k, int)}


def _relabelled(common: dict, is_expert_parallel: bool) -> dict:
    groups = [
        dict(g, is_expert_parallel=is_expert_parallel) for g in common["optimizer"]["param_groups"]
    ]
    return dict(common, optimizer=dict(common["optimizer"], param_groups=groups))


def _regroup_model_space_state(chain, state_dict: dict) -> list[dict] | None:
    """Per-optimizer states for ``chain`` regrouped from another optimizer nesting.

    The fully reshardable state was saved with another number of chained optimizers
    (EP = 1 <-> EP > 1). None when the nesting already fits.
    """
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    optimizers = chain.chained_optimizers
    nested = sorted(k for k in state_dict if isinstance(k, int))
    formats = DistributedOptimizer.checkpoint_fully_reshardable_formats
    if not all(isinstance(o, DistributedOptimizer) for o in optimizers):
        return None
    if len(optimizers) > 1 and "optimizer" in state_dict and nested == list(range(len(optimizers))):
        # Saved with one optimizer: its common part serves every optimizer of the new chain.
        if state_dict.get("param_state_sharding_type") not in formats:
            return None
        common = _common_part(state_dict)
        return [
            dict(_relabelled(common, _expert_flag(o)), param_state=state_dict[i]["param_state"])
            for i, o in enumerate(optimizers)
        ]
    if len(optimizers) == 1 and "optimizer" not in state_dict and len(nested) > 1:
        # Saved with a chain; loading into one optimizer: every saved group, as dense groups.
        saved = [_common_part(state_dict[i]) for i in nested]
        if any(c.get("param_state_sharding_type") not in formats for c in saved):
            return None
        flag = _expert_flag(optimizers[0])
        groups = [g for c in saved for g in _relabelled(c, flag)["optimizer"]["param_groups"]]
        common = dict(saved[0], optimizer=dict(saved[0]["optimizer"], param_groups=groups))
        return [dict(common, param_state=state_dict["param_state"])]
    return None


def _regrouping_load_state_dict(original):
    def load_state_dict(self, state_dict: Any) -> None:
        regrouped = None
        if isinstance(state_dict, dict):
            regrouped = _regroup_model_space_state(self, state_dict)
        if regrouped is None:
            return original(self, state_dict)
        for optimizer, state in zip(self.chained_optimizers, regrouped, strict=True):
            optimizer.load_state_dict(state)
        if len(self.chained_optimizers) > 1:
            self._synchronize_steps()

    return load_state_dict


_CHAINED_LOAD = PatchSet(
    [Patch("megatron.core.optimizer.optimizer.ChainedOptimizer", "load_state_dict",
           _regrouping_load_state_dict, "optimizer.py:1577-1581", wraps=True)]
)


def load_optimizer_state_across_expert_layouts() -> None:
    """Lets ``ChainedOptimizer.load_state_dict`` load states saved with another EP layout.

    The fully reshardable distributed-optimizer state may have been saved with another number
    of chained optimizers (EP = 1 <-> EP > 1). Idempotent;
    every other state goes to Megatron's method unchanged.
    """
    _CHAINED_LOAD.apply()
