"""How tools in ``tools/`` meet the user: ``error: <message>`` for bad input, tracebacks for bugs.

Each tool ends with ``sys.exit(run_tool(main))``. Bad arguments or bad input (``ValueError``,
``OSError`` such as ``FileNotFoundError``, a checkpoint that Megatron or torch's distributed
checkpointing cannot read) print ``error: <message>`` on stderr and exit 2; anything else is a
bug and prints its traceback with a request to report it (exit 1). ``--debug`` anywhere on the
command line, or ``MEGATRON_EMO_DEBUG=1``, shows every traceback and every warning. Known
irrelevant warnings are filtered (``megatron_emo.quiet``). ``main`` itself keeps raising, so
tests and library callers still see the exceptions.
"""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Callable

from megatron_emo.quiet import DEBUG_ENV, debug_enabled, filter_known_messages

__all__ = ["EXIT_BUG", "EXIT_USER_ERROR", "run_tool", "user_error"]

EXIT_USER_ERROR = 2
EXIT_BUG = 1
DEBUG_FLAG = "--debug"

# Raised for unreadable checkpoints; matched by name so this module imports neither package.
# megatron/core/dist_checkpointing/core.py:16 (e.g. validation.py:213 "... is not a distributed
# checkpoint"); safetensors' error for a truncated or foreign .safetensors file.
_USER_ERROR_NAMES = frozenset({
    "megatron.core.dist_checkpointing.core.CheckpointingException",
    "safetensors_rust.SafetensorError",
})
# torch/distributed/checkpoint/api.py:30, a BaseException that wraps each rank's exception.
_DCP_WRAPPER = "torch.distributed.checkpoint.api.CheckpointException"


def _qualified_names(exc: BaseException) -> set[str]:
    return {f"{t.__module__}.{t.__qualname__}" for t in type(exc).__mro__}


def user_error(exc: BaseException) -> BaseException | None:
    """The user-facing error behind ``exc``, or None if ``exc`` looks like a bug.

    Args:
        exc: the exception that ended the tool.

    Returns:
        ``exc`` itself for ``ValueError`` / ``OSError`` / unreadable checkpoints; for torch's
        ``CheckpointException`` the wrapped exception when every rank failed with a user error;
        None otherwise.
    """
    if isinstance(exc, (ValueError, OSError)) or _qualified_names(exc) & _USER_ERROR_NAMES:
        return exc
    if _DCP_WRAPPER in _qualified_names(exc):
        failures = getattr(exc, "failures", {}) or {}
        inner = [user_error(f[0] if isinstance(f, tuple) else f) for f in failures.values()]
        if inner and all(e is not None for e in inner):
            return inner[0]
    return None


def run_tool(main: Callable[[list[str] | None], object], argv: list[str] | None = None) -> int:
    """Runs a tool's ``main(argv)`` and turns its exceptions into an exit code.

    Args:
        main: the tool's entry function; it parses ``argv`` (without the program name) and
            returns an exit code (an ``int``); any other return value (None, or a result the
            tool also returns to Python callers) means success.
        argv: the arguments; ``sys.argv[1:]`` when None. ``--debug`` is removed before ``main``
            sees them.

    Returns:
        The process exit code: ``main``'s, 2 for a user error, 1 for a bug, 130 on Ctrl-C.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = debug_enabled() or DEBUG_FLAG in argv
    argv = [a for a in argv if a != DEBUG_FLAG]
    if debug:
        os.environ[DEBUG_ENV] = "1"  # child processes and the warning filter see it too
    filter_known_messages("tool")
    try:
        code = main(argv)
    except KeyboardInterrupt:
        if debug:
            raise
        print("interrupted", file=sys.stderr)
        return 130
    except BaseException as exc:  # noqa: BLE001 (torch's CheckpointException is a BaseException)
        if isinstance(exc, (SystemExit, GeneratorExit)):
            raise
        if debug:
            raise
        cause = user_error(exc)
        if cause is not None:
            print(f"error: {cause}", file=sys.stderr, flush=True)
            return EXIT_USER_ERROR
        traceback.print_exc()
        print(f"error: unexpected {type(exc).__name__}: this is a bug in megatron-emo (or an input "
              "it does not check yet); please report it with the traceback above",
              file=sys.stderr, flush=True)
        return EXIT_BUG
    return code if isinstance(code, int) else 0
