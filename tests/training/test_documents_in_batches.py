"""Documents in training batches (no model, no process group).

``EMOGPTDataset`` ids and keys against GPTDataset's own ``cu_seqlens`` and the stored documents.

Run: ``OMP_NUM_THREADS=1 .venv/bin/python -m pytest tests/training/test_documents_in_batches.py -q``
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import pytest
import torch

VOCAB = 128
EOD = 127
SEQ = 64


class _Tokenizer:
    """What GPTDataset needs from a tokenizer (cpu_megatron.md section 6)."""

    eod = EOD
    pad = -1
    vocab_size = VOCAB
    unique_identifiers = OrderedDict({"class": "TestTokenizer", "vocab": VOCAB})


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """120 documents of 1-150 tokens (many longer than a window), each ending with EOD."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    prefix = str(tmp_path_factory.mktemp("corpus") / "docs")
    rng = np.random.default_rng(0)
    docs = []
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.int32)
    for _ in range(120):
        n = int(rng.integers(0, 150))
        doc = np.concatenate([rng.integers(0, EOD, n), [EOD]]).astype(np.int32)
        docs.append(doc)
        builder.add_document(doc, [len(doc)])
    builder.finalize(prefix + ".idx")
    return prefix, docs


def _build(prefix: str, *, inter_document_masking: bool = True, num_samples: int = 80):
    from megatron.core.datasets.blended_megatron_dataset_builder import (
        BlendedMegatronDatasetBuilder,
    )
    from megatron.core.datasets.gpt_dataset import GPTDatasetConfig

    from megatron_emo.training.dataset import EMOGPTDataset

    config = GPTDatasetConfig(
        random_seed=5,
        sequence_length=SEQ,
        blend=([prefix], None),
        split="100,0,0",
        tokenizer=_Tokenizer(),
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=False,
        inter_document_masking=inter_document_masking,
        path_to_cache=None,
    )
    train, _, _ = BlendedMegatronDatasetBuilder(
        EMOGPTDataset, [num_samples, None, None], lambda: True, config
    ).build()
    return train


def _unblend(dataset):
    return getattr(dataset, "datasets", [dataset])[0] if hasattr(dataset, "datasets") else dataset


def test_segments_match_cu_seqlens_and_stored_documents(corpus):
    prefix, docs = corpus
    dataset = _build(prefix)
    split_keys = set()
    for idx in range(len(dataset)):
        sample = dataset[idx]
        seg_S, keys_S, cu = sample["doc_segments"], sample["doc_keys"], sample["cu_seqlens"]
        num_docs = int(seg_S[-1]) + 1
        cu = torch.unique_consecutive(cu)
        assert cu.numel() == num_docs + 1
        # Segment ids change exactly where GPTDataset's cu_seqlens put a boundary.
        boundaries = (torch.nonzero(seg_S[1:] != seg_S[:-1]).flatten() + 1).tolist()
        assert boundaries == cu[1:-1].tolist()
        assert (keys_S[:num_docs] >= 0).all() and (keys_S[num_docs:] == -1).all()
        tokens = sample["tokens"].numpy()
        for d in range(num_docs):
            part = tokens[int(cu[d]) : int(cu[d + 1])]
            doc = docs[int(keys_S[d])]
            # Each segment is a contiguous slice of the document its key names.
            starts = [s for s in range(len(doc) - len(part) + 1)
                      if (doc[s : s + len(part)] == part).all()]
            assert starts, f"sample {idx} segment {d} is not part of document {int(keys_S[d])}"
            # EOD closes a document: inside a segment, only its last token may be EOD.
            assert not (part[:-1] == EOD).any()
            if d < num_docs - 1:
                assert part[-1] == EOD
        if num_docs and (tokens[0] != docs[int(keys_S[0])][0]):
            split_keys.add(int(keys_S[0]))  # a document continued from the previous window
    assert split_keys, "the corpus should contain documents cut at window edges"


def test_document_cut_at_window_edge_keeps_its_key(corpus):
    """A document split over consecutive windows: different ids per window, one key."""
    prefix, docs = corpus
    dataset = _unblend(_build(prefix))
    # Without shuffling the sample order, window i+1 continues window i's last document.
    dataset[0]  # loads the (possibly lazily mapped) indices
    dataset.shuffle_index = np.arange(len(dataset), dtype=np.int64)
    from megatron_emo.training.dataset import documents_from_batch

    found = 0
    for idx in range(len(dataset) - 1):
        a, b = dataset[idx], dataset[idx + 1]
        last_key = int(a["doc_keys"][int(a["doc_segments"][-1])])
        if a["tokens"][-1] != EOD and int(b["doc_keys"][0]) == last_key:
            found += 1
            batch = {k: torch.stack([a[k], b[k]]) for k in ("doc_segments", "doc_keys")}
            docs_batch = documents_from_batch(batch, iteration=3)
            id_a = int(docs_batch.doc_ids[0, -1])
            id_b = int(docs_batch.doc_ids[1, 0])
            assert id_a != id_b
            assert int(docs_batch.doc_keys[id_a]) == int(docs_batch.doc_keys[id_b]) == last_key
    assert found > 5


def test_documents_from_batch_dense_ids_and_blend_keys():
    from megatron_emo.training.dataset import DATASET_KEY_SHIFT, documents_from_batch

    segments = torch.tensor([[0, 0, 1, 1, 2, 2], [0, 0, 0, 0, 0, 1]])
    keys = torch.tensor([[7, 8, 9, -1, -1, -1], [9, 4, -1, -1, -1, -1]])
    docs = documents_from_batch({"doc_segments": segments, "doc_keys": keys}, iteration=11)
    assert docs.doc_ids.tolist() == [[0, 0, 1, 1, 2, 2], [3, 3, 3, 3, 3, 4]]
    assert docs.doc_keys.tolist() == [7, 8, 9, 9, 4]
    assert docs.iteration == 11 and docs.num_docs == 5
    blended = documents_from_batch(
        {"doc_segments": segments, "doc_keys": keys, "dataset_id": torch.tensor([0, 2])},
        iteration=0,
    )
    assert blended.doc_keys.tolist() == [
        7, 8, 9, (2 << DATASET_KEY_SHIFT) + 9, (2 << DATASET_KEY_SHIFT) + 4
    ]


def test_attention_mask_agrees_with_documents(corpus):
    """The block-causal mask allows exactly same-document, non-future positions."""
    from megatron_emo.training.dataset import document_attention_mask, documents_from_batch

    prefix, _ = corpus
    dataset = _build(prefix)
    samples = [dataset[i] for i in range(4)]
    batch = {k: torch.stack([s[k] for s in samples]) for k in ("doc_segments", "doc_keys")}
    docs = documents_from_batch(batch, iteration=0)
    mask = document_attention_mask(docs.doc_ids)
    assert mask.shape == (4, 1, SEQ, SEQ)
    for b, sample in enumerate(samples):
        cu = torch.unique_consecutive(sample["cu_seqlens"]).tolist()
        allowed = torch.zeros(SEQ, SEQ, dtype=torch.bool)
        for start, end in zip(cu[:-1], cu[1:], strict=True):
            allowed[start:end, start:end] = torch.ones(end - start, end - start,
                                                       dtype=torch.bool).tril()
        assert torch.equal(~mask[b, 0], allowed)


def test_token_segments_padding_and_extra_token():
    from megatron_emo.training.dataset import token_segments

    # 3 parts fetched for S=8 plus the label-only extra token (in the last part).
    assert token_segments([3, 4, 2], seq_length=8, add_extra_token=True).tolist() == [
        0, 0, 0, 1, 1, 1, 1, 2
    ]
    # The extra token alone in the last part adds no segment.
    assert (token_segments([4, 4, 1], seq_length=8, add_extra_token=True).tolist()
            == [0] * 4 + [1] * 4)
    # A short (padded) sample folds the padding into the last document, as cu_seqlens does.
    assert token_segments([2, 3], seq_length=8, add_extra_token=True).tolist() == [
        0, 0, 1, 1, 1, 1, 1, 1
    ]
    with pytest.raises(ValueError, match="seq_length 4"):
        token_segments([3, 4], seq_length=4, add_extra_token=False)


def test_mock_dataset_samples_carry_documents():
    """``--mock-data``: EMOMockGPTDataset samples carry segments that match its cu_seqlens."""
    from megatron.core.datasets.blended_megatron_dataset_builder import (
        BlendedMegatronDatasetBuilder,
    )
    from megatron.core.datasets.gpt_dataset import GPTDatasetConfig

    from megatron_emo.training.dataset import EMOMockGPTDataset

    config = GPTDatasetConfig(
        random_seed=1, sequence_length=SEQ, blend=None, split="100,0,0", tokenizer=_Tokenizer(),
        reset_position_ids=False, reset_attention_mask=False, eod_mask_loss=False,
        create_attention_mask=False, inter_document_masking=True, path_to_cache=None,
    )
    train, _, _ = BlendedMegatronDatasetBuilder(
        EMOMockGPTDataset, [16, None, None], lambda: True, config
    ).build()
    for idx in range(8):
        sample = train[idx]
        cu = torch.unique_consecutive(sample["cu_seqlens"])
        seg = sample["doc_segments"]
        assert (torch.nonzero(seg[1:] != seg[:-1]).flatten() + 1).tolist() == cu[1:-1].tolist()
        assert (sample["doc_keys"][: int(seg[-1]) + 1] >= 0).all()
