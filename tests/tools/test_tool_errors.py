"""Every CLI in ``tools/`` on bad input, as a user runs it.

``error: <message>`` as the only line on stderr, exit code 2, no traceback and no irrelevant warning
(``megatron_emo/cli.py``, ``megatron_emo/quiet.py``). Includes the cases of issue 16: ``to-hf`` on a
directory that is not a checkpoint (which initialises torch.distributed, whose excepthook prefixes
``[rank0]:``), and ``select_experts.py`` with an empty examples file and with ``--keep 99``.

The tools run as subprocesses, two at a time (each imports torch and megatron, ~7 s of CPU).
Run: ``OMP_NUM_THREADS=1 .venv/bin/python -m pytest tests/tools -q``
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests" / "conversion"))

MAX_PARALLEL = 2


def _cases(tmp: Path) -> dict[str, tuple[list[str], str]]:
    """``{case: (tool command line, expected stderr)}`` over the fixture files in ``tmp``."""
    hf, ex, empty = tmp / "hf", tmp / "examples.jsonl", tmp / "empty.jsonl"
    not_ckpt, missing = tmp / "not_a_checkpoint", tmp / "missing.jsonl"
    return {
        "convert_checkpoint-to-hf-not-a-checkpoint": (
            ["convert_checkpoint.py", "to-hf", str(not_ckpt), str(tmp / "out_hf")],
            f"error: {not_ckpt} is not a torch_dist checkpoint (no metadata.json); pass the "
            "directory that holds latest_checkpointed_iteration.txt or an iter_XXXXXXX directory"),
        "select_experts-empty-examples": (
            ["select_experts.py", str(hf), str(empty), "--keep", "4", "--output",
             str(tmp / "out_sel")],
            f"error: examples file {empty} has no records (need at least 1)"),
        "select_experts-keep-99": (
            ["select_experts.py", str(hf), str(ex), "--keep", "99", "--output",
             str(tmp / "out_sel")],
            "error: keep_k (99) for layer 0 must satisfy num_shared_experts (1) < keep_k <= "
            "num_experts (8); keep_k counts the shared expert(s)"),
        "modularity_report-not-a-checkpoint": (
            ["modularity_report.py", str(not_ckpt), "--data-prefix", str(tmp / "data"),
             "--output", str(tmp / "out_report")],
            f"error: {not_ckpt} is neither an EMO HF directory (config.json) nor a Megatron "
            "torch_dist checkpoint (latest_checkpointed_iteration.txt or metadata.json)"),
        "preprocess_data-missing-input": (
            ["preprocess_data.py", "--input", str(missing), "--tokenizer-type",
             "SentencePieceTokenizer", "--tokenizer-model", str(tmp / "tok.model"),
             "--output-prefix", str(tmp / "out_data")],
            f"error: input {str(missing)!r} matches no file"),
        "train_tokenizer-missing-input": (
            ["train_tokenizer.py", "--input", str(missing), "--vocab-size", "400",
             "--output-prefix", str(tmp / "out_tok")],
            f"error: input {str(missing)!r} matches no file"),
        "build_sample_corpus-output-is-a-file": (
            ["build_sample_corpus.py", str(ex), "--domains", "math"],
            f"error: [Errno 17] File exists: {str(ex)!r}"),
        "evaluate-not-a-checkpoint": (
            ["evaluate.py", str(not_ckpt), "--tasks", "emo_mc_math"],
            f"error: {not_ckpt} is neither an EMO HF directory (config.json) nor a Megatron "
            "torch_dist checkpoint (latest_checkpointed_iteration.txt or metadata.json)"),
        "finetune_subset-megatron-flags-not-hf": (
            ["finetune_subset.py", "megatron-flags", str(not_ckpt)],
            f"error: {not_ckpt} has no config.json: not a Hugging Face model directory"),
    }


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """Runs every case, ``MAX_PARALLEL`` at a time: ``{case: (code, stdout, stderr, expected)}``."""
    from hf_tiny import random_hf_state_dict, write_hf_dir

    tmp = tmp_path_factory.mktemp("tools")
    write_hf_dir(tmp / "hf", random_hf_state_dict(seed=3))
    (tmp / "examples.jsonl").write_text('{"tokens": [5, 9, 33, 100]}\n')
    (tmp / "empty.jsonl").write_text("")
    (tmp / "not_a_checkpoint").mkdir()
    env = {k: v for k, v in os.environ.items() if k != "MEGATRON_EMO_DEBUG"}
    env.update(OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p))
    pending = list(_cases(tmp).items())
    running: dict[str, subprocess.Popen] = {}
    out = {}
    while pending or running:
        while pending and len(running) < MAX_PARALLEL:
            name, (cmd, expected) = pending.pop(0)
            running[name] = subprocess.Popen(
                [sys.executable, str(REPO / "tools" / cmd[0]), *cmd[1:]], cwd=tmp, env=env,
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            out[name] = expected
        for name, proc in list(running.items()):
            if proc.poll() is not None:
                stdout, stderr = proc.communicate()
                out[name] = (proc.returncode, stdout, stderr, out[name])
                del running[name]
        time.sleep(0.05)
    return out


@pytest.mark.parametrize("case", list(_cases(Path("/x"))), ids=str)
def test_bad_input_prints_one_error_line_and_exits_2(results, case):
    returncode, stdout, stderr, expected = results[case]
    assert "Traceback" not in stderr and "[rank" not in stderr, stderr
    assert stderr == expected + "\n", stderr  # nothing else: no warnings either
    assert returncode == 2, (returncode, stdout, stderr)
