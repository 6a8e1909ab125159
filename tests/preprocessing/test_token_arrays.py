"""Flat token arrays (Dolma ``.npy``, raw or with header) -> .bin/.idx.

EOS splitting across chunk boundaries, trailing fragments, dtype choice, id bounds; and GPTDataset
reading our output.

    PYTHONPATH=. python -m pytest -x -q tests/preprocessing/test_token_arrays.py
"""

from __future__ import annotations

import numpy as np
import pytest
from megatron.core.datasets.indexed_dataset import IndexedDataset

from megatron_emo.preprocessing.preprocess import preprocess_jsonl
from megatron_emo.preprocessing.token_arrays import convert_token_arrays
from megatron_emo.preprocessing.tokenizers import build_tokenizer

from preprocessing_helpers import make_records, write_jsonl

EOS = 100257
VOCAB = 100278


def _reference_split(tokens: np.ndarray) -> list[list[int]]:
    docs, current = [], []
    for t in tokens.tolist():
        current.append(t)
        if t == EOS:
            docs.append(current)
            current = []
    if current:
        docs.append(current)
    return docs


def _random_stream(rng: np.random.Generator, num_docs: int, *, trailing: int) -> np.ndarray:
    parts = []
    for _ in range(num_docs):
        parts.append(rng.integers(0, EOS, size=int(rng.integers(0, 30)), dtype=np.uint32))
        parts.append(np.array([EOS], dtype=np.uint32))
    parts.append(rng.integers(0, EOS, size=trailing, dtype=np.uint32))
    return np.concatenate(parts)


@pytest.mark.parametrize("chunk_tokens", [1, 7, 1 << 20], ids=["chunk1", "chunk7", "chunk1M"])
def test_npy_round_trip_raw_and_header(tmp_path, chunk_tokens):
    rng = np.random.default_rng(0)
    raw = _random_stream(rng, 40, trailing=5)  # includes EOS-only documents (length 0 + EOS)
    with_header = _random_stream(rng, 25, trailing=0)
    raw.tofile(tmp_path / "part-000.npy")  # OLMo style: headerless uint32 memmap
    np.save(tmp_path / "part-001.npy", with_header)
    summary = convert_token_arrays([str(tmp_path / "part-*.npy")],
                                   output_prefix=str(tmp_path / "out" / "dolma"), eos_id=EOS,
                                   vocab_size=VOCAB, chunk_tokens=chunk_tokens)
    dataset = IndexedDataset(str(tmp_path / "out" / "dolma_text_document"))
    expected = _reference_split(raw) + _reference_split(with_header)
    assert [dataset[i].tolist() for i in range(len(dataset))] == expected
    assert dataset[0].dtype == np.int32  # vocab > 65500 -> int32, as Megatron's optimal_dtype
    assert summary["documents_written"] == summary["records_in"] == len(expected)
    assert summary["tokens_written"] == raw.size + with_header.size
    assert summary["documents_without_eos"] == 1
    assert "part-000.npy: 5 trailing tokens" in summary["documents_without_eos_at"][0]
    assert summary["eos_only_documents"] == sum(1 for d in expected if d == [EOS])


def test_npy_small_vocab_uses_uint16_and_rejects_out_of_range(tmp_path):
    np.array([5, 6, 1, 7, 1], dtype=np.uint32).tofile(tmp_path / "a.npy")
    convert_token_arrays([str(tmp_path / "a.npy")], output_prefix=str(tmp_path / "o"), eos_id=1,
                         vocab_size=100)
    dataset = IndexedDataset(str(tmp_path / "o_text_document"))
    assert dataset[0].dtype == np.uint16
    assert [dataset[i].tolist() for i in range(len(dataset))] == [[5, 6, 1], [7, 1]]
    np.array([5, 600, 1], dtype=np.uint32).tofile(tmp_path / "b.npy")
    with pytest.raises(ValueError, match=r"token 600 at position 1 is >= vocab_size \(100\)"):
        convert_token_arrays([str(tmp_path / "b.npy")], output_prefix=str(tmp_path / "p"),
                             eos_id=1, vocab_size=100)
    assert not (tmp_path / "p_text_document.bin").exists()
    (tmp_path / "c.npy").write_bytes(b"\x00" * 6)
    with pytest.raises(ValueError, match="not a multiple of uint32"):
        convert_token_arrays([str(tmp_path / "c.npy")], output_prefix=str(tmp_path / "q"),
                             eos_id=1, vocab_size=100)


def test_gpt_dataset_reads_preprocessed_output(tmp_path, sp_model):
    """BlendedMegatronDatasetBuilder -> GPTDataset over our .bin/.idx, with document masking."""
    from megatron.core.datasets.blended_megatron_dataset_builder import (
        BlendedMegatronDatasetBuilder,
    )
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    path = write_jsonl(tmp_path / "in.jsonl", make_records(200, seed=4))
    preprocess_jsonl([path], output_prefix=str(tmp_path / "c"),
                     tokenizer_type="SentencePieceTokenizer", tokenizer_model=sp_model,
                     progress=False)
    tokenizer = build_tokenizer("SentencePieceTokenizer", sp_model)
    config = GPTDatasetConfig(
        random_seed=1234, sequence_length=64, blend=([str(tmp_path / "c_text_document")], None),
        split="90,10,0", tokenizer=tokenizer, reset_position_ids=False,
        reset_attention_mask=False, eod_mask_loss=False, path_to_cache=str(tmp_path / "cache"),
        inter_document_masking=True)
    train, valid, _ = BlendedMegatronDatasetBuilder(
        GPTDataset, [20, 4, 0], lambda: True, config).build()
    sample = train[0]
    assert sample["tokens"].shape == (64,)
    assert int(sample["tokens"].max()) < tokenizer.vocab_size
    assert (sample["tokens"] == tokenizer.eod).any() or (sample["labels"] == tokenizer.eod).any()
    assert "cu_seqlens" in sample
    assert len(valid) >= 4
