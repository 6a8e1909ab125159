"""Already-tokenized flat token arrays (Dolma/OLMo ``.npy``) -> Megatron ``IndexedDataset``.

The reference EMO data is a flat 1-D ``uint32`` array per file (dolma2 tokenizer, EOS 100257),
either a raw memmap (OLMo's ``.npy`` files have no header) or a real ``.npy``. Documents are split
on EOS, each keeping its EOS; a trailing fragment without EOS becomes its own document and is
reported. Files are streamed in chunks.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence

import numpy as np

from megatron_emo.preprocessing.preprocess import check_not_empty, expand_inputs
from megatron_emo.preprocessing.writer import (
    IndexedDatasetWriter,
    dataset_prefix,
    optimal_token_dtype,
)

__all__ = ["convert_token_arrays", "open_token_array"]

_NPY_MAGIC = b"\x93NUMPY"


def open_token_array(path: str, *, input_dtype: str = "uint32") -> np.ndarray:
    """Memory-maps a flat token file: a ``.npy`` with header, or raw ``input_dtype`` values.

    Raises:
        ValueError: if the array is not 1-D or the raw file size is not a multiple of the dtype.
    """
    with open(path, "rb") as f:
        magic = f.read(len(_NPY_MAGIC))
    if magic == _NPY_MAGIC:
        array = np.load(path, mmap_mode="r")
    else:
        dtype = np.dtype(input_dtype)
        size = os.path.getsize(path)
        if size % dtype.itemsize:
            raise ValueError(f"{path}: size {size} bytes is not a multiple of {dtype.name} "
                             f"({dtype.itemsize} bytes); wrong --input-dtype?")
        if size == 0:
            return np.zeros(0, dtype=dtype)
        array = np.memmap(path, dtype=dtype, mode="r")
    if array.ndim != 1:
        raise ValueError(f"{path}: expected a flat 1-D token array, got shape {array.shape}")
    if not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"{path}: expected integer tokens, got dtype {array.dtype}")
    return array


def convert_token_arrays(
    inputs: Sequence[str],
    *,
    output_prefix: str,
    eos_id: int,
    vocab_size: int,
    input_dtype: str = "uint32",
    json_key: str = "text",
    chunk_tokens: int = 1 << 24,
    allow_empty: bool = False,
) -> dict:
    """Converts flat EOS-separated token arrays into ``{output_prefix}_{json_key}_document``.

    Args:
        inputs: token files or globs, converted in order (a document never spans two files).
        output_prefix: as ``--output-prefix`` of the JSONL path.
        eos_id: the separator; each document ends with it.
        vocab_size: tokenizer vocabulary size; picks the ``.bin`` dtype like Megatron's
            ``DType.optimal_dtype`` and bounds the token ids.
        input_dtype: dtype of raw (headerless) files.
        json_key: only names the output (``PREFIX_{json_key}_document``).
        chunk_tokens: tokens read per step (memory bound).
        allow_empty: write the dataset even when the inputs hold no token.

    Returns:
        The summary, also written to ``{prefix}.summary.json``.

    Raises:
        ValueError: if ``eos_id`` is outside the vocabulary or a token id is ``>= vocab_size``.
        EmptyDatasetError: no document to write and not ``allow_empty`` (nothing is written).
    """
    if not 0 <= eos_id < vocab_size:
        raise ValueError(f"eos_id ({eos_id}) must be in [0, vocab_size ({vocab_size}))")
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens ({chunk_tokens}) must be >= 1")
    paths = expand_inputs(inputs)
    dtype = optimal_token_dtype(vocab_size)
    start = time.perf_counter()
    fragments: list[str] = []
    num_eos_only = 0
    with IndexedDatasetWriter(dataset_prefix(output_prefix, json_key), dtype=dtype,
                              with_metadata=False) as writer:
        for path in paths:
            array = open_token_array(path, input_dtype=input_dtype)
            pending: list[np.ndarray] = []  # the open document's pieces from earlier chunks
            pending_len = 0
            for begin in range(0, array.size, chunk_tokens):
                chunk = np.asarray(array[begin:begin + chunk_tokens])
                if chunk.size and int(chunk.max()) >= vocab_size:
                    bad = int(np.flatnonzero(chunk >= vocab_size)[0])
                    raise ValueError(f"{path}: token {int(chunk[bad])} at position {begin + bad} "
                                     f"is >= vocab_size ({vocab_size})")
                ends = np.flatnonzero(chunk == eos_id) + 1  # exclusive document ends
                if ends.size == 0:
                    pending.append(chunk)
                    pending_len += chunk.size
                    continue
                lengths = np.diff(ends, prepend=0)
                num_eos_only += int(np.count_nonzero(lengths == 1)) - (
                    1 if pending_len and lengths[0] == 1 else 0)
                lengths[0] += pending_len
                tokens = np.concatenate(pending + [chunk[:ends[-1]]]) if pending else \
                    chunk[:ends[-1]]
                writer.add_documents(tokens, lengths.tolist())
                pending = [chunk[ends[-1]:]] if ends[-1] < chunk.size else []
                pending_len = chunk.size - int(ends[-1])
            if pending_len:
                writer.add_documents(np.concatenate(pending), [pending_len])
                fragments.append(f"{path}: {pending_len} trailing tokens without EOS")
        summary = {
            "dataset_prefix": writer.prefix,
            "input_format": "npy",
            "inputs": paths,
            "json_key": json_key,
            "metadata_keys": [],
            "metadata_file": None,
            "tokenizer_type": None,
            "tokenizer_model": None,
            "vocab_size": vocab_size,
            "eod_id": eos_id,
            "append_eod": False,
            "dtype": np.dtype(dtype).name,
            "records_in": writer.num_documents,
            "documents_written": writer.num_documents,
            "tokens_written": writer.num_tokens,
            "skipped": 0,
            "skipped_by_category": {},
            "documents_without_eos": len(fragments),
            "documents_without_eos_at": fragments,
            "eos_only_documents": num_eos_only,
            "elapsed_s": round(time.perf_counter() - start, 3),
        }
        check_not_empty(summary, allow_empty=allow_empty)
        writer.commit(summary)
    return summary
