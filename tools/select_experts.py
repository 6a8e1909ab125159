"""Select an expert subset of an EMO model for a task and write the pruned checkpoints.

    python tools/select_experts.py CHECKPOINT EXAMPLES.jsonl --keep 16 --output DIR
        [--method greedy-layerwise|global|easy-ep|random] [--keep-per-layer 16,16,...] [--ep 1]
        [--shared-layout auto|mlp|router] [--num-examples N] [--seed S] [--no-megatron]
        [--tokenizer DIR_OR_SPM_MODEL] [--batch-size 8] [--device cuda] [--dtype float32]
    python tools/select_experts.py CHECKPOINT --task emo_mc_math --keep 4 --output DIR
        [--task-split validation] [--num-fewshot K] [--include-path MY_TASKS] ...

CHECKPOINT is an EMO HF directory or a Megatron torch_dist checkpoint (exported to HF first).
EXAMPLES.jsonl holds ``{"text": ...}`` (tokenised with the checkpoint's tokenizer) or
``{"tokens": [...]}`` records; ``--task`` takes the calibration examples from an lm-eval task
instead (its few-shot prompt plus the gold answer per document, like the reference): the offline
``emo_mc_<domain>`` tasks or any task lm-eval finds (``--include-path`` for your own YAML).
``--num-examples N --seed S`` subsamples the examples. Writes DIR/selection.json, DIR/hf
(pruned HF model, loadable with ``AutoModelForCausalLM.from_pretrained(DIR/hf,
trust_remote_code=True)``) and DIR/megatron (torch_dist; skipped with a warning when
--keep-per-layer counts differ). --keep counts the shared expert(s). The Megatron subset uses the
EP-balanced layout by default (SharedExpertMLP, the kept routed experts padded with never-routed
experts to a multiple of --ep); the log prints the matching training flags.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from e


def main(argv=None) -> None:
    """Selects the experts and writes the selection and the pruned checkpoints."""
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("checkpoint", help="EMO HF directory or Megatron torch_dist checkpoint")
    parser.add_argument("examples", nargs="?",
                        help="JSONL with 'text' or 'tokens' records (or use --task)")
    keep = parser.add_mutually_exclusive_group(required=True)
    keep.add_argument("--keep", type=int, help="experts kept per layer, shared included")
    keep.add_argument("--keep-per-layer", type=_int_list, help="comma-separated count per layer")
    parser.add_argument("--output", required=True, help="output directory")
    parser.add_argument("--method", choices=["greedy-layerwise", "global", "easy-ep", "random"],
                        default="greedy-layerwise")
    parser.add_argument("--task", help="lm-eval task whose documents are the examples")
    parser.add_argument("--task-split", default="validation",
                        choices=["train", "validation", "test"], help="split of --task")
    parser.add_argument("--num-fewshot", type=int,
                        help="few-shot examples per --task prompt (default: the task's)")
    parser.add_argument("--include-path", help="directory of your own lm-eval task YAML files")
    parser.add_argument("--task-dir", help="where the offline emo_mc tasks are written "
                        "(default runs/lm_eval_tasks)")
    parser.add_argument("--num-examples", type=int,
                        help="subsample this many examples (default: all)")
    parser.add_argument("--seed", type=int, default=0,
                        help="subsample, few-shot and --method random seed")
    parser.add_argument("--ep", type=int, default=1,
                        help="expert-parallel size of the Megatron subset (padded to divide)")
    parser.add_argument("--shared-layout", choices=["auto", "mlp", "router"], default="auto",
                        help="Megatron layout of the shared expert (auto: SharedExpertMLP + "
                        "padding)")
    parser.add_argument("--no-megatron", action="store_true", help="skip DIR/megatron")
    parser.add_argument("--tokenizer", help="tokenizer for the HF export of a Megatron checkpoint")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", help="scoring device (default: cuda if available, else cpu)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                        help="compute dtype of the scoring model")
    args = parser.parse_args(argv)
    if (args.examples is None) == (args.task is None):
        raise ValueError("give exactly one calibration source: the EXAMPLES.jsonl argument or "
                         f"--task (got examples={args.examples!r}, task={args.task!r})")
    if args.num_examples is not None and args.num_examples < 1:
        raise ValueError(f"--num-examples must be at least 1, got {args.num_examples}")

    import torch

    from megatron_emo.subsets.pipeline import select_and_export

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")

    def log(msg: str) -> None:
        print(msg, flush=True)

    sel = select_and_export(args.checkpoint, args.examples, args.output, keep=args.keep,
                            keep_per_layer=args.keep_per_layer, method=args.method, ep=args.ep,
                            shared_layout=args.shared_layout,
                            megatron=not args.no_megatron, tokenizer=args.tokenizer,
                            batch_size=args.batch_size, device=device, dtype=args.dtype,
                            task=args.task, task_split=args.task_split,
                            num_fewshot=args.num_fewshot, include_path=args.include_path,
                            task_dir=args.task_dir, num_examples=args.num_examples,
                            seed=args.seed, log=log)
    for layer, kept in enumerate(sel.experts_kept_per_layer):
        log(f"layer {layer}: keep {kept}")
    log(f"wrote {os.path.join(args.output, 'selection.json')}")


if __name__ == "__main__":
    from megatron_emo.cli import run_tool

    sys.exit(run_tool(main))
