"""The paper's claim at toy scale: EMO's domain-selected expert subsets lose less than a standard
MoE's.

Trains a tiny EMO model and a tiny standard MoE (``--emo-routing standard``) with the same
model, data, seed and budget on the embedded corpus (``examples/00_quickstart_cpu.sh``, CPU),
then runs the modularity report on each (``megatron_emo.subsets.build_modularity_report``:
per domain, experts selected on half of the domain's documents, loss on the other half) and
prints full-model loss and the loss with 25% and 12.5% of the experts (shared expert included).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_modularity.py [--iters 600] [--out runs/bench_modularity]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def train(routing: str, out: str, iters: int, seed_port: int) -> float:
    env = dict(os.environ, ROUTING=routing, TRAIN_ITERS=str(iters), SKIP_INSTALL="1",
               SKIP_REPORT="1", MASTER_PORT=str(seed_port), PY=sys.executable,
               OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    start = time.time()
    proc = subprocess.run(["bash", "examples/00_quickstart_cpu.sh", out], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{routing} training failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return time.time() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iters", type=int, default=600, help="training iterations per model")
    parser.add_argument("--out", default="runs/bench_modularity")
    parser.add_argument("--max-docs", type=int, default=60, help="documents per domain in the report")
    parser.add_argument("--method", choices=["global", "greedy-layerwise"], default="global")
    args = parser.parse_args()
    sys.path.insert(0, REPO_ROOT)
    from megatron_emo.subsets import build_modularity_report

    fractions = (0.125, 0.25)
    results = {}
    for i, routing in enumerate(("emo", "standard")):
        out = os.path.join(args.out, routing)
        seconds = train(routing, out, args.iters, 29800 + i)
        report = build_modularity_report(
            os.path.join(out, "hf"), os.path.join(out, "data", "emo_sample_text_document"),
            os.path.join(out, "report"), max_docs_per_domain=args.max_docs, fractions=fractions,
            method=args.method, device="cpu",
        )
        results[routing] = {"train_seconds": seconds, "losses": report["losses"],
                            "specialisation": report["specialisation"]}
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)

    domains = list(results["emo"]["losses"])
    print(f"\n{args.iters} iterations each (seed 1234, quickstart model: 4 layers, 16 experts = 15 + 1 "
          f"shared, top-4), {args.method} selection on half of each domain's first {args.max_docs} "
          f"documents, held-out loss on the other half\n")
    print("| model | domain | full loss | 25% experts | 12.5% experts | +loss 25% | +loss 12.5% |")
    print("|---|---|---:|---:|---:|---:|---:|")
    summary = {}
    for routing, res in results.items():
        deltas = {f: [] for f in fractions}
        for domain in domains + ["mean"]:
            if domain == "mean":
                full = sum(res["losses"][d]["full_loss"] for d in domains) / len(domains)
                sub = {f: full + sum(deltas[f]) / len(deltas[f]) for f in fractions}
            else:
                entry = res["losses"][domain]
                full = entry["full_loss"]
                sub = {s["fraction"]: s["loss"] for s in entry["subsets"]}
                for f in fractions:
                    deltas[f].append(sub[f] - full)
            print(f"| {routing} | {domain} | {full:.3f} | {sub[0.25]:.3f} | {sub[0.125]:.3f} | "
                  f"{sub[0.25] - full:+.3f} | {sub[0.125] - full:+.3f} |")
        summary[routing] = {f: sum(deltas[f]) / len(deltas[f]) for f in fractions}
    print("\nmean loss increase, EMO vs standard: "
          + ", ".join(f"{int(f * 1000) / 10}% experts: {summary['emo'][f]:+.3f} vs "
                      f"{summary['standard'][f]:+.3f}" for f in (0.25, 0.125)))
    print("train seconds: " + ", ".join(f"{k} {v['train_seconds']:.0f}" for k, v in results.items()))


if __name__ == "__main__":
    main()
