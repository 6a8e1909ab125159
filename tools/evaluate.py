"""Score EMO checkpoints (full or pruned) on lm-eval tasks, offline, and print a table.

    python tools/evaluate.py MODEL [MODEL ...] [--tasks emo_mc] [--tokenizer DIR_OR_SPM_MODEL]
        [--num-fewshot K] [--limit N] [--batch-size 8] [--device cpu] [--dtype float32]
        [--include-path MY_TASKS] [--task-dir runs/lm_eval_tasks] [--output results.json]

MODEL is an EMO HF directory (lm-eval's HF backend loads it with ``trust_remote_code``) or a
Megatron torch_dist checkpoint (exported to HF first). ``--tasks`` is a comma-separated list of
lm-eval task or group names: ``emo_mc`` (all domains) or ``emo_mc_<domain>`` are the offline
multiple-choice tasks built from the embedded corpus (written to ``--task-dir``, no download);
any other name is looked up in ``--include-path`` and lm-eval's own tasks (their datasets must be
available locally when the machine is offline). The same as a plain lm-eval command:

    lm_eval --model hf --model_args pretrained=DIR,trust_remote_code=True,use_fast_tokenizer=False
        --include_path runs/lm_eval_tasks --tasks emo_mc --device cpu

(the tasks exist once this tool or ``megatron_emo.evaluation.write_local_tasks`` wrote them; the
export needs a tokenizer with a ``tokenizer_config.json`` for the plain command, while this tool
also reads a bare sentencepiece ``tokenizer.model``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile

_TOOLS_DIR = os.path.dirname(os.path.abspath(__file__))
# NOTE: this file's name shadows the ``evaluate`` package that some lm-eval tasks import, so the
# tools directory (sys.path[0] when run as a script) leaves the path; the repository joins it.
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _TOOLS_DIR]
sys.path.insert(0, os.path.dirname(_TOOLS_DIR))


def main(argv=None) -> dict:
    """Evaluates the models, prints the table and returns it (model -> task -> metric)."""
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("models", nargs="+", help="EMO HF directories or Megatron checkpoints")
    parser.add_argument("--tasks", default="emo_mc", help="comma-separated lm-eval tasks/groups")
    parser.add_argument("--tokenizer", help="HF tokenizer directory or sentencepiece .model "
                        "(default: the model directory's)")
    parser.add_argument("--num-fewshot", type=int, help="override the tasks' few-shot count")
    parser.add_argument("--limit", type=float, help="documents per task (fraction when < 1)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", help="cpu or cuda (default: cuda if available)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    parser.add_argument("--include-path", help="directory of your own lm-eval task YAML files")
    parser.add_argument("--task-dir", help="where the offline emo_mc tasks are written "
                        "(default runs/lm_eval_tasks)")
    parser.add_argument("--seed", type=int, default=1234, help="lm-eval seeds (few-shot draws)")
    parser.add_argument("--output", help="write {model: {task: {metric: value}}} as JSON")
    args = parser.parse_args(argv)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not tasks:
        raise ValueError(f"--tasks names no task: {args.tasks!r}")
    if args.limit is not None and args.limit <= 0:
        raise ValueError(f"--limit must be positive, got {args.limit}")
    limit = int(args.limit) if args.limit is not None and args.limit >= 1 else args.limit

    import torch

    from megatron_emo.evaluation import evaluate_model, summarize_results
    from megatron_emo.subsets.sources import resolve_hf_dir

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    table: dict[str, dict[str, dict[str, float]]] = {}
    workdir = tempfile.mkdtemp(prefix="emo_eval_")
    try:
        for i, model in enumerate(args.models):
            hf_dir = resolve_hf_dir(model, os.path.join(workdir, str(i)),
                                    tokenizer=args.tokenizer)
            results = evaluate_model(hf_dir, tasks, tokenizer=args.tokenizer, device=device,
                                     dtype=args.dtype, batch_size=args.batch_size,
                                     num_fewshot=args.num_fewshot, limit=limit,
                                     include_path=args.include_path, task_dir=args.task_dir,
                                     seed=args.seed)
            table[model] = summarize_results(results)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    names = sorted({t for rows in table.values() for t in rows})
    print("\n| task | metric | " + " | ".join(table) + " |")
    print("|---|---|" + "---:|" * len(table))
    for task in names:
        metrics = sorted({m for rows in table.values() for m in rows.get(task, {})
                          if m.startswith("acc")})
        for metric in metrics:
            cells = [rows.get(task, {}).get(metric) for rows in table.values()]
            print(f"| {task} | {metric} | "
                  + " | ".join("-" if c is None else f"{c:.4f}" for c in cells) + " |")
    if args.output:
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        with open(args.output, "w") as f:
            json.dump(table, f, indent=1)
        print(f"wrote {args.output}")
    return table


if __name__ == "__main__":
    from megatron_emo.cli import run_tool

    sys.exit(run_tool(main))
