"""Tokenize JSONL(.gz) (or convert flat token .npy arrays) into Megatron .bin/.idx datasets.

Megatron-LM compatible flags; output ``{output_prefix}_{key}_document.{bin,idx}`` plus
``.summary.json`` (always) and ``.metadata.jsonl`` (with --metadata-keys).

    python tools/preprocess_data.py --input corpus/*.jsonl.gz --output-prefix data/corpus \
        --tokenizer-type SentencePieceTokenizer --tokenizer-model tok.model \
        --metadata-keys domain,source,id --workers 2
    python tools/preprocess_data.py --input-format npy --input part-*.npy --eos-id 100257 \
        --vocab-size 100278 --output-prefix data/dolma
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def build_parser() -> argparse.ArgumentParser:
    """Returns the argument parser (Megatron-LM ``tools/preprocess_data.py`` flag names)."""
    from megatron_emo.preprocessing.tokenizers import SUPPORTED_TOKENIZER_TYPES

    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    group = parser.add_argument_group("input")
    group.add_argument("--input", nargs="+", required=True,
                       help="files or globs: .jsonl/.jsonl.gz, or token arrays with "
                            "--input-format npy")
    group.add_argument("--input-format", choices=["jsonl", "npy"], default="jsonl")
    group.add_argument("--json-keys", nargs="+", default=["text"],
                       help="keys to tokenize; one dataset per key (default: text)")
    group.add_argument("--metadata-keys", default="",
                       help="comma-separated keys copied to PREFIX_text_document.metadata.jsonl, "
                            "one line per document (missing -> null), e.g. domain,source,id")
    group.add_argument("--max-line-bytes", type=int, default=64 * 1024 * 1024,
                       help="longer lines are skipped as line_too_long (default 64 MiB)")
    group.add_argument("--on-error", choices=["skip", "fail"], default="skip",
                       help="skip bad records and count them (default), or fail on the first")
    group = parser.add_argument_group("tokenizer")
    group.add_argument("--tokenizer-type", default=None,
                       help=f"Megatron tokenizer type, e.g. {', '.join(SUPPORTED_TOKENIZER_TYPES)}")
    group.add_argument("--tokenizer-model", default=None,
                       help="sentencepiece .model file or Hugging Face tokenizer directory")
    group.add_argument("--vocab-file", default=None, help="for GPT2BPETokenizer")
    group.add_argument("--merge-file", default=None, help="for GPT2BPETokenizer")
    group.add_argument("--append-eod", action=argparse.BooleanOptionalAction, default=True,
                       help="append the tokenizer's EOD id to every document (default on; "
                            "--no-append-eod warns: EMO needs document boundaries)")
    group = parser.add_argument_group("token arrays (--input-format npy)")
    group.add_argument("--eos-id", type=int, default=None,
                       help="document separator id, e.g. 100257 for dolma2")
    group.add_argument("--vocab-size", type=int, default=None,
                       help="tokenizer vocabulary size; picks the .bin dtype, bounds the ids")
    group.add_argument("--input-dtype", default="uint32",
                       help="dtype of headerless token files (default uint32)")
    group = parser.add_argument_group("output and runtime")
    group.add_argument("--output-prefix", required=True,
                       help="writes {output_prefix}_{key}_document.{bin,idx}")
    group.add_argument("--workers", type=int, default=1, help="tokenizer processes")
    group.add_argument("--log-interval", type=int, default=100_000,
                       help="records between progress lines when stderr is not a terminal")
    group.add_argument("--quiet", action="store_true", help="no progress output")
    group.add_argument("--allow-empty", action="store_true",
                       help="write the dataset even if no document results (default: exit 1)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Runs the preprocessing; returns the process exit code."""
    args = build_parser().parse_args(argv)
    from megatron_emo.preprocessing.preprocess import (
        BadRecordError,
        EmptyDatasetError,
        format_summary,
        preprocess_jsonl,
    )

    try:
        if args.input_format == "npy":
            from megatron_emo.preprocessing.token_arrays import convert_token_arrays

            if args.eos_id is None or args.vocab_size is None:
                raise ValueError("--input-format npy needs --eos-id and --vocab-size")
            if args.metadata_keys:
                raise ValueError("--metadata-keys needs JSONL input (token arrays have none)")
            if len(args.json_keys) != 1:
                raise ValueError(f"--input-format npy writes one dataset; got --json-keys "
                                 f"{args.json_keys}")
            summary = convert_token_arrays(
                args.input, output_prefix=args.output_prefix, eos_id=args.eos_id,
                vocab_size=args.vocab_size, input_dtype=args.input_dtype,
                json_key=args.json_keys[0], allow_empty=args.allow_empty)
        else:
            if args.tokenizer_type is None:
                raise ValueError("--tokenizer-type is required for JSONL input")
            for flag in ("eos_id", "vocab_size"):
                if getattr(args, flag) is not None:
                    warnings.warn(f"--{flag.replace('_', '-')} only applies to "
                                  "--input-format npy; ignored", stacklevel=1)
            overrides = {k: v for k, v in (("vocab_file", args.vocab_file),
                                           ("merge_file", args.merge_file)) if v is not None}
            metadata_keys = [k.strip() for k in args.metadata_keys.split(",") if k.strip()]
            summary = preprocess_jsonl(
                args.input, output_prefix=args.output_prefix, tokenizer_type=args.tokenizer_type,
                tokenizer_model=args.tokenizer_model, json_keys=args.json_keys,
                metadata_keys=metadata_keys, append_eod=args.append_eod, workers=args.workers,
                on_error=args.on_error, max_line_bytes=args.max_line_bytes,
                log_interval=args.log_interval, progress=not args.quiet,
                tokenizer_overrides=overrides, allow_empty=args.allow_empty)
    except BadRecordError as e:
        print(f"error: bad input record: {e}", file=sys.stderr)
        return 1
    except EmptyDatasetError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_summary(summary))
    print(f"summary: {summary['dataset_prefix']}.summary.json")
    if not args.quiet:
        counts = {k: v["count"] for k, v in summary["skipped_by_category"].items() if v["count"]}
        print(json.dumps({"records_in": summary["records_in"],
                          "documents_written": summary["documents_written"],
                          "skipped": summary["skipped"], "skipped_by_category": counts}))
    return 0


if __name__ == "__main__":
    from megatron_emo.cli import run_tool

    sys.exit(run_tool(main))
