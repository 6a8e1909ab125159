"""Helpers to fine-tune an expert subset (the output of ``tools/select_experts.py``) on a task.

    python tools/finetune_subset.py megatron-flags SUBSET/hf [--shared-layout auto] [--ep 1]
        # the Megatron model flags of the pruned model, one line (for --load SUBSET/megatron;
        # the same --shared-layout and --ep as select_experts was given)
    python tools/finetune_subset.py task-data emo_mc_math OUT.jsonl [--split train]
        [--num-fewshot 0] [--num-examples N] [--seed 0] [--include-path MY_TASKS]
        # the task's documents (prompt + gold answer) as {"text": ...} JSONL for preprocess_data
    python tools/finetune_subset.py hf SUBSET/hf OUTPUT_DIR
        (--task emo_mc_math | --examples X.jsonl)
        [--epochs 1] [--lr 5e-5] [--batch-size 8] [--grad-accum 1] [--max-steps N]
        [--tokenizer DIR_OR_SPM_MODEL] [--seed 0]
        # the Hugging Face route: transformers Trainer on the pruned export

The Megatron route is ``examples/05_finetune_subset.sh`` (``python -m megatron_emo.train
--finetune --load SUBSET/megatron ...`` with these flags, then ``to-hf``).
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None) -> None:
    """Parses the command line and runs megatron-flags, task-data or hf."""
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawTextHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    flags = sub.add_parser("megatron-flags", help="Megatron model flags of a pruned HF model")
    flags.add_argument("hf_dir")
    flags.add_argument("--shared-layout", choices=["auto", "mlp", "router"], default="auto",
                       help="as given to select_experts (default auto)")
    flags.add_argument("--ep", type=int, default=1,
                       help="expert-parallel size of the Megatron export (as select_experts --ep)")
    data = sub.add_parser("task-data", help="an lm-eval task's documents as text JSONL")
    data.add_argument("task")
    data.add_argument("output")
    for p in (data,):
        p.add_argument("--split", default="train", choices=["train", "validation", "test"])
        p.add_argument("--num-fewshot", type=int, default=0)
    hf = sub.add_parser("hf", help="fine-tune the pruned HF export with transformers.Trainer")
    hf.add_argument("hf_dir")
    hf.add_argument("output")
    source = hf.add_mutually_exclusive_group(required=True)
    source.add_argument("--task", help="lm-eval task whose train split is the training data")
    source.add_argument("--examples", help="JSONL with 'text' or 'tokens' records")
    hf.add_argument("--epochs", type=float, default=1.0)
    hf.add_argument("--lr", type=float, default=5e-5)
    hf.add_argument("--batch-size", type=int, default=8)
    hf.add_argument("--grad-accum", type=int, default=1)
    hf.add_argument("--max-steps", type=int, default=-1)
    hf.add_argument("--tokenizer", help="HF tokenizer directory or sentencepiece .model")
    for p in (data, hf):
        p.add_argument("--num-examples", type=int, help="subsample the documents")
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--include-path", help="directory of your own lm-eval task YAML files")
        p.add_argument("--task-dir", help="where the offline emo_mc tasks are written")
    args = parser.parse_args(argv)

    if args.command == "megatron-flags":
        from megatron_emo.subsets.finetune import subset_model_flags

        print(" ".join(subset_model_flags(args.hf_dir, args.shared_layout, args.ep)))
        return
    if args.num_examples is not None and args.num_examples < 1:
        raise ValueError(f"--num-examples must be at least 1, got {args.num_examples}")
    if args.command == "task-data":
        from megatron_emo.subsets.finetune import write_task_texts

        n = write_task_texts(args.task, args.output, split=args.split,
                             num_fewshot=args.num_fewshot, num_examples=args.num_examples,
                             seed=args.seed, include_path=args.include_path,
                             task_dir=args.task_dir)
        print(f"{n} {args.task} {args.split} documents -> {args.output}")
        return
    if args.epochs <= 0 or args.lr <= 0:
        raise ValueError(f"--epochs ({args.epochs}) and --lr ({args.lr}) must be positive")

    from megatron_emo.subsets.finetune import finetune_hf
    from megatron_emo.subsets.pipeline import load_calibration

    examples = load_calibration(args.hf_dir, examples_path=args.examples, task=args.task,
                                task_split="train", num_fewshot=0,
                                include_path=args.include_path, task_dir=args.task_dir,
                                num_examples=args.num_examples, seed=args.seed,
                                tokenizer=args.tokenizer)
    result = finetune_hf(args.hf_dir, examples.sequences, args.output, num_epochs=args.epochs,
                         lr=args.lr, batch_size=args.batch_size, grad_accum=args.grad_accum,
                         max_steps=args.max_steps, seed=args.seed)
    print(f"wrote {args.output} ({result['num_steps']} steps)")


if __name__ == "__main__":
    from megatron_emo.cli import run_tool

    sys.exit(run_tool(main))
