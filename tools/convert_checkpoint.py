"""Convert EMO checkpoints between Megatron torch_dist and Hugging Face.

    python tools/convert_checkpoint.py to-hf CHECKPOINT_DIR OUTPUT_DIR [--dtype bfloat16]
        [--tokenizer DIR_OR_SPM_MODEL] [--max-shard-size-mb 2048] [--dry-run]
        [--eos-token-id N] [--pad-token-id N]
    python tools/convert_checkpoint.py from-hf HF_DIR OUTPUT_CHECKPOINT_DIR [--tp N --ep N]
        [--shared-layout auto|mlp|router] [--num-padding-experts N] [--dtype bfloat16]

Both directions stream (about one tensor in memory), need no GPU and no process group, show a
progress bar on a terminal, and write to a hidden temporary directory renamed to the output at
the end. from-hf --ep N: 'auto' (default) makes Megatron's SharedExpertMLP hold the shared expert
and pads the routed experts to a multiple of N (EP-balanced); it prints the matching training
flags.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None) -> None:
    """Parses the command line and converts the checkpoint (to-hf or from-hf)."""
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawTextHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    to_hf = sub.add_parser("to-hf", help="Megatron torch_dist -> HF")
    to_hf.add_argument("input")
    to_hf.add_argument("output")
    to_hf.add_argument("--dtype", choices=["float32", "bfloat16", "float16"])
    to_hf.add_argument("--tokenizer", help="HF tokenizer directory or sentencepiece .model file")
    to_hf.add_argument("--max-shard-size-mb", type=int, default=2048)
    to_hf.add_argument("--dry-run", action="store_true", help="print the mapping, write nothing")
    to_hf.add_argument("--eos-token-id", type=int, help="default: from args, else 100257")
    to_hf.add_argument("--pad-token-id", type=int, help="default: from args, else 100277")
    from_hf = sub.add_parser("from-hf", help="HF -> Megatron torch_dist (weights only)")
    from_hf.add_argument("input")
    from_hf.add_argument("output")
    from_hf.add_argument("--tp", type=int, default=1, help="checked against the heads")
    from_hf.add_argument("--ep", type=int, default=1,
                         help="expert-parallel size to train with (or a multiple of it)")
    from_hf.add_argument("--shared-layout", choices=["auto", "mlp", "router"], default="auto",
                         help="auto: mlp (SharedExpertMLP + padding) for one shared expert")
    from_hf.add_argument("--num-padding-experts", type=int,
                         help="default: the fewest that make --ep divide the expert count")
    from_hf.add_argument("--dtype", choices=["float32", "bfloat16", "float16"])
    args = parser.parse_args(argv)
    if args.command == "to-hf":
        from megatron_emo.conversion.to_hf import export_to_hf

        index = export_to_hf(args.input, args.output, dtype=args.dtype, tokenizer=args.tokenizer,
                             max_shard_bytes=args.max_shard_size_mb * 1024**2,
                             dry_run=args.dry_run, eos_token_id=args.eos_token_id,
                             pad_token_id=args.pad_token_id)
        if not args.dry_run:
            print(f"wrote {len(set(index['weight_map'].values()))} shards, "
                  f"{index['metadata']['total_size']} bytes to {args.output}")
    else:
        from megatron_emo.conversion.from_hf import import_from_hf

        import_from_hf(args.input, args.output, tp=args.tp, ep=args.ep,
                       shared_layout=args.shared_layout,
                       num_padding_experts=args.num_padding_experts, dtype=args.dtype)


if __name__ == "__main__":
    from megatron_emo.cli import run_tool

    sys.exit(run_tool(main))
