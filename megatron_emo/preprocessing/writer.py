"""Crash-safe writer for Megatron ``IndexedDataset`` files and their sidecars.

Everything is written under ``*.partial`` names in the output directory and renamed only once the
run succeeded, ``.idx`` last, so an interrupted run never leaves a ``.bin/.idx`` pair that looks
complete.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

import numpy as np
from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

__all__ = ["IndexedDatasetWriter", "dataset_prefix", "optimal_token_dtype", "write_json_atomic"]

PARTIAL_SUFFIX = ".partial"


def dataset_prefix(output_prefix: str, json_key: str = "text") -> str:
    """Returns the Megatron-LM dataset prefix ``{output_prefix}_{json_key}_document``."""
    return f"{output_prefix}_{json_key}_document"


def optimal_token_dtype(vocab_size: int) -> type[np.number]:
    """Returns the ``.bin`` dtype Megatron picks for a vocabulary (``DType.optimal_dtype``)."""
    return DType.optimal_dtype(vocab_size)


def write_json_atomic(path: str, obj: dict) -> None:
    """Writes ``obj`` as indented JSON to ``path`` through a temporary file and a rename."""
    tmp = path + PARTIAL_SUFFIX
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=False)
        f.write("\n")
    os.replace(tmp, path)


class IndexedDatasetWriter:
    """Writes one ``IndexedDataset`` (+ optional metadata sidecar) under temporary names.

    Use as a context manager: leaving the block with an exception removes the partial files;
    ``commit()`` renames them into place (``.bin``, then metadata, then ``.idx``).

    Args:
        prefix: final dataset prefix (``PREFIX_text_document``).
        dtype: token dtype of the ``.bin`` file.
        with_metadata: also write ``{prefix}.metadata.jsonl``, one line per document.
    """

    def __init__(self, prefix: str, *, dtype: type[np.number], with_metadata: bool) -> None:
        self.prefix = prefix
        self.dtype = dtype
        self.bin_path = prefix + ".bin"
        self.idx_path = prefix + ".idx"
        self.metadata_path = prefix + ".metadata.jsonl"
        self.summary_path = prefix + ".summary.json"
        self.with_metadata = with_metadata
        self.num_documents = 0
        self.num_tokens = 0
        self._committed = False
        os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
        self._builder = IndexedDatasetBuilder(self.bin_path + PARTIAL_SUFFIX, dtype=dtype)
        self._metadata_file = (open(self.metadata_path + PARTIAL_SUFFIX, "w", encoding="utf-8")
                               if with_metadata else None)

    def add_documents(self, tokens: np.ndarray, lengths: Sequence[int],
                      metadata_lines: Sequence[str] | None = None) -> None:
        """Appends documents given as one flat token array and their lengths.

        Equivalent to ``IndexedDatasetBuilder.add_document(doc, [len(doc)])`` per document, done
        in one write (the builder's ``data_file``/``sequence_lengths``/``document_indices`` are
        its public attributes).

        Args:
            tokens: ``(N,)`` concatenated documents.
            lengths: length of each document; they sum to ``N``.
            metadata_lines: one JSON line (no newline) per document; required iff metadata is on.
        """
        lengths = [int(n) for n in lengths]
        assert sum(lengths) == tokens.size, (sum(lengths), tokens.size)
        if self.with_metadata:
            assert metadata_lines is not None and len(metadata_lines) == len(lengths)
        if not lengths:
            return
        builder = self._builder
        builder.data_file.write(np.ascontiguousarray(tokens, dtype=self.dtype).tobytes(order="C"))
        start = len(builder.sequence_lengths)
        builder.sequence_lengths.extend(lengths)
        builder.document_indices.extend(range(start + 1, start + len(lengths) + 1))
        if self._metadata_file is not None:
            self._metadata_file.write("".join(line + "\n" for line in metadata_lines))
        self.num_documents += len(lengths)
        self.num_tokens += int(tokens.size)

    def commit(self, summary: dict | None = None) -> None:
        """Finalizes the index and renames every file into place, ``.idx`` last.

        Args:
            summary: written to ``{prefix}.summary.json`` after the dataset files.
        """
        self._builder.finalize(self.idx_path + PARTIAL_SUFFIX)
        if self._metadata_file is not None:
            self._metadata_file.close()
        # A stale .idx next to the new .bin would look complete: drop it before any rename.
        for stale in (self.idx_path, self.summary_path, self.metadata_path):
            if os.path.exists(stale):
                os.remove(stale)
        os.replace(self.bin_path + PARTIAL_SUFFIX, self.bin_path)
        if self.with_metadata:
            os.replace(self.metadata_path + PARTIAL_SUFFIX, self.metadata_path)
        os.replace(self.idx_path + PARTIAL_SUFFIX, self.idx_path)
        self._committed = True
        if summary is not None:
            write_json_atomic(self.summary_path, summary)

    def abort(self) -> None:
        """Closes and removes the partial files (safe to call more than once)."""
        if not self._builder.data_file.closed:
            self._builder.data_file.close()
        if self._metadata_file is not None and not self._metadata_file.closed:
            self._metadata_file.close()
        for path in (self.bin_path, self.idx_path, self.metadata_path):
            if os.path.exists(path + PARTIAL_SUFFIX):
                os.remove(path + PARTIAL_SUFFIX)

    def __enter__(self) -> IndexedDatasetWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if not self._committed:
            self.abort()
