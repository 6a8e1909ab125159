"""The training dataset: ``GPTDataset`` samples that carry their documents.

Also the ``DocumentBatch`` and the document attention mask built from them for every
micro-batch.

``EMOGPTDataset`` adds to each ``GPTDataset`` sample the document segment of every token and the
global index of every segment's document, taken from the same ``sample_index``/``document_index``
lookup that assembles the tokens. So the router's documents are exactly the spans of Megatron's
``cu_seqlens`` (``--dataloader-inter-document-masking``), including documents cut at the window
edges: a document split over two windows gets a different id in each window and the same key.

Megatron symbols: ``core.datasets.gpt_dataset.{GPTDataset, GPTDatasetConfig, MockGPTDataset}``
(``_query_document_sample_shuffle_indices`` returns ``(text, document_ids, document_lengths)``),
``core.datasets.blended_megatron_dataset_builder.BlendedMegatronDatasetBuilder``,
``training.{get_args, get_tokenizer}``, ``training.utils.get_blend_and_blend_per_split``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from megatron.core.datasets.gpt_dataset import GPTDataset, MockGPTDataset

from megatron_emo.routing import DocumentBatch

__all__ = [
    "DATASET_KEY_SHIFT",
    "EMOGPTDataset",
    "EMOMockGPTDataset",
    "document_attention_mask",
    "documents_from_batch",
    "token_segments",
]

# Document keys of a blend: dataset_id * 2**40 + document index (2**40 documents per dataset).
DATASET_KEY_SHIFT = 40


def token_segments(
    document_lengths: list[int], *, seq_length: int, add_extra_token: bool
) -> torch.Tensor:
    """Segment index of every token of a ``GPTDataset`` sample, as Megatron cuts ``cu_seqlens``.

    Args:
        document_lengths: tokens fetched per document part (``seq_length + add_extra_token``
            in total, or fewer for a padded sample).
        seq_length: the sample's token count S.
        add_extra_token: whether the fetch included the label-only extra token (it belongs to
            the last part and is not an input token).

    Returns:
        ``(S,)`` int64 segment ids ``0..n-1``; padding folds into the last segment, as
        ``GPTDataset.__getitem__`` does for ``cu_seqlens``.
    """
    lengths = list(document_lengths)
    if add_extra_token and lengths:
        lengths[-1] -= 1
        if lengths[-1] == 0:
            lengths.pop()
    shortfall = seq_length - sum(lengths)
    if shortfall > 0:
        if lengths:
            lengths[-1] += shortfall
        else:
            lengths.append(shortfall)
    if shortfall < 0:
        raise ValueError(f"document parts cover {sum(lengths)} tokens > seq_length {seq_length}")
    return torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))


class _DocumentsMixin:
    """Adds ``doc_segments`` (S,) and ``doc_keys`` (S,) (padded with -1) to every sample."""

    def _query_document_sample_shuffle_indices(self, idx):
        text, document_ids, document_lengths = super()._query_document_sample_shuffle_indices(idx)
        # NOTE: GPTDataset.__getitem__ edits document_lengths in place; keep a copy. Each
        # DataLoader worker has its own dataset object, so this per-call state is not shared.
        self._last_documents = (np.asarray(document_ids, dtype=np.int64), list(document_lengths))
        return text, document_ids, document_lengths

    def __getitem__(self, idx):
        sample = super().__getitem__(idx)
        document_ids, document_lengths = self._last_documents
        seq_length = self.config.sequence_length
        segments_S = token_segments(
            document_lengths,
            seq_length=seq_length,
            add_extra_token=bool(self.config.add_extra_token_to_sequence),
        )
        num_docs = int(segments_S[-1]) + 1
        keys_S = torch.full((seq_length,), -1, dtype=torch.int64)
        keys_S[:num_docs] = torch.from_numpy(document_ids[:num_docs])
        sample["doc_segments"] = segments_S
        sample["doc_keys"] = keys_S
        return sample


class EMOGPTDataset(_DocumentsMixin, GPTDataset):
    """``GPTDataset`` whose samples also carry ``doc_segments`` and ``doc_keys``."""


class EMOMockGPTDataset(_DocumentsMixin, MockGPTDataset):
    """``MockGPTDataset`` (``--mock-data``) with ``doc_segments`` and ``doc_keys``."""


def documents_from_batch(batch: dict[str, Any], *, iteration: int) -> DocumentBatch:
    """The micro-batch's ``DocumentBatch`` from collated ``EMOGPTDataset`` samples.

    Args:
        batch: collated samples with ``doc_segments`` ``(B, S)``, ``doc_keys`` ``(B, S)`` and,
            for a blend, ``dataset_id`` ``(B,)``; host tensors.
        iteration: the training iteration (seeds the pool sizes).

    Returns:
        ``DocumentBatch`` with ids dense over the micro-batch (sequence 0's documents first) and
        keys ``dataset_id * 2**40 + document index``.
    """
    segments_BS = batch["doc_segments"].to(torch.int64)
    keys_BS = batch["doc_keys"].to(torch.int64)
    num_docs_B = segments_BS[:, -1] + 1
    offsets_B = torch.cumsum(num_docs_B, 0) - num_docs_B
    doc_ids_BS = segments_BS + offsets_B[:, None]
    valid_BS = torch.arange(keys_BS.shape[1])[None, :] < num_docs_B[:, None]
    if "dataset_id" in batch:
        dataset_id_B = torch.as_tensor(batch["dataset_id"], dtype=torch.int64).reshape(-1)
        keys_BS = keys_BS + (dataset_id_B[:, None] << DATASET_KEY_SHIFT)
    return DocumentBatch(doc_ids_BS, keys_BS[valid_BS], iteration)


def document_attention_mask(doc_ids_BS: torch.Tensor) -> torch.Tensor:
    """Megatron attention mask (True = masked) that is causal inside each document.

    Args:
        doc_ids_BS: ``(B, S)`` document ids.

    Returns:
        ``(B, 1, S, S)`` bool: position ``i`` may attend to ``j`` iff ``j <= i`` and both are in
        the same document.
    """
    seq_length = doc_ids_BS.shape[1]
    causal_SS = torch.ones(
        seq_length, seq_length, dtype=torch.bool, device=doc_ids_BS.device
    ).tril_()
    same_doc_BSS = doc_ids_BS[:, :, None] == doc_ids_BS[:, None, :]
    return ~(same_doc_BSS & causal_SS)[:, None]
