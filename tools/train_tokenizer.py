"""Train a sentencepiece tokenizer on JSONL(.gz) for ``--tokenizer-type SentencePieceTokenizer``.

Writes ``P.model`` and ``P.vocab`` with unk=0, bos=1, eos=eod=2, pad=3.

    python tools/train_tokenizer.py --input megatron_emo/preprocessing/sample_corpus/*.jsonl.gz \
        --vocab-size 8192 --output-prefix runs/tokenizer/emo_sample
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv: list[str] | None = None) -> int:
    """Trains the tokenizer; returns the process exit code."""
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", nargs="+", required=True, help="JSONL(.gz) files or globs")
    parser.add_argument("--vocab-size", type=int, required=True)
    parser.add_argument("--output-prefix", required=True, help="writes PREFIX.model/.vocab")
    parser.add_argument("--model-type", choices=["bpe", "unigram"], default="bpe")
    parser.add_argument("--json-key", default="text")
    parser.add_argument("--max-sentences", type=int, default=1_000_000,
                        help="cap on training paragraphs (default 1,000,000)")
    parser.add_argument("--character-coverage", type=float, default=0.9995)
    parser.add_argument("--no-byte-fallback", dest="byte_fallback", action="store_false",
                        help="drop the 256 byte pieces (unseen characters become <unk>)")
    parser.add_argument("--num-threads", type=int, default=1,
                        help="trainer threads (default 1: reproducible)")
    args = parser.parse_args(argv)

    from megatron_emo.preprocessing.tokenizer_training import SPECIAL_IDS, train_sentencepiece

    start = time.perf_counter()
    try:
        model = train_sentencepiece(
            args.input, output_prefix=args.output_prefix, vocab_size=args.vocab_size,
            model_type=args.model_type, json_key=args.json_key, max_sentences=args.max_sentences,
            character_coverage=args.character_coverage, byte_fallback=args.byte_fallback,
            num_threads=args.num_threads)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {model} and {args.output_prefix}.vocab in {time.perf_counter() - start:.1f}s "
          f"(special ids {SPECIAL_IDS}); use --tokenizer-type SentencePieceTokenizer "
          f"--tokenizer-model {model}")
    return 0


if __name__ == "__main__":
    from megatron_emo.cli import run_tool

    sys.exit(run_tool(main))
