"""Helpers that run ``python -m megatron_emo.train --cpu`` on a tiny corpus in subprocesses.

``pretrain()`` owns process-global Megatron state, so every run is its own process (torchrun for
2 ranks).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from helpers import free_port

REPO_ROOT = Path(__file__).resolve().parents[2]
VOCAB = 128
EOD = VOCAB - 1  # NullTokenizer's EOD

TINY_MODEL_ARGS = [
    "--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4",
    "--ffn-hidden-size", "128", "--seq-length", "64", "--max-position-embeddings", "64",
    "--normalization", "RMSNorm", "--swiglu", "--position-embedding-type", "rope",
    "--untie-embeddings-and-output-weights", "--disable-bias-linear",
    "--hidden-dropout", "0", "--attention-dropout", "0",  # the EMO recipe trains without dropout
    "--make-vocab-size-divisible-by", "64",  # padded vocabulary 128 at TP = 1 and TP = 2 alike
]
TINY_MOE_ARGS = [
    "--num-experts", "8", "--moe-router-topk", "3", "--moe-ffn-hidden-size", "64",
    "--moe-router-load-balancing-type", "aux_loss", "--moe-aux-loss-coeff", "0.01",
    "--moe-z-loss-coeff", "0.001", "--moe-token-dispatcher-type", "alltoall",
    "--moe-router-dtype", "fp32",
]
TINY_EMO_ARGS = [
    "--emo-pool-size-min", "2", "--emo-pool-size-max", "7", "--emo-pool-size-eval", "4",
    "--emo-num-shared-experts", "1",
]
CPU_ARGS = [
    "--cpu", "--transformer-impl", "local", "--clip-grad", "0", "--use-cpu-initialization",
    "--no-gradient-accumulation-fusion", "--no-masked-softmax-fusion", "--no-bias-swiglu-fusion",
    "--no-bias-dropout-fusion", "--no-rope-fusion", "--no-persist-layer-norm",
    "--attention-backend", "local", "--spec", "local",
]


def make_corpus(prefix: str, *, num_docs: int = 300) -> str:
    """A learnable tiny corpus: 5 'domains' of arithmetic token patterns, EOD-terminated."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    rng = np.random.default_rng(0)
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.int32)
    for d in range(num_docs):
        n = int(rng.integers(5, 120))
        domain = d % 5
        toks = domain * 20 + (np.arange(n) * (domain + 1) + int(rng.integers(0, 20))) % 20 + 1
        builder.add_document(np.concatenate([toks, [EOD]]).astype(np.int32), [n + 1])
    builder.finalize(prefix + ".idx")
    return prefix


def train_args(
    data_prefix: str, out_dir: str, *, train_iters: int, extra: list[str] = ()
) -> list[str]:
    """The full flag list of a tiny CPU run writing to ``out_dir``."""
    return [
        *CPU_ARGS, *TINY_MODEL_ARGS, *TINY_MOE_ARGS, *TINY_EMO_ARGS,
        "--micro-batch-size", "2", "--global-batch-size", "4", "--train-iters", str(train_iters),
        "--lr", "3e-3", "--min-lr", "3e-4", "--lr-decay-style", "cosine", "--lr-warmup-iters", "2",
        "--weight-decay", "0.1", "--seed", "1234",
        "--tokenizer-type", "NullTokenizer", "--vocab-size", str(VOCAB),
        "--data-path", data_prefix, "--split", "98,1,1", "--dataloader-inter-document-masking",
        "--log-interval", "1", "--eval-interval", "1000", "--eval-iters", "1",
        "--tensorboard-dir", os.path.join(out_dir, "tb"),
        "--data-cache-path", os.path.join(out_dir, "cache"),
        *extra,
    ]


def clean_env(**extra: str) -> dict[str, str]:
    """The environment for a child run: repo on PYTHONPATH, one thread, no ``NVTE_*`` variables.

    Megatron's argument validation in an earlier in-process test sets ``NVTE_FLASH_ATTN`` and
    friends in ``os.environ`` (from ``--attention-backend``), and a child ``pretrain()`` refuses
    them when they disagree with its own backend.
    """
    pythonpath = os.pathsep.join(x for x in (str(REPO_ROOT), os.environ.get("PYTHONPATH")) if x)
    env = {k: v for k, v in os.environ.items() if not k.startswith("NVTE_")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=pythonpath, **extra)
    return env


def run_train(
    args: list[str], *, nproc: int = 1, timeout: int = 300
) -> subprocess.CompletedProcess:
    """Runs the entry point (torchrun for ``nproc > 1``); returns the completed process."""
    env = clean_env()
    if nproc == 1:
        env.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(free_port()))
        cmd = [sys.executable, "-m", "megatron_emo.train", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
               f"--master-port={free_port()}", "-m", "megatron_emo.train", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env,
                          cwd=REPO_ROOT)


def tb_scalars(tb_dir: str) -> dict[str, dict[int, float]]:
    """All TensorBoard scalars under ``tb_dir``: ``{tag: {step: value}}`` (later files win)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out: dict[str, dict[int, float]] = {}
    for path in sorted(Path(tb_dir).glob("events.out.tfevents.*"), key=os.path.getmtime):
        acc = EventAccumulator(str(path), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            out.setdefault(tag, {}).update({e.step: e.value for e in acc.Scalars(tag)})
    return out


def check(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    """Raises with the run's output tail when it failed."""
    if proc.returncode != 0:
        raise AssertionError(
            f"train exited {proc.returncode}:\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"
        )
    return proc
