"""Modularity report of an EMO checkpoint on a domain-labelled corpus.

    python tools/modularity_report.py CHECKPOINT --data-prefix PREFIX --output DIR
        [--max-docs 64] [--max-tokens N] [--fractions 0.125,0.25,0.5]
        [--method global|greedy-layerwise|easy-ep] [--num-random 3] [--batch-size 8]
        [--tokenizer DIR_OR_SPM_MODEL]
        [--device cuda] [--dtype float32]

CHECKPOINT is an EMO HF directory or a Megatron torch_dist checkpoint (exported to HF first).
PREFIX is a Megatron IndexedDataset (PREFIX.bin/.idx, one document per entry) with the sidecar
PREFIX.metadata.jsonl (line i = document i, key ``domain``), as written by
``tools/preprocess_data.py ... --metadata-keys domain,...``. Writes DIR/report.html,
DIR/report.json and the PNG figures. The subset-loss table has a random-subset column per
fraction (mean of --num-random random subsets of the same size): the baseline.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _float_list(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from e


def main(argv=None) -> None:
    """Parses the command line and writes the modularity report to ``--output``."""
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("checkpoint", help="EMO HF directory or Megatron torch_dist checkpoint")
    parser.add_argument("--data-prefix", required=True, help="IndexedDataset prefix")
    parser.add_argument("--output", required=True, help="output directory")
    parser.add_argument("--max-docs", type=int, default=64, help="documents per domain (first N)")
    parser.add_argument("--max-tokens", type=int,
                        help="tokens per document (default: max_position_embeddings)")
    parser.add_argument("--fractions", type=_float_list, default=[0.125, 0.25, 0.5])
    parser.add_argument("--method", choices=["global", "greedy-layerwise", "easy-ep"],
                        default="global")
    parser.add_argument("--num-random", type=int, default=3,
                        help="random subsets per fraction for the baseline column (0: none)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", help="scoring device (default: cuda if available, else cpu)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                        help="compute dtype of the scoring model")
    parser.add_argument("--tokenizer", help="tokenizer for the HF export of a Megatron checkpoint")
    args = parser.parse_args(argv)
    if args.num_random < 0:
        raise ValueError(f"--num-random must be >= 0, got {args.num_random}")

    import torch

    from megatron_emo.subsets.report import build_modularity_report

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")

    def log(msg: str) -> None:
        print(msg, flush=True)

    build_modularity_report(args.checkpoint, args.data_prefix, args.output,
                            max_docs_per_domain=args.max_docs, max_tokens=args.max_tokens,
                            fractions=args.fractions, method=args.method,
                            batch_size=args.batch_size, device=device, dtype=args.dtype,
                            tokenizer=args.tokenizer, num_random=args.num_random, log=log)


if __name__ == "__main__":
    from megatron_emo.cli import run_tool

    sys.exit(run_tool(main))
