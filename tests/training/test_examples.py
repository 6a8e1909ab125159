"""The example scripts.

Syntax, a dry argument check of the 1B14B recipe, the SLURM script rendered with fake SLURM
variables, and the CPU quickstart end to end (short).

Run: ``OMP_NUM_THREADS=1 .venv/bin/python -m pytest tests/training/test_examples.py -q``
"""

from __future__ import annotations

import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from train_runs import clean_env

REPO = Path(__file__).resolve().parents[2]
SCRIPTS = sorted(str(p.relative_to(REPO)) for p in (REPO / "examples").rglob("*")
                 if p.suffix in (".sh", ".sbatch"))


def _env(**extra) -> dict:
    return clean_env(PY=sys.executable, **extra)


@pytest.mark.parametrize("script", SCRIPTS)
def test_example_syntax(script):
    subprocess.run(["bash", "-n", script], cwd=REPO, check=True)


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory) -> str:
    """A small sentencepiece model trained on the embedded corpus with the project's tool."""
    from megatron_emo.preprocessing import sample_corpus_files

    prefix = tmp_path_factory.mktemp("tok") / "tok"
    subprocess.run([sys.executable, "tools/train_tokenizer.py",
                    "--input", *sample_corpus_files()[:2],
                    "--vocab-size", "512", "--output-prefix", str(prefix)],
                   cwd=REPO, check=True, env=_env(), capture_output=True)
    return f"{prefix}.model"


@pytest.mark.parametrize("script", ["examples/02_train_emo_1b14b.sh",
                                    "examples/02b_train_stdmoe_1b14b.sh"])
def test_recipe_flags_pass_dry_run(script, sp_model):
    """Every flag of the 128-GPU recipe parses and passes Megatron's and EMO's checks."""
    env = _env(DRY_RUN="1", NNODES="16", NGPU="8", TOKENIZER_TYPE="SentencePieceTokenizer",
               TOKENIZER_MODEL=sp_model)
    proc = subprocess.run(["bash", script], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [ln for ln in proc.stdout.splitlines() if "arguments OK" in ln]
    assert line, proc.stdout[-2000:]
    assert "world size 128" in line[0] and "EP 8" in line[0] and "DP 128" in line[0]
    # The EP-balanced layout: 127 routed + 1 padding expert, the shared expert as SharedExpertMLP.
    assert ("16 layers, 128 experts (127 routed, 1 padding, 0 shared in the router; shared "
            "expert MLP 1024), top-7") in line[0]
    assert "1024 x 4096 tokens per step" in line[0]
    routing = "standard" if "stdmoe" in script else "emo"
    assert f"routing {routing}, pools 8...128 (eval 32)" in line[0]


def test_sbatch_renders_with_fake_slurm(tmp_path):
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    scontrol = fake_bin / "scontrol"
    scontrol.write_text("#!/usr/bin/env bash\n"
                        "printf 'node-a17\\nnode-a18\\nnode-a19\\nnode-a20\\n'\n")
    scontrol.chmod(scontrol.stat().st_mode | stat.S_IEXEC)
    env = _env(PATH=f"{fake_bin}:{os.environ['PATH']}", DRY_RUN="1", SLURM_JOB_NUM_NODES="4",
               SLURM_JOB_NODELIST="node-a[17-20]", SLURM_JOB_ID="4242", SLURM_GPUS_ON_NODE="8",
               SLURM_SUBMIT_DIR=str(REPO), RUN_DIR=str(tmp_path / "run"),
               CONTAINER_IMAGE="nvcr.io#nvidia/pytorch:25.10-py3")
    proc = subprocess.run(["bash", "examples/slurm/train_emo.sbatch"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "job 4242: 4 nodes x 8 GPUs, rendezvous node-a17:29500" in out
    srun = [ln for ln in out.splitlines() if ln.startswith("srun")][0]
    assert "--container-image" in srun and "--nodes 4" in srun
    assert re.search(r"torchrun\\? --nnodes\\? 4", srun) or "--nnodes 4" in srun.replace("\\", "")
    assert "node-a17:29500" in srun and "megatron_emo.train" in srun
    assert ("--emo-routing" in srun and "--load" in srun
            and str(tmp_path / "run") in srun.replace("\\", ""))


def test_quickstart_end_to_end(tmp_path):
    """The README's main command (short: 30 iterations, install skipped: the suite runs in it)."""
    out = tmp_path / "qs"
    env = _env(TRAIN_ITERS="30", SKIP_INSTALL="1", REPORT_DOCS="8", MASTER_PORT="29731")
    proc = subprocess.run(["bash", "examples/00_quickstart_cpu.sh", str(out)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    losses = [float(x) for x in
              re.findall(r"lm loss: ([\d.E+-]+)", (out / "train.log").read_text())]
    assert len(losses) >= 3 and losses[-1] < losses[0] - 0.5, losses  # iterations 1, 10, 20, 30
    assert (out / "checkpoints" / "latest_checkpointed_iteration.txt").read_text().strip() == "30"
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    import json

    config = json.loads((out / "hf" / "config.json").read_text())
    assert (config["eos_token_id"], config["pad_token_id"]) == (2, 3)  # the sentencepiece ids
    assert (out / "report" / "report.html").exists()
    assert (out / "subsets" / "math-keep4" / "selection.json").exists()
    assert "quickstart done" in proc.stdout
    # Quiet: none of megatron_emo/quiet.py's messages in the terminal (the tools' output and the
    # filtered training lines) nor, for the CPU ones, in the raw --cpu training log.
    from megatron_emo.quiet import KNOWN_MESSAGES

    terminal, log = proc.stdout + proc.stderr, (out / "train.log").read_text()
    assert [m.source for m in KNOWN_MESSAGES if re.search(m.pattern, terminal)
            or (m.scope == "cpu" and re.search(m.pattern, log))] == []
    assert "[EMO routing] iteration" in terminal and "error:" not in terminal
