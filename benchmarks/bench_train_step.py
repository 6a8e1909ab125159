"""Training-step throughput through the real entry point: EMO routing vs ``--emo-routing standard``.

Builds a random-document corpus (NullTokenizer ids, geometric document lengths), runs
``python -m megatron_emo.train`` once per routing mode with the same model, data and seed, and
prints a table of step time and tokens/s from Megatron's own per-iteration timer (median over
the iterations after ``--warmup``), with EMO's ratio to the standard baseline of the same run.

GPU (1B14B-shaped proxy: d 2048, 16 heads, 128 experts = 127 + 1 shared of 1024, top-8,
seq 4096, bf16, local spec unless TE imports)::

    .venv/bin/python benchmarks/bench_train_step.py --preset gpu-proxy

CPU (tiny, checks the plumbing; timings are not meaningful for GPUs)::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_train_step.py --preset cpu-tiny
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile

import numpy as np

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PRESETS = {
    "gpu-proxy": dict(
        vocab=50304, seq=4096, mbs=1, layers=2, hidden=2048, heads=16, experts=128, shared=1,
        topk=8, expert_ffn=1024, ffn=8192, iters=12, mean_doc=1024,
        extra=["--bf16", "--clip-grad", "1.0", "--no-masked-softmax-fusion"],
    ),
    "cpu-tiny": dict(
        vocab=128, seq=256, mbs=2, layers=2, hidden=64, heads=4, experts=8, shared=1, topk=3,
        expert_ffn=64, ffn=128, iters=10, mean_doc=60,
        extra=["--cpu", "--clip-grad", "0", "--use-cpu-initialization"],
    ),
}


def make_corpus(prefix: str, *, vocab: int, num_tokens: int, mean_doc: int, seed: int = 0) -> None:
    """Random documents (geometric lengths, EOD = vocab - 1) as a Megatron IndexedDataset."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    rng = np.random.default_rng(seed)
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.int32)
    written = 0
    while written < num_tokens:
        n = int(rng.geometric(1.0 / mean_doc))
        doc = np.concatenate([rng.integers(0, vocab - 1, n), [vocab - 1]]).astype(np.int32)
        builder.add_document(doc, [len(doc)])
        written += len(doc)
    builder.finalize(prefix + ".idx")


def train_command(p: dict, data: str, out: str, routing: str, te: bool) -> list[str]:
    impl = ["--transformer-impl", "transformer_engine", "--moe-grouped-gemm"] if te else [
        "--transformer-impl", "local", "--attention-backend", "local", "--spec", "local"]
    cpu_off = ["--no-gradient-accumulation-fusion", "--no-bias-swiglu-fusion",
               "--no-bias-dropout-fusion", "--no-rope-fusion", "--no-persist-layer-norm"]
    return [
        sys.executable, "-m", "megatron_emo.train", *impl, *(cpu_off if not te else []),
        "--num-layers", str(p["layers"]), "--hidden-size", str(p["hidden"]),
        "--num-attention-heads", str(p["heads"]), "--ffn-hidden-size", str(p["ffn"]),
        "--seq-length", str(p["seq"]), "--max-position-embeddings", str(p["seq"]),
        "--normalization", "RMSNorm", "--norm-epsilon", "1e-6", "--swiglu",
        "--position-embedding-type", "rope", "--rotary-base", "500000",
        "--untie-embeddings-and-output-weights", "--disable-bias-linear",
        "--hidden-dropout", "0", "--attention-dropout", "0",
        "--num-experts", str(p["experts"]), "--moe-router-topk", str(p["topk"]),
        "--moe-ffn-hidden-size", str(p["expert_ffn"]),
        "--moe-router-load-balancing-type", "aux_loss",
        "--moe-aux-loss-coeff", "0.1", "--moe-z-loss-coeff", "0.001", "--moe-router-dtype", "fp32",
        "--moe-token-dispatcher-type", "alltoall",
        "--emo-routing", routing, "--emo-num-shared-experts", str(p["shared"]),
        "--emo-pool-size-min", str(p["topk"]), "--emo-pool-size-max", str(p["experts"]),
        "--emo-pool-size-eval", str(min(32, p["experts"] - p["shared"])),
        "--micro-batch-size", str(p["mbs"]), "--global-batch-size", str(p["mbs"]),
        "--train-iters", str(p["iters"]), "--lr", "4e-3", "--min-lr", "4e-4",
        "--lr-decay-style", "cosine", "--lr-warmup-iters", "2", "--weight-decay", "0.1",
        "--adam-beta1", "0.9", "--adam-beta2", "0.95", "--seed", "1234",
        "--tokenizer-type", "NullTokenizer", "--vocab-size", str(p["vocab"]),
        "--data-path", data, "--split", "100,0,0", "--dataloader-inter-document-masking",
        "--log-interval", "1", "--eval-iters", "0", "--eval-interval", "100000",
        "--data-cache-path", os.path.join(out, "cache"), "--no-emo-log-routing-metrics",
        *p["extra"],
    ]


_ITER = re.compile(r"iteration\s+(\d+)/\s*\d+ .*?elapsed time per iteration \(ms\): ([\d.]+)"
                   r".*?lm loss: ([\dE+.-]+)")


def run_mode(p: dict, data: str, routing: str, te: bool, warmup: int) -> dict:
    with tempfile.TemporaryDirectory() as out:
        pythonpath = os.pathsep.join(x for x in (REPO_ROOT, os.environ.get("PYTHONPATH")) if x)
        env = dict(os.environ, PYTHONPATH=pythonpath, RANK="0", WORLD_SIZE="1", LOCAL_RANK="0",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ.get("MASTER_PORT", "29533"))
        proc = subprocess.run(train_command(p, data, out, routing, te), capture_output=True,
                              text=True, env=env, cwd=REPO_ROOT)
    if proc.returncode != 0:
        raise SystemExit(f"{routing} run failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n"
                         f"{proc.stderr[-5000:]}")
    rows = [(int(i), float(ms), float(loss)) for i, ms, loss in _ITER.findall(proc.stdout)]
    timed = [ms for i, ms, _ in rows if i > warmup]
    step_ms = statistics.median(timed)
    return {"step_ms": step_ms, "tokens_per_s": p["mbs"] * p["seq"] / (step_ms / 1e3),
            "losses": [loss for _, _, loss in rows]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu-tiny")
    parser.add_argument("--warmup", type=int, default=3, help="iterations left out of the median")
    parser.add_argument("--te", action="store_true", help="TE spec with grouped GEMM (needs TE)")
    parser.add_argument("--iters", type=int, default=None, help="override the preset's iterations")
    parser.add_argument("--emo-first", action="store_true", help="run EMO before the baseline")
    args = parser.parse_args()
    p = dict(PRESETS[args.preset])
    if args.iters:
        p["iters"] = args.iters
    order = ("emo", "standard") if args.emo_first else ("standard", "emo")
    with tempfile.TemporaryDirectory() as tmp:
        data = os.path.join(tmp, "docs")
        make_corpus(data, vocab=p["vocab"], num_tokens=p["seq"] * p["mbs"] * (p["iters"] + 4) * 2,
                    mean_doc=p["mean_doc"])
        results = {mode: run_mode(p, data, mode, args.te, args.warmup) for mode in order}
    base = results["standard"]["step_ms"]
    print(f"\npreset {args.preset}: {p['layers']} layers, d {p['hidden']}, {p['experts']} experts "
          f"({p['shared']} shared) of {p['expert_ffn']}, top-{p['topk']}, "
          f"seq {p['seq']} x mbs {p['mbs']}, "
          f"{'TE' if args.te else 'local'} spec; median over iterations > {args.warmup}; run order "
          f"{' then '.join(order)}\n")
    print("| routing | step ms | tokens/s | step time vs standard |")
    print("|---|---:|---:|---:|")
    for mode in ("standard", "emo"):
        r = results[mode]
        print(f"| {mode} | {r['step_ms']:.1f} | {r['tokens_per_s']:.0f} | "
              f"{r['step_ms'] / base:.3f}x |")
    for mode, r in results.items():
        print(f"{mode} losses: " + " ".join(f"{x:.3f}" for x in r["losses"]))


if __name__ == "__main__":
    main()
