"""JSONL(.gz) -> Megatron ``IndexedDataset`` (``PREFIX_text_document.bin/.idx``), one per record.

Each kept record becomes exactly one document, ``tokenizer.tokenize(text) + [eod]``; bad records
are skipped (or fail the run) by category and reported in ``PREFIX_text_document.summary.json``.
CLI: ``python tools/preprocess_data.py --input data/*.jsonl.gz --tokenizer-type T
--tokenizer-model M --output-prefix P``.
"""

from __future__ import annotations

import argparse
import glob
import gzip
import json
import os
import sys
import threading
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from megatron_emo.preprocessing.tokenizers import (
    build_tokenizer_from_args,
    tokenizer_args,
    tokenizer_eod_id,
)
from megatron_emo.preprocessing.writer import (
    IndexedDatasetWriter,
    dataset_prefix,
    optimal_token_dtype,
)

__all__ = [
    "BAD_INPUT_CATEGORIES",
    "BadRecordError",
    "EmptyDatasetError",
    "check_not_empty",
    "expand_inputs",
    "format_summary",
    "preprocess_jsonl",
]

BAD_INPUT_CATEGORIES = (
    "invalid_utf8",  # line bytes are not UTF-8, or the text holds lone surrogates (\ud800)
    "invalid_json",  # not parseable as JSON (blank lines included) or not a JSON object
    "missing_key",  # a --json-keys key is absent
    "non_string_value",  # a --json-keys value is not a string (null, number, list, ...)
    "empty_text",  # text is empty or whitespace only, or tokenizes to no tokens
    "line_too_long",  # line longer than --max-line-bytes (never read into memory whole)
    "tokenizer_error",  # the tokenizer raised
)
MAX_FIRST_LINES = 10
_RECORDS_PER_BATCH = 64


class BadRecordError(ValueError):
    """Raised with ``on_error="fail"``: names the file, line and category of the bad record."""


class EmptyDatasetError(ValueError):
    """Raised when no document would be written (and ``allow_empty`` is off); nothing is written."""


def check_not_empty(summary: dict, *, allow_empty: bool) -> None:
    """Refuses a dataset of zero documents, naming the inputs and why every record was skipped.

    Raises:
        EmptyDatasetError: if ``summary["documents_written"]`` is 0 and not ``allow_empty``.
    """
    if allow_empty or summary["documents_written"] > 0:
        return
    skipped = {k: v["count"] for k, v in summary.get("skipped_by_category", {}).items()
               if v["count"]}
    why = (f"all {summary['records_in']:,} records were skipped ("
           + ", ".join(f"{k}: {n:,}" for k, n in skipped.items()) + ")"
           if skipped else "the input has no records")
    raise EmptyDatasetError(
        f"no documents to write for {summary['dataset_prefix']}: {why}; inputs: "
        f"{', '.join(summary['inputs'])}. Nothing was written (allow it with --allow-empty)")


def expand_inputs(patterns: Sequence[str]) -> list[str]:
    """Expands files and globs, in the order given (each glob sorted), without duplicates.

    Raises:
        ValueError: if a pattern matches nothing.
    """
    paths: list[str] = []
    for pattern in patterns:
        matches = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
        matches = [m for m in matches if os.path.isfile(m)]
        if not matches:
            raise ValueError(f"input {pattern!r} matches no file")
        paths.extend(m for m in matches if m not in paths)
    return paths


def _open_binary(path: str):
    return gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")


def _iter_lines(path: str, max_line_bytes: int) -> Iterator[tuple[int, bytes | None, int]]:
    """Yields ``(line_number, raw_line_or_None, num_bytes)``; ``None`` marks an over-long line.

    Reads at most ``max_line_bytes + 1`` bytes per call, so an over-long line is skipped in
    chunks instead of being loaded whole.
    """
    with _open_binary(path) as f:
        line_number = 0
        while True:
            raw = f.readline(max_line_bytes + 1)
            if not raw:
                return
            line_number += 1
            if len(raw) > max_line_bytes and not raw.endswith(b"\n"):
                num_bytes = len(raw)
                while not raw.endswith(b"\n"):
                    raw = f.readline(1 << 20)
                    if not raw:
                        break
                    num_bytes += len(raw)
                yield line_number, None, num_bytes
            else:
                yield line_number, raw, len(raw)


# ----------------------------------------------------------------------------------------------
# Worker side: one tokenizer per process, set up by _init_worker.

_WORKER: dict = {}


@dataclass
class _BatchResult:
    """What a worker returns for one batch of lines (kept documents concatenated per key)."""

    num_records: int
    num_bytes: int
    failures: list[tuple[int, int, str, str]]  # (file index, line number, category, detail)
    tokens: dict[str, np.ndarray]
    lengths: dict[str, list[int]]
    metadata_lines: list[str] = field(default_factory=list)


def _init_worker(tokenizer_namespace: dict, json_keys: tuple[str, ...],
                 metadata_keys: tuple[str, ...], eod_id: int | None, dtype_name: str) -> None:
    _WORKER.update(
        tokenizer=build_tokenizer_from_args(argparse.Namespace(**tokenizer_namespace)),
        json_keys=json_keys, metadata_keys=metadata_keys, eod_id=eod_id,
        dtype=np.dtype(dtype_name))


def _encode_record(raw: bytes | None) -> tuple[str | None, str, dict[str, list[int]], str]:
    """Returns ``(category or None, detail, ids per key, metadata JSON line)`` for one line."""
    if raw is None:
        return "line_too_long", "", {}, ""
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return "invalid_utf8", str(e), {}, ""
    try:
        record = json.loads(line)
    except ValueError as e:
        return "invalid_json", str(e) if line.strip() else "blank line", {}, ""
    if not isinstance(record, dict):
        return "invalid_json", f"expected a JSON object, got {type(record).__name__}", {}, ""
    tokenizer = _WORKER["tokenizer"]
    eod_id = _WORKER["eod_id"]
    ids_by_key: dict[str, list[int]] = {}
    for key in _WORKER["json_keys"]:
        if key not in record:
            return "missing_key", f"no key {key!r}", {}, ""
        text = record[key]
        if not isinstance(text, str):
            return "non_string_value", f"{key!r} is {type(text).__name__}", {}, ""
        if not text.strip():
            return "empty_text", f"{key!r} is empty or whitespace", {}, ""
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            return "invalid_utf8", f"{key!r}: {e}", {}, ""
        try:
            ids = tokenizer.tokenize(text)
        except Exception as e:  # noqa: BLE001 - any tokenizer failure is a bad record
            return "tokenizer_error", f"{key!r}: {type(e).__name__}: {e}", {}, ""
        if len(ids) == 0:
            return "empty_text", f"{key!r} tokenizes to no tokens", {}, ""
        ids_by_key[key] = list(ids) + ([eod_id] if eod_id is not None else [])
    metadata = ""
    if _WORKER["metadata_keys"]:
        metadata = json.dumps({k: record.get(k) for k in _WORKER["metadata_keys"]},
                              ensure_ascii=False)
    return None, "", ids_by_key, metadata


def _encode_batch(batch: tuple[int, list[tuple[int, bytes | None, int]]]) -> _BatchResult:
    """Tokenizes one batch of lines from one file; runs in a worker process."""
    file_index, lines = batch
    keys = _WORKER["json_keys"]
    flat: dict[str, list[int]] = {k: [] for k in keys}
    lengths: dict[str, list[int]] = {k: [] for k in keys}
    failures = []
    metadata_lines = []
    for line_number, raw, _ in lines:
        category, detail, ids_by_key, metadata = _encode_record(raw)
        if category is not None:
            failures.append((file_index, line_number, category, detail))
            continue
        for key in keys:
            flat[key].extend(ids_by_key[key])
            lengths[key].append(len(ids_by_key[key]))
        if _WORKER["metadata_keys"]:
            metadata_lines.append(metadata)
    dtype = _WORKER["dtype"]
    return _BatchResult(
        num_records=len(lines), num_bytes=sum(n for _, _, n in lines), failures=failures,
        tokens={k: np.array(flat[k], dtype=dtype) for k in keys}, lengths=lengths,
        metadata_lines=metadata_lines)


# ----------------------------------------------------------------------------------------------
# Main process.

def _iter_batches(paths: Sequence[str], max_line_bytes: int,
                  batch_size: int) -> Iterator[tuple[int, list[tuple[int, bytes | None, int]]]]:
    for file_index, path in enumerate(paths):
        batch = []
        for item in _iter_lines(path, max_line_bytes):
            batch.append(item)
            if len(batch) == batch_size:
                yield file_index, batch
                batch = []
        if batch:
            yield file_index, batch


def _bounded(iterable, semaphore: threading.Semaphore, stop: threading.Event):
    """Yields items only while fewer than the semaphore's count are in flight.

    ``Pool.imap`` otherwise reads its whole input ahead of the workers. The consumer releases the
    semaphore once per finished result; ``stop`` unblocks the feeder thread on shutdown.
    """
    for item in iterable:
        while not semaphore.acquire(timeout=0.1):
            if stop.is_set():
                return
        if stop.is_set():
            return
        yield item


class _Progress:
    """tqdm bar (MB/s, docs/s) on a terminal, else a log line every ``log_interval`` records."""

    def __init__(self, total_bytes: int | None, log_interval: int, enabled: bool) -> None:
        self.log_interval = log_interval
        self.start = time.perf_counter()
        self.records = 0
        self.bytes = 0
        self._next_log = log_interval
        self.bar = None
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc="preprocess",
                            file=sys.stderr)
        self.enabled = enabled

    def update(self, num_records: int, num_bytes: int) -> None:
        self.records += num_records
        self.bytes += num_bytes
        if self.bar is not None:
            self.bar.update(num_bytes)
            elapsed = max(time.perf_counter() - self.start, 1e-9)
            self.bar.set_postfix_str(f"{self.records / elapsed:,.0f} docs/s", refresh=False)
        elif self.enabled and self.records >= self._next_log:
            self._next_log += self.log_interval
            elapsed = max(time.perf_counter() - self.start, 1e-9)
            print(f"processed {self.records:,} records, {self.records / elapsed:,.0f} docs/s, "
                  f"{self.bytes / elapsed / 1e6:,.2f} MB/s", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def preprocess_jsonl(
    inputs: Sequence[str],
    *,
    output_prefix: str,
    tokenizer_type: str,
    tokenizer_model: str | None,
    json_keys: Sequence[str] = ("text",),
    metadata_keys: Sequence[str] = (),
    append_eod: bool = True,
    workers: int = 1,
    on_error: Literal["skip", "fail"] = "skip",
    max_line_bytes: int = 64 * 1024 * 1024,
    log_interval: int = 100_000,
    progress: bool = True,
    tokenizer_overrides: dict | None = None,
    allow_empty: bool = False,
) -> dict:
    """Tokenizes JSONL(.gz) records into one Megatron ``IndexedDataset`` per JSON key.

    Writes ``{output_prefix}_{key}_document.{bin,idx,summary.json}`` and, with ``metadata_keys``,
    ``.metadata.jsonl`` (line i = document i). Records are written in input order; a record that
    is bad for any key is skipped for all keys, so the datasets and the sidecar stay aligned.

    Args:
        inputs: JSONL or JSONL.gz files or globs, read in the given order.
        output_prefix: Megatron-LM ``--output-prefix``.
        tokenizer_type: Megatron ``--tokenizer-type``.
        tokenizer_model: Megatron ``--tokenizer-model``.
        json_keys: keys holding the text to tokenize.
        metadata_keys: keys copied to the sidecar (``null`` when absent).
        append_eod: append the tokenizer's EOD id to every document.
        workers: tokenizer processes (1 = in-process). Output order never depends on it.
        on_error: ``skip`` bad records (counted) or ``fail`` on the first one.
        max_line_bytes: lines longer than this are bad records (``line_too_long``).
        log_interval: records between progress lines when stderr is not a terminal.
        progress: show progress at all.
        tokenizer_overrides: extra Megatron ``TokenizerConfig`` fields (``vocab_file``, ...).
        allow_empty: write the dataset even when no record yields a document.

    Returns:
        The summary of the first key's dataset (also written to its ``summary.json``).

    Raises:
        ValueError: bad arguments, or the tokenizer has no EOD id while ``append_eod``.
        BadRecordError: with ``on_error="fail"``, on the first bad record (nothing is written).
        EmptyDatasetError: no document to write and not ``allow_empty`` (nothing is written).
    """
    json_keys = tuple(json_keys)
    metadata_keys = tuple(metadata_keys)
    if not json_keys:
        raise ValueError("json_keys must name at least one key")
    if workers < 1:
        raise ValueError(f"workers ({workers}) must be >= 1")
    if on_error not in ("skip", "fail"):
        raise ValueError(f"on_error ({on_error!r}) must be 'skip' or 'fail'")
    if max_line_bytes < 1:
        raise ValueError(f"max_line_bytes ({max_line_bytes}) must be >= 1")
    paths = expand_inputs(inputs)
    tokenizer_overrides = dict(tokenizer_overrides or {})
    # Workers get the resolved namespace so they need not import megatron.training.
    tokenizer_namespace = vars(tokenizer_args(tokenizer_type, tokenizer_model,
                                              **tokenizer_overrides))
    tokenizer = build_tokenizer_from_args(argparse.Namespace(**tokenizer_namespace))
    eod_id = tokenizer_eod_id(tokenizer)
    vocab_size = int(tokenizer.vocab_size)
    if append_eod:
        if eod_id is None:
            raise ValueError(
                f"tokenizer {tokenizer_type} {tokenizer_model!r} has no EOD id (eod="
                f"{getattr(tokenizer, 'eod', None)!r}); EMO needs one per document. Train the "
                "tokenizer with an EOS piece (tools/train_tokenizer.py sets one)")
        if not 0 <= eod_id < vocab_size:
            raise ValueError(f"EOD id ({eod_id}) is outside the vocabulary ({vocab_size})")
    else:
        warnings.warn("append_eod=False: documents get no EOD token, so training cannot find "
                      "document boundaries (EMO's per-document routing needs them)", stacklevel=2)
    dtype = optimal_token_dtype(vocab_size)
    start = time.perf_counter()
    init_args = (tokenizer_namespace, json_keys, metadata_keys, eod_id if append_eod else None,
                 np.dtype(dtype).name)

    records_in = 0
    bytes_in = 0
    skipped_by_category = {c: {"count": 0, "first_lines": []} for c in BAD_INPUT_CATEGORIES}
    total_bytes = (None if any(p.endswith(".gz") for p in paths)
                   else sum(os.path.getsize(p) for p in paths))
    progress_meter = _Progress(total_bytes, log_interval, progress)
    writers: dict[str, IndexedDatasetWriter] = {}
    pool = None
    stop = threading.Event()
    try:
        for key in json_keys:
            writers[key] = IndexedDatasetWriter(dataset_prefix(output_prefix, key), dtype=dtype,
                                                with_metadata=bool(metadata_keys))
        batches = _iter_batches(paths, max_line_bytes, _RECORDS_PER_BATCH)
        if workers == 1:
            _init_worker(*init_args)
            results = map(_encode_batch, batches)
            semaphore = None
        else:
            import multiprocessing as mp

            # NOTE: fork (Linux default, as Megatron-LM's preprocess_data) skips re-importing
            # torch/megatron in every worker (~5 s each); each worker still builds its own
            # tokenizer in _init_worker. EMO_PREPROCESS_START_METHOD=spawn opts out.
            method = os.environ.get("EMO_PREPROCESS_START_METHOD") or (
                "fork" if "fork" in mp.get_all_start_methods() else "spawn")
            ctx = mp.get_context(method)
            pool = ctx.Pool(workers, initializer=_init_worker, initargs=init_args)
            semaphore = threading.Semaphore(4 * workers)
            results = pool.imap(_encode_batch, _bounded(batches, semaphore, stop), chunksize=1)
        for result in results:
            if semaphore is not None:
                semaphore.release()
            records_in += result.num_records
            bytes_in += result.num_bytes
            for file_index, line_number, category, detail in result.failures:
                location = f"{paths[file_index]}:{line_number}"
                if on_error == "fail":
                    raise BadRecordError(f"{location}: {category}"
                                         + (f" ({detail})" if detail else ""))
                entry = skipped_by_category[category]
                entry["count"] += 1
                if len(entry["first_lines"]) < MAX_FIRST_LINES:
                    entry["first_lines"].append(location)
            for key, writer in writers.items():
                writer.add_documents(result.tokens[key], result.lengths[key],
                                     result.metadata_lines if metadata_keys else None)
            progress_meter.update(result.num_records, result.num_bytes)
        progress_meter.close()
        if pool is not None:
            pool.close()
            pool.join()
            pool = None
        skipped = sum(v["count"] for v in skipped_by_category.values())
        summaries = {}
        for key, writer in writers.items():
            summary = {
                "dataset_prefix": writer.prefix,
                "input_format": "jsonl",
                "inputs": paths,
                "json_key": key,
                "metadata_keys": list(metadata_keys),
                "metadata_file": writer.metadata_path if metadata_keys else None,
                "tokenizer_type": tokenizer_type,
                "tokenizer_model": tokenizer_model,
                "vocab_size": vocab_size,
                "eod_id": eod_id,
                "append_eod": append_eod,
                "dtype": np.dtype(dtype).name,
                "records_in": records_in,
                "documents_written": writer.num_documents,
                "tokens_written": writer.num_tokens,
                "skipped": skipped,
                "skipped_by_category": skipped_by_category,
                "bytes_in": bytes_in,
                "workers": workers,
                "elapsed_s": round(time.perf_counter() - start, 3),
            }
            assert records_in == writer.num_documents + skipped, summary
            summaries[key] = summary
        check_not_empty(summaries[json_keys[0]], allow_empty=allow_empty)  # keys stay aligned
        for key, writer in writers.items():
            writer.commit(summaries[key])
    except BaseException:
        stop.set()
        if pool is not None:
            pool.terminate()
            pool.join()
        progress_meter.close()
        for writer in writers.values():
            writer.abort()
        raise
    return summaries[json_keys[0]]


def format_summary(summary: dict) -> str:
    """Returns a short human-readable summary of a preprocessing run."""
    lines = [
        f"dataset: {summary['dataset_prefix']} (.bin/.idx)",
        f"records_in={summary['records_in']:,} documents_written={summary['documents_written']:,}"
        f" skipped={summary['skipped']:,} tokens_written={summary['tokens_written']:,}",
    ]
    for category, entry in summary.get("skipped_by_category", {}).items():
        if entry["count"]:
            lines.append(f"  skipped {category}: {entry['count']:,} (first: "
                         f"{', '.join(entry['first_lines'][:3])})")
    if summary.get("elapsed_s"):
        elapsed = summary["elapsed_s"]
        lines.append(f"elapsed {elapsed:.1f}s, {summary['records_in'] / elapsed:,.0f} docs/s, "
                     f"{summary.get('bytes_in', 0) / elapsed / 1e6:,.2f} MB/s")
    return "\n".join(lines)
