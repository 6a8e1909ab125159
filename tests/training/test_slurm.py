"""A real SLURM launch of ``examples/slurm/train_emo.sbatch`` on a one-node local cluster.

The cluster comes from ``tools/local_slurm.sh`` (munge, slurmctld and slurmd on localhost; Debian's
packages are installed when missing). It runs in ``--cpu`` mode with 2 processes (EP=2, distributed
optimizer) on the tiny corpus: the first job stops at iteration 3 like a job reaching its time
limit, the resubmitted job resumes from its checkpoint. Skipped, saying why, only where SLURM can
neither be found running nor be installed and started (no root or no apt-get). Run:
``OMP_NUM_THREADS=1 .venv/bin/python -m pytest tests/training/test_slurm.py -q``
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from helpers import free_port
from train_runs import REPO_ROOT, VOCAB, clean_env, make_corpus, tb_scalars

SBATCH = str(REPO_ROOT / "examples" / "slurm" / "train_emo.sbatch")
JOB_NAME = "emo-cpu-smoke"


@pytest.fixture(scope="module")
def cluster():
    proc = subprocess.run(["bash", str(REPO_ROOT / "tools" / "local_slurm.sh")],
                          capture_output=True, text=True, timeout=1200)
    if proc.returncode == 3:
        pytest.skip(f"no SLURM on this machine and it cannot be set up: {proc.stderr.strip()}")
    assert proc.returncode == 0, proc.stdout + proc.stderr


def _sbatch(submit_dir, env) -> tuple[str, str]:
    """Submits the sbatch, waits for the job; returns (job id, the job's log)."""
    proc = subprocess.run(
        ["sbatch", "--parsable", "--wait", "--job-name", JOB_NAME, "--nodes", "1",
         "--gpus-per-node", "0", "--cpus-per-task", str(os.cpu_count() or 2), SBATCH],
        cwd=submit_dir, env=env, capture_output=True, text=True, timeout=1200,
    )
    job_id = proc.stdout.strip().split(";")[0]
    log = submit_dir / "logs" / f"{JOB_NAME}-{job_id}.out"  # the sbatch's --output=logs/%x-%j.out
    text = log.read_text() if log.exists() else "(no log)"
    assert proc.returncode == 0, f"sbatch exited {proc.returncode}: {proc.stderr}\n{text[-6000:]}"
    assert log.exists(), f"job {job_id}: no log at {log}"
    return job_id, text


def test_sbatch_trains_on_cpu_and_resubmission_resumes(cluster, tmp_path):
    corpus = make_corpus(str(tmp_path / "docs"))
    submit_dir = tmp_path / "submit"
    (submit_dir / "logs").mkdir(parents=True)
    run_dir = tmp_path / "run"
    venv_bin = os.path.dirname(sys.executable)
    env = clean_env(
        PATH=f"{venv_bin}:{os.environ['PATH']}", REPO=str(REPO_ROOT),
        RECIPE="examples/slurm/cpu_tiny_args.sh", NGPU="2", RUN_DIR=str(run_dir),
        DATA_PATH=corpus, TOKENIZER_TYPE="NullTokenizer", VOCAB_SIZE=str(VOCAB), TRAIN_ITERS="5",
        MASTER_PORT=str(free_port()),
    )
    latest = run_dir / "checkpoints" / "latest_checkpointed_iteration.txt"

    # First job: stops after iteration 3 (--exit-interval), saving a checkpoint.
    job1, log1 = _sbatch(submit_dir, dict(env, EXIT_INTERVAL="3"))
    assert f"job {job1}: 1 nodes x 2 GPUs, rendezvous" in log1
    assert "using world size: 2" in log1  # torchrun started 2 processes under srun
    assert re.search(r"expert_model_parallel_size \.+ 2\n", log1)
    assert re.search(r"  cpu \.+ True\n", log1)
    assert re.search(r"iteration +3/ +5", log1) and not re.search(r"iteration +4/ +5", log1)
    assert "exiting program at iteration 3" in log1
    assert latest.read_text().strip() == "3"

    # Resubmission: the same script resumes from the checkpoint and finishes.
    job2, log2 = _sbatch(submit_dir, env)
    assert job2 != job1
    assert f"successfully loaded checkpoint from {run_dir / 'checkpoints'}" in log2
    assert "at iteration 3" in log2
    assert not re.search(r"iteration +[1-3]/ +5", log2)
    assert re.search(r"iteration +5/ +5", log2)
    assert latest.read_text().strip() == "5"
    scalars = tb_scalars(str(run_dir / "tensorboard"))
    assert sorted(scalars["lm loss"]) == [1, 2, 3, 4, 5]
    assert all(scalars["emo/in_pool_fraction"][s] == 1.0 for s in range(1, 6))
