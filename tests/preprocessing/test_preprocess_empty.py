"""Zero documents is refused.

``tools/preprocess_data.py`` on an empty JSONL, on one where every record is skipped, or on an empty
token array exits 1 with a message and writes nothing; ``--allow-empty`` writes the empty dataset
(which Megatron's ``IndexedDataset`` cannot even open: numpy refuses to mmap an empty ``.bin``).

Run:
``OMP_NUM_THREADS=1 .venv/bin/python -m pytest tests/preprocessing/test_preprocess_empty.py -q``
"""

from __future__ import annotations

import importlib.util
import json
import os

import numpy as np
import pytest

from megatron_emo.preprocessing.preprocess import EmptyDatasetError, preprocess_jsonl

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def tool():
    spec = importlib.util.spec_from_file_location(
        "preprocess_data_tool", os.path.join(ROOT, "tools", "preprocess_data.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _outputs(tmp_path) -> list[str]:
    return sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("out"))


def test_empty_and_all_skipped_jsonl_exit_1_and_write_nothing(tmp_path, sp_model, tool, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    skipped = tmp_path / "skipped.jsonl"
    skipped.write_text(json.dumps({"text": "  "}) + "\nnot json\n" + json.dumps({"x": 1}) + "\n")
    base = ["--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", sp_model,
            "--output-prefix", str(tmp_path / "out"), "--quiet"]

    assert tool.main(["--input", str(empty), *base]) == 1
    err = capsys.readouterr().err
    assert err == (f"error: no documents to write for {tmp_path}/out_text_document: the input "
                   f"has no records; inputs: {empty}. Nothing was written (allow it with "
                   "--allow-empty)\n")
    assert tool.main(["--input", str(skipped), *base, "--metadata-keys", "domain"]) == 1
    err = capsys.readouterr().err
    assert ("all 3 records were skipped (invalid_json: 1, missing_key: 1, empty_text: 1)"
            in err), err
    assert _outputs(tmp_path) == []

    assert tool.main(["--input", str(skipped), *base, "--allow-empty"]) == 0
    # NOTE: Megatron's IndexedDataset cannot open it (numpy refuses to mmap an empty .bin).
    assert (tmp_path / "out_text_document.bin").stat().st_size == 0
    assert (tmp_path / "out_text_document.idx").is_file()
    summary = json.loads((tmp_path / "out_text_document.summary.json").read_text())
    assert (summary["records_in"], summary["documents_written"], summary["skipped"]) == (3, 0, 3)


def test_library_refuses_by_default(tmp_path, sp_model):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")  # one blank line: one record, skipped as invalid_json
    kwargs = dict(output_prefix=str(tmp_path / "out"), tokenizer_type="SentencePieceTokenizer",
                  tokenizer_model=sp_model, progress=False)
    with pytest.raises(EmptyDatasetError, match=r"all 1 records were skipped \(invalid_json: 1\)"):
        preprocess_jsonl([str(empty)], **kwargs)
    assert _outputs(tmp_path) == []
    assert preprocess_jsonl([str(empty)], allow_empty=True, **kwargs)["documents_written"] == 0


def test_empty_token_array_exits_1(tmp_path, tool, capsys):
    np.zeros(0, dtype=np.uint32).tofile(tmp_path / "tokens.npy")
    base = ["--input-format", "npy", "--input", str(tmp_path / "tokens.npy"), "--eos-id", "3",
            "--vocab-size", "10", "--output-prefix", str(tmp_path / "out"), "--quiet"]
    assert tool.main(base) == 1
    assert "the input has no records" in capsys.readouterr().err
    assert _outputs(tmp_path) == []
    assert tool.main([*base, "--allow-empty"]) == 0
    assert (tmp_path / "out_text_document.bin").stat().st_size == 0
