"""``megatron_emo/cli.py`` and ``megatron_emo/quiet.py``, in process and without megatron.

``cli.py`` is how tools report errors, ``quiet.py`` the filter of known-irrelevant messages.
Checked: exact matching only, user errors vs bugs, ``--debug`` / ``MEGATRON_EMO_DEBUG``.

Run: ``OMP_NUM_THREADS=1 .venv/bin/python -m pytest tests/unit/test_cli_and_quiet.py -q``
"""

from __future__ import annotations

import io
import logging
import sys
import warnings

import pytest

from megatron_emo import quiet
from megatron_emo.cli import run_tool, user_error

APEX = "Apex is not installed. Falling back to Torch Norm"
MEMORY = ("[Rank 0] (after 2 iterations) memory (MB) | allocated: 0.00 | max allocated: 0.00 | "
          "reserved: 0.00 | max reserved: 0.00")


@pytest.fixture
def process_state(monkeypatch):
    """Restores what ``filter_known_messages`` and ``run_tool`` change.

    Warning filters, logger filters, stdout, and ``MEGATRON_EMO_DEBUG`` (``run_tool(...,
    ["--debug"])`` sets it for child processes; set to "" here, so it is removed again at
    teardown instead of leaking into later tests' child runs).
    """
    monkeypatch.setenv(quiet.DEBUG_ENV, "")
    stdout = sys.stdout
    loggers = {m.logger for m in quiet.KNOWN_MESSAGES if m.logger}
    before = {name: list(logging.getLogger(name).filters) for name in loggers}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield caught
    sys.stdout = stdout
    for name, filters in before.items():
        logging.getLogger(name).filters[:] = filters


def test_warnings_are_dropped_only_on_a_full_match(process_state):
    quiet.filter_known_messages("cpu")
    warnings.warn(APEX, stacklevel=2)
    warnings.warn(APEX + " (and more)", stacklevel=2)
    warnings.warn("Apex is not installed.", stacklevel=2)
    warnings.warn(APEX, DeprecationWarning, stacklevel=2)  # any category: the text decides
    # A tool-scope message is not filtered in a --cpu training run.
    warnings.warn("Could not determine rank from torch.distributed, RANK, or SLURM_PROCID. "
                  "Defaulting to rank 0.", stacklevel=2)
    assert [str(w.message) for w in process_state] == [
        APEX + " (and more)", "Apex is not installed.",
        "Could not determine rank from torch.distributed, RANK, or SLURM_PROCID. "
        "Defaulting to rank 0."]


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_log_records_are_dropped_only_on_a_full_match_from_their_logger(process_state):
    entries = quiet.filter_known_messages("tool")
    assert {m.scope for m in entries} == {"cpu", "tool"}
    cpp, other = logging.getLogger("torch.utils.cpp_extension"), logging.getLogger("elsewhere")
    handler = _Records()
    for logger in (cpp, other):
        logger.addHandler(handler)
    try:
        cpp.warning("No CUDA runtime is found, using CUDA_HOME='%s'", "/usr/local")
        cpp.warning("No CUDA runtime is found, using CUDA_HOME='/usr/local' twice")
        other.warning("No CUDA runtime is found, using CUDA_HOME='/x'")
    finally:
        for logger in (cpp, other):
            logger.removeHandler(handler)
    assert handler.messages == ["No CUDA runtime is found, using CUDA_HOME='/usr/local' twice",
                                "No CUDA runtime is found, using CUDA_HOME='/x'"]


def test_stdout_lines_are_dropped_only_on_a_full_match(process_state):
    sys.stdout = buffer = io.StringIO()
    quiet.filter_known_messages("cpu")
    quiet.filter_known_messages("cpu")  # idempotent: one wrapper
    print("before")
    sys.stdout.write(MEMORY[:20])  # a line written in pieces is matched whole
    sys.stdout.write(MEMORY[20:] + "\nafter\n")
    print(MEMORY.replace("allocated: 0.00", "allocated: 3.50", 1))  # a real CUDA report stays
    print("[Rank 1] (before save_checkpoint for iteration 3) " + MEMORY.split(") ", 1)[1])
    print("partial", end="", flush=True)
    assert buffer.getvalue() == ("before\nafter\n"
                                 + MEMORY.replace("allocated: 0.00", "allocated: 3.50", 1)
                                 + "\npartial")


def test_debug_environment_turns_the_filter_off(process_state, monkeypatch):
    monkeypatch.setenv(quiet.DEBUG_ENV, "1")
    assert quiet.filter_known_messages("tool") == []
    warnings.warn(APEX, stacklevel=2)
    assert [str(w.message) for w in process_state] == [APEX]


def test_unknown_scope_is_named():
    with pytest.raises(ValueError, match="scope must be 'cpu' or 'tool', got 'gpu'"):
        quiet.filter_known_messages("gpu")


def test_every_entry_names_its_source_and_compiles():
    import re

    for m in quiet.KNOWN_MESSAGES:
        re.compile(m.pattern)
        assert re.search(r"\.py:\d+", m.source), m
        assert (m.kind == "log") == bool(m.logger), m
        assert m.source.isascii() and m.pattern.isascii()


def _raiser(exc: BaseException):
    def main(argv):
        raise exc
    return main


@pytest.mark.parametrize(
    "exc",
    [ValueError("keep_k (99) is too big"), FileNotFoundError("/x is not a checkpoint"),
     IsADirectoryError("/tmp is a directory")],
    ids=["value-error", "file-not-found", "os-error"],
)
def test_user_errors_print_one_line_and_exit_2(process_state, capsys, exc):
    assert run_tool(_raiser(exc), ["a"]) == 2
    captured = capsys.readouterr()
    assert captured.err == f"error: {exc}\n" and captured.out == ""


def test_unreadable_checkpoint_errors_are_user_errors_by_name(process_state, capsys):
    # megatron/core/dist_checkpointing/core.py:16, matched by qualified name (no import here).
    exc_type = type("CheckpointingException", (Exception,), {
        "__module__": "megatron.core.dist_checkpointing.core"})
    assert run_tool(_raiser(exc_type("/c is not a distributed checkpoint")), []) == 2
    assert capsys.readouterr().err == "error: /c is not a distributed checkpoint\n"


def test_torch_checkpoint_exception_is_unwrapped(process_state, capsys):
    from torch.distributed.checkpoint.api import CheckpointException

    wrapped = CheckpointException("failed", {0: (FileNotFoundError("/c/.metadata"), None)})
    assert user_error(wrapped).args == ("/c/.metadata",)
    assert run_tool(_raiser(wrapped), []) == 2
    assert capsys.readouterr().err == "error: /c/.metadata\n"
    bug = CheckpointException("failed", {0: (RuntimeError("shape mismatch"), None)})
    assert user_error(bug) is None
    assert run_tool(_raiser(bug), []) == 1


def test_bugs_show_the_traceback_and_say_so(process_state, capsys):
    assert run_tool(_raiser(KeyError("decoder.layers.0")), []) == 1
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "KeyError: 'decoder.layers.0'" in err
    assert err.rstrip().endswith("please report it with the traceback above")
    assert "error: unexpected KeyError: this is a bug in megatron-emo" in err


@pytest.mark.parametrize("how", ["flag", "env"])
def test_debug_shows_the_traceback(process_state, monkeypatch, how):
    seen = []

    def main(argv):
        seen.append(argv)
        raise ValueError("bad")

    argv = ["x", "--debug"] if how == "flag" else ["x"]
    if how == "env":
        monkeypatch.setenv(quiet.DEBUG_ENV, "1")
    with pytest.raises(ValueError, match="bad"):
        run_tool(main, argv)
    assert seen == [["x"]]  # --debug never reaches the tool's parser


def test_exit_codes_and_argparse_pass_through(process_state):
    assert run_tool(lambda argv: None, []) == 0
    assert run_tool(lambda argv: 1, []) == 1
    with pytest.raises(SystemExit):
        run_tool(_raiser(SystemExit(2)), [])
