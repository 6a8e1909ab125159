"""EMO's selective-use claims at toy scale, with seeds: EMO vs standard-MoE expert subsets on CPU.

Trains the quickstart model (``examples/00_quickstart_cpu.sh``) with ``--emo-routing emo`` and
``--emo-routing standard`` for each seed, anneals each standard model under EMO routing
(``examples/06_emo_anneal.sh``; with ``--control`` also continues it as long under standard
routing). Trained models are cached in ``--cache`` (a rerun only trains what is missing). Then
for every model and domain of the embedded corpus (selection on one half of the domain's first
``--max-docs`` documents, held-out loss on the other half; ``report.split_halves``):

* held-out loss at 12.5 / 25 / 50% of the experts (shared included): own-domain subsets
  (greedy-layerwise on all selection documents) vs random subsets (3 draws);
* calibration size at 25%: 1, 4, 16 and all selection documents (subsample seed = model seed);
* selection methods at 25%: global, greedy-layerwise, easy-ep, random;
* local-task accuracy (``emo_mc_<domain>``, first 40 test items, lm-eval): full model, own
  subset at 25% (calibration: 16 task validation prompts) and a random 25% subset;
* a short subset fine-tune of the EMO and standard models (the task's own 25% subset, HF
  Trainer on 100 of the task's training prompts, 1 epoch, lr 1e-3): loss on 100 task test
  documents (disjoint from the training prompts) and task accuracy, before and after.

Subsets are applied by gate masking (``pruning.mask_experts``: equal to the pruned model to
1e-5). Tables print mean +- sd over the seeds of the per-domain mean.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_modularity.py [--iters 300]
        [--anneal-iters 50] [--control] [--seeds 1,2,3] [--cache runs/bench_modularity]
        [--jobs 2] [--max-docs 40] [--stage train|eval|all|tables]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FRACTIONS = (0.125, 0.25, 0.5)
CALIBRATION_SIZES = (1, 4, 16, None)  # None: all selection documents
METHODS = ("global", "greedy-layerwise", "easy-ep", "random")
NUM_RANDOM = 3
TASK_LIMIT = 40
FINETUNE_DOCS = 100  # task train prompts (fine-tune) and test documents (their loss)


def _env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("NVTE_")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=REPO_ROOT, PY=sys.executable, SKIP_INSTALL="1",
               **extra)
    return env


def _run(cmd: list[str], env: dict, log_path: str) -> float:
    start = time.time()
    with open(log_path, "w") as log:
        proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        tail = open(log_path).read()[-3000:]
        raise SystemExit(f"{' '.join(cmd)} failed ({log_path}):\n{tail}")
    return time.time() - start


def _train_base(cache: str, routing: str, seed: int, iters: int, port: int) -> None:
    out = os.path.join(cache, f"{routing}_s{seed}")
    if os.path.isfile(os.path.join(out, "hf", "config.json")):
        return
    seconds = _run(["bash", "examples/00_quickstart_cpu.sh", out],
                   _env(ROUTING=routing, TRAIN_ITERS=str(iters), SEED=str(seed), SKIP_REPORT="1",
                        MASTER_PORT=str(port)), out + ".log")
    json.dump({"train_seconds": seconds, "iters": iters}, open(os.path.join(out, "time.json"), "w"))


def _anneal(cache: str, routing: str, seed: int, iters: int, port: int) -> None:
    name = "anneal" if routing == "emo" else "control"
    out = os.path.join(cache, f"{name}_s{seed}")
    if os.path.isfile(os.path.join(out, "hf", "config.json")):
        return
    base = os.path.join(cache, f"standard_s{seed}")
    seconds = _run(["bash", "examples/06_emo_anneal.sh", out],
                   _env(LOAD=os.path.join(base, "checkpoints"), DATA_DIR=os.path.join(base, "data"),
                        ANNEAL_ITERS=str(iters), ROUTING=routing, SEED=str(seed),
                        MASTER_PORT=str(port)), out + ".log")
    json.dump({"train_seconds": seconds, "iters": iters}, open(os.path.join(out, "time.json"), "w"))


def train_all(cache: str, seeds: list[int], iters: int, anneal_iters: int, jobs: int,
              control: bool = False) -> None:
    """Trains the missing models, ``jobs`` at a time (each run is one single-threaded process)."""
    os.makedirs(cache, exist_ok=True)
    base = [(r, s) for s in seeds for r in ("emo", "standard")]
    with ThreadPoolExecutor(jobs) as pool:
        list(pool.map(lambda a: _train_base(cache, a[1][0], a[1][1], iters, 29600 + a[0]),
                      enumerate(base)))
        if anneal_iters > 0:
            runs = [(r, s) for s in seeds for r in (("emo", "standard") if control else ("emo",))]
            list(pool.map(lambda a: _anneal(cache, a[1][0], a[1][1], anneal_iters, 29700 + a[0]),
                          enumerate(runs)))


def _mean_sd(values: list[float], signed: bool = True) -> str:
    if not values:
        return "-"
    mean = statistics.fmean(values)
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:+.3f} +- {sd:.3f}" if signed else f"{mean:.3f} +- {sd:.3f}"


def evaluate_model_dir(model_dir: str, data_dir: str, task_dir: str, *, seed: int,
                       max_docs: int, finetune: bool, log=print) -> dict:
    """Every number of one model (see the module docstring)."""
    import torch

    from megatron_emo.evaluation import evaluate_model, summarize_results, task_calibration_texts
    from megatron_emo.subsets import load_domain_corpus, mask_experts, next_token_loss
    from megatron_emo.subsets.finetune import finetune_hf
    from megatron_emo.subsets.pruning import prune_hf_model
    from megatron_emo.subsets.report import fraction_keep, split_halves
    from megatron_emo.subsets.selection import select_experts
    from megatron_emo.subsets.sources import (
        examples_from_texts,
        load_hf_model,
        load_tokenizer,
        subsample_indices,
    )

    torch.manual_seed(seed)
    model = load_hf_model(os.path.join(model_dir, "hf"))
    tokenizer = load_tokenizer(os.path.join(data_dir, "tokenizer.model"))
    corpus, _ = load_domain_corpus(os.path.join(data_dir, "emo_sample_text_document"),
                                   max_docs_per_domain=max_docs, max_tokens=256)
    num_experts = model.config.num_experts
    num_shared = model.config.num_shared_experts

    def keeps(fraction):
        return fraction_keep(fraction, num_experts, num_shared)

    def loss(docs, kept=None):
        if kept is None:
            return next_token_loss(model, docs)[0]
        with mask_experts(model, kept):
            return next_token_loss(model, docs)[0]

    def task_acc(task, kept=None, lm=None):
        target = lm if lm is not None else model
        if kept is None:
            res = evaluate_model(target, [task], tokenizer=tokenizer, task_dir=task_dir,
                                 limit=TASK_LIMIT)
        else:
            with mask_experts(target, kept):
                res = evaluate_model(target, [task], tokenizer=tokenizer, task_dir=task_dir,
                                     limit=TASK_LIMIT)
        return summarize_results(res)[task]["acc"]

    out: dict = {"domains": {}}
    for domain, docs in corpus.items():
        start = time.time()
        sel_docs, held = split_halves(docs)
        row: dict = {"full_loss": loss(held), "loss": {}, "loss_random": {}, "calibration": {},
                     "methods": {}}
        for f in FRACTIONS:
            kept = select_experts(model, sel_docs, keeps(f)).experts_kept_per_layer
            row["loss"][str(f)] = loss(held, kept)
            row["loss_random"][str(f)] = statistics.fmean(
                loss(held, select_experts(model, [], keeps(f), method="random",
                                          seed=1000 * seed + r).experts_kept_per_layer)
                for r in range(NUM_RANDOM))
        for n in CALIBRATION_SIZES:
            cal = [sel_docs[i] for i in subsample_indices(len(sel_docs), n, seed)]
            kept = select_experts(model, cal, keeps(0.25)).experts_kept_per_layer
            row["calibration"]["all" if n is None else str(n)] = loss(held, kept)
        for method in METHODS:
            kept = select_experts(model, sel_docs, keeps(0.25), method=method,
                                  seed=1000 * seed).experts_kept_per_layer
            row["methods"][method] = loss(held, kept)
        # Task accuracy: calibration = 16 validation prompts of the domain's task.
        task = f"emo_mc_{domain}"
        texts = task_calibration_texts(task, num_examples=16, seed=seed, task_dir=task_dir)
        cal = examples_from_texts(texts, tokenizer, vocab_size=model.config.vocab_size,
                                  max_length=256, source=task).sequences
        acc = {"full": task_acc(task)}
        task_kept = {}
        for f in (0.25,):
            task_kept[f] = select_experts(model, cal, keeps(f)).experts_kept_per_layer
            acc[f"own_{f}"] = task_acc(task, task_kept[f])
        acc["random_0.25"] = task_acc(task, select_experts(
            model, [], keeps(0.25), method="random", seed=1000 * seed).experts_kept_per_layer)
        row["task_acc"] = acc
        if finetune:
            import copy

            # Held out from the fine-tune: the task's test documents (whole texts), disjoint
            # from its train split (the domain's held-out half may overlap the train split).
            test_docs = examples_from_texts(
                [json.loads(line)["text"] for line in
                 open(os.path.join(task_dir, f"{domain}_test.jsonl"))][:FINETUNE_DOCS],
                tokenizer, vocab_size=model.config.vocab_size, max_length=256,
                source=task).sequences
            pruned = prune_hf_model(copy.deepcopy(model), task_kept[0.25])
            train = examples_from_texts(
                task_calibration_texts(task, split="train", num_fewshot=0, task_dir=task_dir,
                                       num_examples=FINETUNE_DOCS, seed=seed),
                tokenizer, vocab_size=model.config.vocab_size, max_length=256,
                source=task).sequences
            before_loss = next_token_loss(pruned, test_docs)[0]
            result = finetune_hf(pruned, train, None, num_epochs=1, lr=1e-3, batch_size=8,
                                 seed=seed, log=lambda m: None)
            row["finetune"] = {
                "full_loss": next_token_loss(model, test_docs)[0],
                "loss_before": before_loss, "loss_after": next_token_loss(pruned, test_docs)[0],
                "acc_before": acc["own_0.25"], "acc_after": task_acc(task, lm=pruned),
                "steps": result["num_steps"]}
        out["domains"][domain] = row
        log(f"{os.path.basename(model_dir)} {domain}: {time.time() - start:.0f}s "
            f"full {row['full_loss']:.3f} 25% {row['loss']['0.25']:.3f} random "
            f"{row['loss_random']['0.25']:.3f} acc {acc}")
    return out


def _domain_mean(res: dict, fn) -> float:
    vals = [fn(row) for row in res["domains"].values()]
    return statistics.fmean(vals)


def print_tables(results: dict[str, dict]) -> None:
    """Markdown tables, mean +- sd over seeds of the domain-mean numbers."""
    kinds = [k for k in ("emo", "standard", "anneal", "control")
             if any(name.startswith(k + "_") for name in results)]
    label = {"emo": "EMO", "standard": "standard MoE", "anneal": "standard + EMO anneal",
             "control": "standard + standard continuation"}

    def over_seeds(kind, fn):
        return [_domain_mean(res, fn) for name, res in sorted(results.items())
                if name.startswith(kind + "_")]

    print("\n### Held-out loss increase over the full model (nats; own-domain vs random subsets)\n")
    print("| model | full loss | " + " | ".join(
        f"own {f:.1%} | random {f:.1%}" for f in FRACTIONS) + " |")
    print("|---|---:|" + "---:|---:|" * len(FRACTIONS))
    for kind in kinds:
        cells = [_mean_sd(over_seeds(kind, lambda r: r["full_loss"]), signed=False)]
        for f in FRACTIONS:
            cells.append(_mean_sd(over_seeds(
                kind, lambda r, f=f: r["loss"][str(f)] - r["full_loss"])))
            cells.append(_mean_sd(over_seeds(
                kind, lambda r, f=f: r["loss_random"][str(f)] - r["full_loss"])))
        print(f"| {label[kind]} | " + " | ".join(cells) + " |")

    print("\n### Calibration size (25% of experts, greedy-layerwise): loss increase\n")
    sizes = ["1", "4", "16", "all"]
    print("| model | " + " | ".join(f"{s} docs" for s in sizes) + " |")
    print("|---|" + "---:|" * len(sizes))
    for kind in kinds:
        print(f"| {label[kind]} | " + " | ".join(_mean_sd(over_seeds(
            kind, lambda r, s=s: r["calibration"][s] - r["full_loss"])) for s in sizes) + " |")

    print("\n### Selection method (25% of experts, all selection documents): loss increase\n")
    print("| model | " + " | ".join(METHODS) + " |")
    print("|---|" + "---:|" * len(METHODS))
    for kind in kinds:
        print(f"| {label[kind]} | " + " | ".join(_mean_sd(over_seeds(
            kind, lambda r, m=m: r["methods"][m] - r["full_loss"])) for m in METHODS) + " |")

    print(f"\n### Local-task accuracy (emo_mc, 4 choices, mean of 5 domains x {TASK_LIMIT} "
          f"items)\n")
    cols = [("full", "full"), ("own_0.25", "own 25%"), ("random_0.25", "random 25%")]
    print("| model | " + " | ".join(c[1] for c in cols) + " |")
    print("|---|" + "---:|" * len(cols))
    for kind in kinds:
        print(f"| {label[kind]} | " + " | ".join(_mean_sd(over_seeds(
            kind, lambda r, c=c: r["task_acc"][c[0]]), signed=False) for c in cols) + " |")

    tuned = [k for k in kinds if all("finetune" in row for name, res in results.items()
                                     if name.startswith(k + "_")
                                     for row in res["domains"].values())]
    if tuned:
        print("\n### Fine-tune of the task-selected 25% subset (loss on task test documents, "
              "increase over the full model)\n")
        print("| model | loss incr. before | loss incr. after | acc before | acc after |")
        print("|---|---:|---:|---:|---:|")
        for kind in tuned:
            ft = [
                over_seeds(kind, lambda r: r["finetune"]["loss_before"]
                           - r["finetune"]["full_loss"]),
                over_seeds(kind, lambda r: r["finetune"]["loss_after"]
                           - r["finetune"]["full_loss"]),
                over_seeds(kind, lambda r: r["finetune"]["acc_before"]),
                over_seeds(kind, lambda r: r["finetune"]["acc_after"])]
            print(f"| {label[kind]} | " + " | ".join(
                _mean_sd(v, signed=i < 2) for i, v in enumerate(ft)) + " |")


def _eval_one(args, name: str) -> None:
    """Evaluates one model in this process and caches ``eval.json``."""
    out_path = os.path.join(args.cache, name, "eval.json")
    if os.path.isfile(out_path):
        return
    seed = int(name.rsplit("_s", 1)[1])
    data_dir = os.path.join(args.cache, f"{'emo' if name.startswith('emo') else 'standard'}"
                            f"_s{seed}", "data")
    finetune = not args.no_finetune and name.split("_s")[0] in ("emo", "standard")
    res = evaluate_model_dir(os.path.join(args.cache, name), data_dir,
                             os.path.join(args.cache, "tasks"), seed=seed,
                             max_docs=args.max_docs, finetune=finetune)
    with open(out_path, "w") as f:
        json.dump(res, f, indent=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iters", type=int, default=300, help="training iterations per model")
    parser.add_argument("--anneal-iters", type=int, default=50,
                        help="EMO-anneal iterations; 0 skips the anneal")
    parser.add_argument("--control", action="store_true",
                        help="also continue each standard model as long under standard routing")
    parser.add_argument("--seeds", default="1,2,3")
    parser.add_argument("--cache", default="runs/bench_modularity")
    parser.add_argument("--jobs", type=int, default=2, help="models trained / evaluated at once")
    parser.add_argument("--max-docs", type=int, default=40, help="documents per domain")
    parser.add_argument("--no-finetune", action="store_true")
    parser.add_argument("--stage", choices=["train", "eval", "all", "tables"], default="all",
                        help="tables: print the tables of every model evaluated in --cache")
    parser.add_argument("--eval-one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    sys.path.insert(0, REPO_ROOT)
    if args.eval_one:
        _eval_one(args, args.eval_one)
        return
    seeds = [int(s) for s in args.seeds.split(",")]
    if args.stage == "tables":
        names = sorted(n for n in os.listdir(args.cache)
                       if os.path.isfile(os.path.join(args.cache, n, "eval.json")))
        print("models: " + ", ".join(names))
        print_tables({n: json.load(open(os.path.join(args.cache, n, "eval.json")))
                      for n in names})
        return
    if args.stage in ("train", "all"):
        start = time.time()
        train_all(args.cache, seeds, args.iters, args.anneal_iters, args.jobs, args.control)
        print(f"training done in {time.time() - start:.0f}s", flush=True)
    if args.stage == "train":
        return
    from megatron_emo.evaluation import write_local_tasks

    write_local_tasks(os.path.join(args.cache, "tasks"))
    kinds = (["emo", "standard"] + (["anneal"] if args.anneal_iters > 0 else [])
             + (["control"] if args.control and args.anneal_iters > 0 else []))
    names = [f"{k}_s{s}" for s in seeds for k in kinds]
    cmd = [sys.executable, os.path.abspath(__file__), "--cache", args.cache, "--max-docs",
           str(args.max_docs)] + (["--no-finetune"] if args.no_finetune else [])
    start = time.time()
    # One process per model (lm-eval state is global), each with its own datasets cache: the
    # json builder's cache is not safe for concurrent writers ("corresponds to no data").
    with ThreadPoolExecutor(args.jobs) as pool:
        list(pool.map(lambda n: _run(
            cmd + ["--eval-one", n],
            _env(HF_DATASETS_CACHE=os.path.join(os.path.abspath(args.cache), "hf_datasets", n)),
            os.path.join(args.cache, f"{n}.eval.log")), names))
    print(f"evaluation done in {time.time() - start:.0f}s", flush=True)
    results = {n: json.load(open(os.path.join(args.cache, n, "eval.json"))) for n in names}
    times = {n: json.load(open(os.path.join(args.cache, n, "time.json")))["train_seconds"]
             for n in names if os.path.isfile(os.path.join(args.cache, n, "time.json"))}
    print(f"\n{len(seeds)} seeds; {args.iters} iterations per base model (quickstart model: 4 "
          f"layers, d 128, 16 experts = 15 + 1 shared, top-4), anneal +"
          f"{args.anneal_iters}; training seconds: "
          + ", ".join(f"{n} {t:.0f}" for n, t in times.items()))
    print_tables(results)


if __name__ == "__main__":
    main()
