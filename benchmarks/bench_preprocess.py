"""Preprocessing throughput (docs/s, MB/s) at 1 and 2 workers on the embedded corpus, scaled up.

Writes the sample corpus repeated to ``--target-mb`` of plain JSONL in a temp dir, trains (or
reuses) a sentencepiece tokenizer, then runs ``preprocess_jsonl`` once per worker count, each in a
fresh interpreter, and prints a markdown table with the ratio to 1 worker and the main process's
peak RSS (it should not grow with the input: only the per-document index lists do).

Usage:
  OMP_NUM_THREADS=1 python benchmarks/bench_preprocess.py [--target-mb 200] [--workers 1 2]
      [--tokenizer-model tok.model] [--workdir /tmp/bench_preprocess]
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def write_scaled_corpus(path: str, target_mb: float) -> tuple[int, int]:
    """Repeats the sample corpus (ids made unique) until ``target_mb``; returns (docs, bytes)."""
    from megatron_emo.preprocessing import sample_corpus_files

    lines = []
    for corpus_file in sample_corpus_files():
        with gzip.open(corpus_file, "rt", encoding="utf-8") as f:
            lines.extend(json.loads(line) for line in f)
    target = int(target_mb * 1e6)
    num_docs = num_bytes = 0
    with open(path, "w", encoding="utf-8") as f:
        repeat = 0
        while num_bytes < target:
            for record in lines:
                line = json.dumps(dict(record, id=f"{record['id']}-r{repeat}"),
                                  ensure_ascii=False) + "\n"
                f.write(line)
                num_docs += 1
                num_bytes += len(line.encode("utf-8"))
                if num_bytes >= target:
                    break
            repeat += 1
    return num_docs, num_bytes


def run_once(input_path: str, tokenizer_model: str, workers: int, out_dir: str) -> dict:
    """Runs one preprocessing job in a fresh interpreter; returns its summary + peak RSS."""
    code = (
        "import json, resource, sys\n"
        f"sys.path.insert(0, {ROOT!r})\n"
        "from megatron_emo.preprocessing.preprocess import preprocess_jsonl\n"
        f"s = preprocess_jsonl([{input_path!r}], output_prefix={out_dir + '/bench'!r},\n"
        f"    tokenizer_type='SentencePieceTokenizer', tokenizer_model={tokenizer_model!r},\n"
        f"    metadata_keys=('domain', 'source', 'id'), workers={workers}, progress=False)\n"
        "s['peak_rss_mib'] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024\n"
        "print('SUMMARY', json.dumps(s))\n"
    )
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"workers={workers} failed:\n{proc.stderr[-3000:]}")
    line = next(x for x in proc.stdout.splitlines() if x.startswith("SUMMARY "))
    return json.loads(line[len("SUMMARY "):])


def main(argv: list[str] | None = None) -> int:
    """Runs the benchmark and prints the markdown table."""
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target-mb", type=float, default=200.0)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--tokenizer-model", default=None,
                        help="sentencepiece model (default: train an 8192-piece one)")
    parser.add_argument("--workdir", default=None, help="default: a temp dir, removed after")
    args = parser.parse_args(argv)
    workdir = args.workdir or tempfile.mkdtemp(prefix="bench_preprocess_")
    os.makedirs(workdir, exist_ok=True)
    try:
        input_path = os.path.join(workdir, "scaled.jsonl")
        num_docs, num_bytes = write_scaled_corpus(input_path, args.target_mb)
        tokenizer_model = args.tokenizer_model
        if tokenizer_model is None:
            from megatron_emo.preprocessing import sample_corpus_files
            from megatron_emo.preprocessing.tokenizer_training import train_sentencepiece

            tokenizer_model = train_sentencepiece(
                sample_corpus_files(), output_prefix=os.path.join(workdir, "tok"),
                vocab_size=8192)
        print(f"input: {num_docs:,} docs, {num_bytes / 1e6:.1f} MB ({input_path}); "
              f"tokenizer {tokenizer_model}", flush=True)
        rows = []
        for workers in args.workers:
            out_dir = os.path.join(workdir, f"out_w{workers}")
            summary = run_once(input_path, tokenizer_model, workers, out_dir)
            rows.append((workers, summary))
            shutil.rmtree(out_dir, ignore_errors=True)
        base = rows[0][1]["elapsed_s"]
        print(f"\n| workers | docs | MB | seconds | docs/s | MB/s | speedup vs {rows[0][0]} | "
              "peak RSS main (MiB) |")
        print("|---:|---:|---:|---:|---:|---:|---:|---:|")
        for workers, s in rows:
            mb = s["bytes_in"] / 1e6
            print(f"| {workers} | {s['records_in']:,} | {mb:.1f} | {s['elapsed_s']:.1f} | "
                  f"{s['records_in'] / s['elapsed_s']:,.0f} | {mb / s['elapsed_s']:.2f} | "
                  f"{base / s['elapsed_s']:.2f}x | {s['peak_rss_mib']:.0f} |")
        print(f"\ntokens written: {rows[0][1]['tokens_written']:,}; "
              f"cpu count: {os.cpu_count()}")
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
