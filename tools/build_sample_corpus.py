"""Rebuild the embedded sample corpus deterministically (fixed seeds, sorted inputs, gzip mtime 0).

python tools/build_sample_corpus.py             # -> megatron_emo/preprocessing/sample_corpus/
python tools/build_sample_corpus.py /tmp/corpus --domains math narrative
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv: list[str] | None = None) -> int:
    """Builds the corpus; returns the process exit code."""
    from megatron_emo.preprocessing import SAMPLE_CORPUS_DIR
    from megatron_emo.preprocessing.corpus_builder import DOMAINS, build_sample_corpus

    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("output", nargs="?", default=SAMPLE_CORPUS_DIR,
                        help=f"output directory (default {SAMPLE_CORPUS_DIR})")
    parser.add_argument("--domains", nargs="+", choices=sorted(DOMAINS), default=None)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    counts = build_sample_corpus(args.output, args.domains)
    for domain, count in counts.items():
        path = os.path.join(args.output, f"{domain}.jsonl.gz")
        print(f"{domain:10s} {count:5d} docs  {os.path.getsize(path) / 1e6:6.2f} MB  {path}")
    print(f"built in {time.perf_counter() - start:.1f}s")
    return 0


if __name__ == "__main__":
    from megatron_emo.cli import run_tool

    sys.exit(run_tool(main))
