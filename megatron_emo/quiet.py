"""Known-irrelevant messages of ``--cpu`` runs and of the tools, filtered one message at a time.

Megatron-Core 0.19.2 (and torch underneath it) report that CUDA, Transformer Engine and apex are
missing, which is the point of a CPU run, and the single-process tools trigger a few more notices
that the user cannot act on. ``KNOWN_MESSAGES`` lists each one with the file:line that emits it;
a message is dropped only when it matches an entry in full (regular expression anchored at both
ends), so any other warning, log record or line of output still shows. ``MEGATRON_EMO_DEBUG=1``
turns the filter off.

Callers: ``megatron_emo.train`` with ``--cpu`` (scope ``"cpu"``) and ``megatron_emo.cli.run_tool``
(scope ``"tool"``, which includes ``"cpu"``). Paths below are relative to site-packages.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import sys
import warnings
from typing import Literal, TextIO

__all__ = ["KNOWN_MESSAGES", "KnownMessage", "debug_enabled", "filter_known_messages"]

DEBUG_ENV = "MEGATRON_EMO_DEBUG"
_NO_TE_APEX = "Transformer Engine and Apex are not installed. Falling back to "


@dataclasses.dataclass(frozen=True)
class KnownMessage:
    """One message that does not apply to the run, and how it reaches the terminal."""

    kind: Literal["warning", "log", "stdout"]
    """``warnings.warn``, a ``logging`` record, or a ``print`` to stdout."""
    pattern: str
    """Regular expression that must match the whole message text (or the whole stdout line)."""
    scope: Literal["cpu", "tool"]
    """``cpu``: irrelevant without CUDA / TE / apex; ``tool``: irrelevant in the tools only."""
    source: str
    """Where it is emitted (file:line), and why it does not apply."""
    logger: str = ""
    """Logger name, for ``kind='log'``."""


KNOWN_MESSAGES: tuple[KnownMessage, ...] = (
    KnownMessage("warning", re.escape(_NO_TE_APEX + "Torch optimizers."), "cpu",
                 "megatron/core/optimizer/__init__.py:25; CPU runs use the torch optimizers"),
    KnownMessage("warning", re.escape(_NO_TE_APEX + "local implementations of "
                                      "multi_tensor_applier and multi_tensor_scale"), "cpu",
                 "megatron/core/optimizer/optimizer.py:29, megatron/core/distributed/fsdp/src/"
                 "megatron_fsdp/mixed_precision.py:115; fused kernels are CUDA-only"),
    KnownMessage("warning", re.escape(_NO_TE_APEX + "local implementations of "
                                      "multi_tensor_applier, multi_tensor_l2norm, and "
                                      "multi_tensor_scale"), "cpu",
                 "megatron/core/optimizer/clip_grads.py:32; fused kernels are CUDA-only"),
    KnownMessage("warning", re.escape(_NO_TE_APEX + "local implementations of "
                                      "multi_tensor_applier and multi_tensor_l2norm"), "cpu",
                 "megatron/training/utils/common_utils.py:27; fused kernels are CUDA-only"),
    KnownMessage("warning", re.escape("Apex is not installed. Falling back to Torch Norm"), "cpu",
                 "megatron/core/models/backends.py:34, megatron/core/models/gpt/"
                 "gpt_layer_specs.py:74, megatron/core/models/gpt/heterogeneous/"
                 "heterogeneous_layer_specs.py:68; the local spec uses torch norms on CPU"),
    KnownMessage("warning", re.escape("Only transformer-engine>=1.7.0 supports MoE experts, but "
                                      "your version is 0.0.0. Use local linear implementation "
                                      "instead."), "cpu",
                 "megatron/core/extensions/transformer_engine_spec_provider.py:88; version "
                 "0.0.0 means TE is absent, and CPU runs use the local spec"),
    KnownMessage("log", r"No CUDA runtime is found, using CUDA_HOME='[^']*'", "cpu",
                 "torch/utils/cpp_extension.py:178, on import by megatron/core/"
                 "nccl_allocator.py:11; no CUDA on a CPU run",
                 logger="torch.utils.cpp_extension"),
    KnownMessage("warning", re.escape("'pin_memory' argument is set as true but no accelerator "
                                      "is found, then device pinned memory won't be used."), "cpu",
                 "torch/utils/data/dataloader.py:656 for megatron/training/datasets/"
                 "data_samplers.py:109 (pin_memory=True); there is no device to pin for"),
    KnownMessage("stdout", r"\[Rank \d+\] \((after \d+ iterations|(before|after) save_checkpoint "
                           r"for iteration \d+)\) memory \(MB\) \| allocated: 0\.00 \| max "
                           r"allocated: 0\.00 \| reserved: 0\.00 \| max reserved: 0\.00", "cpu",
                 "megatron/training/utils/common_utils.py:334 (report_memory, called at "
                 "training/training.py:2916/2927/3083/3111); CUDA allocator statistics, all zero "
                 "without CUDA"),
    KnownMessage("warning", re.escape("torch.distributed is disabled, unavailable or "
                                      "uninitialized, assuming the intent is to load in a single "
                                      "process."), "tool",
                 "torch/distributed/checkpoint/state_dict_loader.py:160; the tools read "
                 "checkpoints in one process on purpose"),
    KnownMessage("warning", re.escape("torch.distributed is disabled, unavailable or "
                                      "uninitialized, assuming the intent is to save in a single "
                                      "process."), "tool",
                 "torch/distributed/checkpoint/state_dict_saver.py:186, raised even for an "
                 "explicit no_dist=True; conversion/torch_dist_writer.py streams a checkpoint from "
                 "one process on purpose"),
    KnownMessage("warning", re.escape("Could not determine rank from torch.distributed, RANK, or "
                                      "SLURM_PROCID. Defaulting to rank 0."), "tool",
                 "megatron/core/_rank_utils.py:39; a tool is one process, rank 0 is right"),
    KnownMessage("warning", re.escape("full scope is deprecated. Use empty cuda_graph_modules to "
                                      "capture the whole layer."), "tool",
                 "megatron/core/transformer/transformer_config.py:2415, for its own default "
                 "cuda_graph_modules='full' (:1047); EMO never captures CUDA graphs "
                 "(mcore/config.py requires cuda_graph_impl='none')"),
    KnownMessage("log", re.escape("GPTModel IS DEPRECATED. GPTModel is only accepting critical "
                                  "bug fixes, no new features. Please reference the migration "
                                  "guide `docs/user-guide/hybrid-model-migration.md` for details "
                                  "on how to use `HybridModel`"), "tool",
                 "megatron/core/models/gpt/gpt_model.py:118; the tools build the model "
                 "internally, the user cannot choose", logger="megatron.core.models.gpt.gpt_model"),
    KnownMessage("log", re.escape("MCore's async save is deprecated and will be removed in the "
                                  "future releases. Please, use NVRx async solution by setting "
                                  "`async_strategy` to `nvrx`."), "tool",
                 "megatron/core/dist_checkpointing/strategies/torch.py:749; the tools save "
                 "synchronously, once", logger="megatron.core.dist_checkpointing.strategies.torch"),
)


def debug_enabled() -> bool:
    """Whether ``MEGATRON_EMO_DEBUG`` asks for everything (tracebacks, all warnings)."""
    return os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no")


class _DropKnownRecords(logging.Filter):
    """Drops log records whose whole message matches one of the patterns."""

    def __init__(self, patterns: list[re.Pattern]) -> None:
        super().__init__()
        self.patterns = patterns

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        return not any(p.fullmatch(text) for p in self.patterns)


class _DropKnownLines:
    """A stdout wrapper that drops whole lines matching one of the patterns.

    Text is passed on line by line; a partial line waits for its newline (or a flush), so a line
    printed in pieces is still matched as a whole.
    """

    def __init__(self, stream: TextIO, patterns: list[re.Pattern]) -> None:
        self._stream = stream
        self._patterns = patterns
        self._pending = ""

    def write(self, text: str) -> int:
        self._pending += text
        if "\n" in self._pending:
            *lines, self._pending = self._pending.split("\n")
            kept = [ln for ln in lines if not any(p.fullmatch(ln) for p in self._patterns)]
            if kept:
                self._stream.write("\n".join(kept) + "\n")
        return len(text)

    def flush(self) -> None:
        if self._pending:
            self._stream.write(self._pending)
            self._pending = ""
        self._stream.flush()

    def __getattr__(self, name: str):
        return getattr(self._stream, name)


def filter_known_messages(scope: Literal["cpu", "tool"]) -> list[KnownMessage]:
    """Installs the filters for ``scope`` in this process (idempotent).

    Args:
        scope: ``"cpu"`` for ``--cpu`` training runs; ``"tool"`` for the tools (includes ``cpu``).

    Returns:
        The entries installed; empty when ``MEGATRON_EMO_DEBUG`` is set.

    Raises:
        ValueError: for an unknown scope.
    """
    if scope not in ("cpu", "tool"):
        raise ValueError(f"scope must be 'cpu' or 'tool', got {scope!r}")
    if debug_enabled():
        return []
    entries = [m for m in KNOWN_MESSAGES if m.scope == "cpu" or scope == "tool"]
    by_logger: dict[str, list[re.Pattern]] = {}
    lines: list[re.Pattern] = []
    for m in entries:
        if m.kind == "warning":
            # filterwarnings anchors at the start only; \Z anchors the end.
            warnings.filterwarnings("ignore", message=m.pattern + r"\Z")
        elif m.kind == "log":
            by_logger.setdefault(m.logger, []).append(re.compile(m.pattern))
        else:
            lines.append(re.compile(m.pattern))
    for name, patterns in by_logger.items():
        logger = logging.getLogger(name)  # the same object the emitting module gets later
        for old in [f for f in logger.filters if isinstance(f, _DropKnownRecords)]:
            logger.removeFilter(old)
        logger.addFilter(_DropKnownRecords(patterns))
    if lines:
        if isinstance(sys.stdout, _DropKnownLines):
            sys.stdout.flush()
            sys.stdout = sys.stdout._stream
        sys.stdout = _DropKnownLines(sys.stdout, lines)
    return entries
