"""Document ids (``doc_ids_from_eod``, ``doc_ids_from_cu_seqlens``), ``segment_sum``, vs loops.

The EOD token belongs to the document it ends; ids are dense across the micro-batch.
Run: ``OMP_NUM_THREADS=1 .venv/bin/python -m pytest tests/unit/test_documents.py -q``
"""

from __future__ import annotations

import pytest
import torch

from megatron_emo.routing import doc_ids_from_cu_seqlens, doc_ids_from_eod, segment_sum

from reference import reference_doc_ids_from_eod

EOD = 7


def _rows(name: str) -> torch.Tensor:
    gen = torch.Generator().manual_seed(sum(map(ord, name)))
    tokens = torch.randint(8, 30, (4, 16), generator=gen)
    if name == "random":
        tokens[torch.rand(4, 16, generator=gen) < 0.2] = EOD
    elif name == "eod_first":
        tokens[:, 0] = EOD
    elif name == "eod_last":
        tokens[:, -1] = EOD
    elif name == "no_eod":
        pass
    elif name == "consecutive":
        tokens[:, 3:6] = EOD
        tokens[1, 10:] = EOD
    elif name == "mixed":
        tokens[0, 0] = EOD
        tokens[0, -1] = EOD
        tokens[2, 4:6] = EOD
        tokens[3, :] = EOD
    elif name == "single_row_all_eod":
        tokens = torch.full((1, 5), EOD)
    else:
        raise KeyError(name)
    return tokens


ROW_CASES = [
    "random", "eod_first", "eod_last", "no_eod", "consecutive", "mixed", "single_row_all_eod"
]


@pytest.mark.parametrize("name", ROW_CASES, ids=ROW_CASES)
def test_doc_ids_from_eod_matches_reference(name: str) -> None:
    tokens = _rows(name)
    doc_ids, num_docs = doc_ids_from_eod(tokens, eod_id=EOD)
    ref_ids, ref_num = reference_doc_ids_from_eod(tokens, EOD)
    assert doc_ids.dtype == torch.int64 and num_docs.dtype == torch.int64
    assert torch.equal(doc_ids, ref_ids)
    assert torch.equal(num_docs, ref_num)
    # Dense ids 0..D-1, all used.
    assert sorted(set(doc_ids.flatten().tolist())) == list(range(int(num_docs.sum())))


def test_doc_ids_from_eod_hand_case() -> None:
    tokens = torch.tensor([[7, 1, 2, 7, 3, 7], [1, 1, 1, 1, 1, 1], [1, 7, 7, 1, 1, 7]])
    doc_ids, num_docs = doc_ids_from_eod(tokens, eod_id=7)
    assert doc_ids.tolist() == [[0, 1, 1, 1, 2, 2], [3, 3, 3, 3, 3, 3], [4, 4, 5, 6, 6, 6]]
    assert num_docs.tolist() == [3, 1, 3]


def test_doc_ids_from_eod_rejects_1d() -> None:
    with pytest.raises(ValueError):
        doc_ids_from_eod(torch.tensor([1, 2, 7]), eod_id=7)


LENGTHS = [[1], [5, 1, 9, 3], [1, 1, 1, 1], [16]]


@pytest.mark.parametrize("lengths", LENGTHS, ids=["one_token", "mixed", "all_single", "one_doc"])
def test_cu_seqlens_agrees_with_eod(lengths: list[int]) -> None:
    gen = torch.Generator().manual_seed(len(lengths))
    pieces = []
    for n in lengths:
        doc = torch.randint(8, 30, (n,), generator=gen)
        doc[-1] = EOD  # every packed document ends with its EOD
        pieces.append(doc)
    tokens = torch.cat(pieces)
    cu_seqlens = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)
    from_cu = doc_ids_from_cu_seqlens(cu_seqlens)
    from_eod, _ = doc_ids_from_eod(tokens[None], eod_id=EOD)
    assert from_cu.dtype == torch.int64
    assert torch.equal(from_cu, from_eod[0])
    assert torch.equal(doc_ids_from_cu_seqlens(cu_seqlens, num_tokens=tokens.numel()), from_cu)


def test_cu_seqlens_padding_gets_last_document() -> None:
    cu_seqlens = torch.tensor([0, 2, 5])
    assert doc_ids_from_cu_seqlens(cu_seqlens, num_tokens=8).tolist() == [0, 0, 1, 1, 1, 1, 1, 1]


def test_segment_sum_matches_loop() -> None:
    gen = torch.Generator().manual_seed(0)
    values = torch.randn(50, 6, generator=gen, dtype=torch.float64)
    doc_ids = torch.randint(0, 9, (50,), generator=gen)  # unsorted ids, some docs empty
    out = segment_sum(values, doc_ids, 10)
    expect = torch.zeros(10, 6, dtype=torch.float64)
    for t in range(50):
        for e in range(6):
            expect[int(doc_ids[t]), e] += values[t, e]
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, expect, atol=1e-12, rtol=0)
    assert torch.all(out[9] == 0)
