"""Per-token document ids: from EOD tokens, from packed ``cu_seqlens``, and segment sums.

Boundary convention (used everywhere in megatron_emo): **the EOD token belongs to the document it
ends.** Megatron's preprocessing appends EOD to every document, and ``GPTDataset`` with
``inter_document_masking`` puts each EOD inside its own document's ``cu_seqlens`` span, so with
this convention the router's documents and the attention mask's documents are the same token
sets. (The reference EMO router starts a new segment *at* the EOD instead, which disagrees with
its own attention mask by one token at every boundary; see ``emo_spec.md`` section 1.4.)

Consequences: the tokens before the first EOD of a window form a (partial) document that ends
with that EOD; a window without EOD is one document; an EOD at the last position ends the last
document and opens no new one.

Shape legend: B sequences, S tokens per sequence, T = B * S tokens, D documents, E experts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = [
    "DocumentBatch",
    "doc_ids_from_cu_seqlens",
    "doc_ids_from_eod",
    "segment_sum",
]


def doc_ids_from_eod(tokens_BS: torch.Tensor, *, eod_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Assigns a micro-batch-wide document id to every token, cutting after each EOD.

    Ids are dense and ordered: sequence 0's documents get ids 0, 1, ..., then sequence 1's
    continue, so a document never shares an id with a document of another sequence.

    Args:
        tokens_BS: ``(B, S)`` integer token ids.
        eod_id: the end-of-document token id.

    Returns:
        ``(doc_ids_BS, num_docs_B)``: ``(B, S)`` int64 ids in ``[0, D)`` with
        ``D = num_docs_B.sum()``, and ``(B,)`` int64 documents per sequence. Computed on the
        input's device without host synchronisation; converting ``D`` to a Python int is the
        caller's choice (free when the batch is still on the host).
    """
    if tokens_BS.dim() != 2:
        raise ValueError(f"tokens must be (B, S), got shape {tuple(tokens_BS.shape)}")
    is_eod_BS = (tokens_BS == eod_id).to(torch.int64)
    # Exclusive cumsum: the token right after an EOD starts a new document.
    local_ids_BS = torch.cumsum(is_eod_BS, dim=1) - is_eod_BS
    num_docs_B = local_ids_BS[:, -1] + 1
    offsets_B = torch.cumsum(num_docs_B, dim=0) - num_docs_B
    return local_ids_BS + offsets_B[:, None], num_docs_B


def doc_ids_from_cu_seqlens(
    cu_seqlens_D1: torch.Tensor, *, num_tokens: int | None = None
) -> torch.Tensor:
    """Document id of every token of a packed (THD) sequence described by ``cu_seqlens``.

    Args:
        cu_seqlens_D1: ``(D + 1,)`` cumulative document lengths, starting at 0 (Megatron's
            ``PackedSeqParams.cu_seqlens_q`` / ``GPTDataset`` ``cu_seqlens``).
        num_tokens: tokens to label; defaults to ``cu_seqlens[-1]`` (which costs a host sync on
            an accelerator; pass it when known).

    Returns:
        ``(T,)`` int64 ids in ``[0, D)``; token ``t`` belongs to the document whose span
        ``[cu_seqlens[d], cu_seqlens[d + 1])`` contains it. Tokens past ``cu_seqlens[-1]``
        (padding) get the last document's id.
    """
    if cu_seqlens_D1.dim() != 1 or cu_seqlens_D1.numel() < 2:
        raise ValueError(
            f"cu_seqlens must be 1-D with >= 2 entries, got {tuple(cu_seqlens_D1.shape)}"
        )
    if num_tokens is None:
        num_tokens = int(cu_seqlens_D1[-1])
    positions_T = torch.arange(num_tokens, device=cu_seqlens_D1.device, dtype=cu_seqlens_D1.dtype)
    ends_D = cu_seqlens_D1[1:].contiguous()
    doc_ids_T = torch.searchsorted(ends_D, positions_T, right=True)
    return doc_ids_T.clamp_(max=ends_D.numel() - 1).to(torch.int64)


def segment_sum(values_TE: torch.Tensor, doc_ids_T: torch.Tensor, num_docs: int) -> torch.Tensor:
    """Sums token rows per document: ``out[d] = sum(values[t] for t with doc_ids[t] == d)``.

    Args:
        values_TE: ``(T, E)`` values.
        doc_ids_T: ``(T,)`` int64 ids in ``[0, num_docs)``.
        num_docs: D.

    Returns:
        ``(D, E)`` sums in the dtype of ``values_TE``.
    """
    out_DE = values_TE.new_zeros((num_docs, values_TE.shape[1]))
    return out_DE.index_add_(0, doc_ids_T, values_TE)


@dataclass(frozen=True)
class DocumentBatch:
    """The documents of one micro-batch, as the router needs them.

    Attributes:
        doc_ids: ``(B, S)`` int64 document id of every token, in ``[0, D)``, in the model's
            ``[batch, sequence]`` layout (CP-sharded exactly like the tokens when CP > 1).
            Ids are shared by all shards of a micro-batch, so SP/CP shards of one document can
            all-reduce its partial sums by id.
        doc_keys: ``(D,)`` int64 global key of each document segment (for example the dataset's
            global document index); seeds the pool-size draw, so equal keys get equal pools.
        iteration: the training iteration, the other counter of the pool-size draw.
    """

    doc_ids: torch.Tensor
    doc_keys: torch.Tensor
    iteration: int

    def __post_init__(self) -> None:
        if self.doc_ids.dim() != 2:
            raise ValueError(f"doc_ids must be (B, S), got shape {tuple(self.doc_ids.shape)}")
        if self.doc_keys.dim() != 1:
            raise ValueError(f"doc_keys must be (D,), got shape {tuple(self.doc_keys.shape)}")

    @property
    def num_docs(self) -> int:
        """D, the number of documents (a Python int: known without a device sync)."""
        return self.doc_keys.shape[0]

    def to(self, device: torch.device | str) -> DocumentBatch:
        """The same batch on ``device``."""
        return DocumentBatch(
            self.doc_ids.to(device, non_blocking=True),
            self.doc_keys.to(device, non_blocking=True),
            self.iteration,
        )
