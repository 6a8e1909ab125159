"""The one channel that carries document ids to the EMO routers: ``routing_context``.

The forward step wraps each micro-batch's ``model(...)`` call::

    with routing_context(DocumentBatch(doc_ids_BS, doc_keys_D, iteration)):
        output = model(tokens, position_ids, attention_mask, labels=labels)

and every ``EMORouter`` of every pipeline stage reads ``current_documents()``. This module
variable is the only sanctioned global of the package (STYLE.md rule 15).

Why a context and not ``padding_mask``: the router also needs per-micro-batch host-side facts
(the number of documents D, which sizes the ``(D, R)`` pool table without a device sync, their
global keys, and the iteration, which seed the pool sizes). ``padding_mask`` carries one
``[b, s]`` tensor and Megatron casts it to bool inside ``MoELayer.forward``; packing the rest into
it would need a host sync per layer. The cost of a context is that a recompute in the backward
pass runs outside it, so ``EMOTransformerConfig`` refuses full and ``moe`` recompute, and the
router raises in training when no documents are set (also on paths that call ``route``
directly). Under sequence parallelism the router slices its sequence shard out of ``doc_ids``
itself; under context parallelism the forward step shards ``doc_ids`` like the tokens.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from megatron_emo.routing.documents import DocumentBatch

__all__ = ["current_documents", "routing_context"]

_CURRENT: DocumentBatch | None = None


@contextlib.contextmanager
def routing_context(documents: DocumentBatch) -> Iterator[DocumentBatch]:
    """Makes ``documents`` visible to the EMO routers for the duration of the block.

    Args:
        documents: the micro-batch's documents.

    Yields:
        ``documents``.

    Raises:
        RuntimeError: if a context is already active (micro-batches never nest).
    """
    global _CURRENT
    if _CURRENT is not None:
        raise RuntimeError("routing_context is already active: micro-batch forwards do not nest")
    _CURRENT = documents
    try:
        yield documents
    finally:
        _CURRENT = None


def current_documents() -> DocumentBatch | None:
    """The active micro-batch's documents, or None outside ``routing_context``."""
    return _CURRENT
