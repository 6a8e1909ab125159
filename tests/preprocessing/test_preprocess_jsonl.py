"""JSONL -> .bin/.idx preprocessing.

Round trips for both tokenizer types, EOD parity with megatron.training, bad-input categories,
reconciliation, fail mode, crash safety, multi-file/gzip input and order preservation with 2
workers.

    PYTHONPATH=. python -m pytest -x -q tests/preprocessing/test_preprocess_jsonl.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from megatron.core.datasets.indexed_dataset import IndexedDataset

from megatron_emo.preprocessing.preprocess import (
    BAD_INPUT_CATEGORIES,
    BadRecordError,
    preprocess_jsonl,
)
from megatron_emo.preprocessing.tokenizers import build_tokenizer, tokenizer_eod_id
from megatron_emo.preprocessing.writer import IndexedDatasetWriter

from preprocessing_helpers import make_records, subprocess_env, write_jsonl

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOKENIZER_KINDS = ["sentencepiece", "huggingface"]


def _run(inputs, prefix, tokenizer_spec, **kwargs) -> dict:
    tokenizer_type, tokenizer_model = tokenizer_spec
    return preprocess_jsonl([str(p) for p in inputs], output_prefix=str(prefix),
                            tokenizer_type=tokenizer_type, tokenizer_model=tokenizer_model,
                            progress=False, **kwargs)


def _documents(prefix: str) -> list[list[int]]:
    dataset = IndexedDataset(f"{prefix}_text_document")
    return [dataset[i].tolist() for i in range(len(dataset))]


def _check_reconciles(summary: dict) -> None:
    assert summary["records_in"] == summary["documents_written"] + summary["skipped"]
    assert summary["skipped"] == sum(v["count"] for v in summary["skipped_by_category"].values())


@pytest.mark.parametrize("tokenizer_spec", TOKENIZER_KINDS, ids=TOKENIZER_KINDS, indirect=True)
def test_round_trip_and_metadata(tmp_path, tokenizer_spec):
    records = make_records(150, seed=1)
    records[5] = {"text": "only text, no metadata"}
    path = write_jsonl(tmp_path / "in.jsonl", records)
    prefix = tmp_path / "out" / "corpus"
    summary = _run([path], prefix, tokenizer_spec, metadata_keys=("domain", "source", "id"))
    tokenizer = build_tokenizer(*tokenizer_spec)
    eod = tokenizer_eod_id(tokenizer)
    assert eod is not None and summary["eod_id"] == eod
    docs = _documents(f"{prefix}")
    assert len(docs) == len(records) == summary["documents_written"]
    for doc, record in zip(docs, records, strict=True):
        assert doc == list(tokenizer.tokenize(record["text"])) + [eod]
        assert eod not in doc[:-1]
    assert summary["tokens_written"] == sum(len(d) for d in docs)
    with open(f"{prefix}_text_document.metadata.jsonl") as f:
        metadata = [json.loads(line) for line in f]
    assert len(metadata) == len(docs)
    assert metadata[0] == {"domain": "d0", "source": "tests", "id": "r0"}
    assert metadata[5] == {"domain": None, "source": None, "id": None}
    on_disk = json.load(open(f"{prefix}_text_document.summary.json"))
    assert on_disk == summary
    _check_reconciles(summary)
    expected_dtype = "uint16" if tokenizer.vocab_size < 65500 else "int32"
    assert summary["dtype"] == expected_dtype


@pytest.mark.parametrize("tokenizer_spec", TOKENIZER_KINDS, ids=TOKENIZER_KINDS, indirect=True)
def test_eod_matches_megatron_training_builder(tmp_path, monkeypatch, tokenizer_spec):
    """The EOD we append equals ``.eod`` of megatron.training's tokenizer for the same flags."""
    from megatron.core.tokenizers.utils.build_tokenizer import build_tokenizer as mcore_build
    from megatron.training.arguments import parse_args

    tokenizer_type, tokenizer_model = tokenizer_spec
    monkeypatch.setattr(sys, "argv", ["train", "--tokenizer-type", tokenizer_type,
                                      "--tokenizer-model", tokenizer_model])
    args = parse_args(ignore_unknown_args=True)
    training_tokenizer = mcore_build(args)  # what megatron.training.global_vars does
    summary = _run([write_jsonl(tmp_path / "in.jsonl", make_records(5))], tmp_path / "o",
                   tokenizer_spec)
    assert summary["eod_id"] == training_tokenizer.eod
    assert all(doc[-1] == training_tokenizer.eod for doc in _documents(f"{tmp_path}/o"))
    assert training_tokenizer.pad != training_tokenizer.eod


BAD_LINES = {
    "invalid_utf8": b'{"text": "caf\xe9"}',
    "invalid_json": b'{"text": "unterminated',
    "missing_key": b'{"body": "no text key"}',
    "non_string_value": b'{"text": ["a", "list"]}',
    "empty_text": b'{"text": "  \\n "}',
    "line_too_long": b'{"text": "' + b"x" * 300 + b'"}',
}


@pytest.mark.parametrize("category", list(BAD_LINES), ids=list(BAD_LINES))
def test_bad_input_category_is_counted(tmp_path, sp_model, category):
    good = [{"text": f"good record {i}"} for i in range(4)]
    lines = [good[0], good[1], BAD_LINES[category], good[2], BAD_LINES[category], good[3]]
    path = write_jsonl(tmp_path / "in.jsonl", lines)
    summary = _run([path], tmp_path / "o", ("SentencePieceTokenizer", sp_model),
                   max_line_bytes=200)
    entry = summary["skipped_by_category"][category]
    assert entry == {"count": 2, "first_lines": [f"{path}:3", f"{path}:5"]}
    assert summary["skipped"] == 2 and summary["documents_written"] == 4
    assert summary["records_in"] == 6
    _check_reconciles(summary)
    assert set(summary["skipped_by_category"]) == set(BAD_INPUT_CATEGORIES)


def test_mixed_bad_inputs_reconcile_and_edge_cases(tmp_path, sp_model):
    lines = [b"", b"[1, 2]", b'{"text": null}', b'{"text": "\\ud800 lone surrogate"}',
             b'{"text": "' + b"y" * 88 + b'"}',  # exactly max_line_bytes=100 without newline
             *[{"text": f"ok {i}"} for i in range(3)], b'{"text": ""}']
    path = write_jsonl(tmp_path / "in.jsonl", lines)
    summary = _run([path], tmp_path / "o", ("SentencePieceTokenizer", sp_model),
                   max_line_bytes=100)
    counts = {k: v["count"] for k, v in summary["skipped_by_category"].items() if v["count"]}
    assert counts == {"invalid_json": 2, "non_string_value": 1, "invalid_utf8": 1,
                      "empty_text": 1}
    assert summary["documents_written"] == 4  # the 100-byte line is kept
    _check_reconciles(summary)
    # The first lines are capped at 10 per category.
    path = write_jsonl(tmp_path / "many.jsonl", [b"not json"] * 25)
    summary = _run([path], tmp_path / "m", ("SentencePieceTokenizer", sp_model), allow_empty=True)
    assert summary["skipped_by_category"]["invalid_json"]["count"] == 25
    assert len(summary["skipped_by_category"]["invalid_json"]["first_lines"]) == 10


@pytest.mark.parametrize("workers", [1, 2], ids=["workers1", "workers2"])
def test_on_error_fail_names_file_line_and_category(tmp_path, sp_model, workers):
    path = write_jsonl(tmp_path / "in.jsonl", [*make_records(300), b'{"text": 5}',
                                              *make_records(300)])
    with pytest.raises(BadRecordError, match=rf"{path}:301: non_string_value"):
        _run([path], tmp_path / "o", ("SentencePieceTokenizer", sp_model), on_error="fail",
             workers=workers)
    assert os.listdir(tmp_path) == ["in.jsonl"]


def test_cli_on_error_fail_exits_nonzero(tmp_path, sp_model):
    path = write_jsonl(tmp_path / "in.jsonl", [*make_records(2), b"{bad"])
    cmd = [sys.executable, os.path.join(ROOT, "tools", "preprocess_data.py"), "--input", path,
           "--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", sp_model,
           "--output-prefix", str(tmp_path / "o"), "--on-error", "fail", "--quiet"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=subprocess_env(), timeout=120)
    assert proc.returncode == 1
    assert f"{path}:3: invalid_json" in proc.stderr
    assert not any(name.startswith("o_") for name in os.listdir(tmp_path))


def test_interrupted_run_leaves_no_complete_dataset(tmp_path, sp_model, monkeypatch):
    path = write_jsonl(tmp_path / "in.jsonl", make_records(300))
    calls = {"n": 0}
    seen_files: list[str] = []
    original = IndexedDatasetWriter.add_documents

    def crash_on_third_batch(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            seen_files.extend(os.listdir(tmp_path / "out"))
            raise KeyboardInterrupt("simulated interrupt")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(IndexedDatasetWriter, "add_documents", crash_on_third_batch)
    with pytest.raises(KeyboardInterrupt):
        _run([path], tmp_path / "out" / "c", ("SentencePieceTokenizer", sp_model),
             metadata_keys=("domain",))
    # Mid-run only *.partial files exist; after the interrupt nothing is left.
    assert seen_files and all(name.endswith(".partial") for name in seen_files), seen_files
    assert os.listdir(tmp_path / "out") == []


def test_rerun_replaces_previous_outputs(tmp_path, sp_model):
    spec = ("SentencePieceTokenizer", sp_model)
    first = write_jsonl(tmp_path / "a.jsonl", make_records(20, seed=1))
    _run([first], tmp_path / "o", spec, metadata_keys=("id",))
    second = write_jsonl(tmp_path / "b.jsonl", make_records(7, seed=2))
    _run([second], tmp_path / "o", spec)  # no metadata this time: stale sidecar is removed
    assert len(_documents(f"{tmp_path}/o")) == 7
    assert not os.path.exists(f"{tmp_path}/o_text_document.metadata.jsonl")


def test_multi_file_gzip_and_glob_inputs_keep_order(tmp_path, sp_model):
    spec = ("SentencePieceTokenizer", sp_model)
    parts = [make_records(30, seed=s, prefix=f"p{s}_") for s in range(3)]
    write_jsonl(tmp_path / "part0.jsonl", parts[0])
    write_jsonl(tmp_path / "part1.jsonl.gz", parts[1], compress=True)
    write_jsonl(tmp_path / "part2.jsonl.gz", parts[2], compress=True)
    summary = _run([tmp_path / "part0.jsonl", str(tmp_path / "part[12].jsonl.gz")],
                   tmp_path / "o", spec, metadata_keys=("id",))
    assert summary["inputs"] == [str(tmp_path / f) for f in
                                 ("part0.jsonl", "part1.jsonl.gz", "part2.jsonl.gz")]
    tokenizer = build_tokenizer(*spec)
    records = [r for part in parts for r in part]
    assert _documents(f"{tmp_path}/o") == [tokenizer.tokenize(r["text"]) + [tokenizer.eod]
                                           for r in records]
    with open(f"{tmp_path}/o_text_document.metadata.jsonl") as f:
        assert [json.loads(line)["id"] for line in f] == [r["id"] for r in records]


@pytest.mark.parametrize("start_method", ["fork", "spawn"], ids=["fork", "spawn"])
def test_two_workers_preserve_order_byte_for_byte(tmp_path, sp_model, monkeypatch, start_method):
    monkeypatch.setenv("EMO_PREPROCESS_START_METHOD", start_method)
    spec = ("SentencePieceTokenizer", sp_model)
    records = make_records(700, seed=9)
    records[333] = b"broken"
    path = write_jsonl(tmp_path / "in.jsonl", records)
    one = _run([path], tmp_path / "w1", spec, metadata_keys=("id",), workers=1)
    two = _run([path], tmp_path / "w2", spec, metadata_keys=("id",), workers=2)
    for suffix in (".bin", ".idx", ".metadata.jsonl"):
        with open(f"{tmp_path}/w1_text_document{suffix}", "rb") as a, \
                open(f"{tmp_path}/w2_text_document{suffix}", "rb") as b:
            assert a.read() == b.read(), suffix
    for key in ("records_in", "documents_written", "tokens_written", "skipped_by_category"):
        assert one[key] == two[key]
    assert two["skipped_by_category"]["invalid_json"]["first_lines"] == [f"{path}:334"]


def test_tokenizer_without_eod_is_refused(tmp_path, hf_tokenizer_dir_without_eos):
    path = write_jsonl(tmp_path / "in.jsonl", make_records(3))
    spec = ("HuggingFaceTokenizer", hf_tokenizer_dir_without_eos)
    with pytest.raises(ValueError, match="has no EOD id"):
        _run([path], tmp_path / "o", spec)
    with pytest.warns(UserWarning, match="no EOD token"):
        summary = _run([path], tmp_path / "o", spec, append_eod=False)
    assert summary["append_eod"] is False and summary["documents_written"] == 3


def test_tokenizer_eod_id_treats_negative_as_missing():
    class Fake:
        def __init__(self, eod):
            self.eod = eod

    assert tokenizer_eod_id(Fake(-1)) is None
    assert tokenizer_eod_id(Fake(None)) is None
    assert tokenizer_eod_id(Fake(np.int64(7))) == 7


def test_missing_input_is_a_value_error(tmp_path, sp_model):
    with pytest.raises(ValueError, match="matches no file"):
        _run([tmp_path / "nope*.jsonl"], tmp_path / "o", ("SentencePieceTokenizer", sp_model))


def test_tokenizer_error_category(tmp_path, sp_model, monkeypatch):
    import megatron_emo.preprocessing.preprocess as preprocess

    real_build = preprocess.build_tokenizer_from_args

    class Exploding:
        def __init__(self, inner):
            self.inner = inner

        def tokenize(self, text):
            if "BOOM" in text:
                raise RuntimeError("tokenizer exploded")
            return self.inner.tokenize(text)

    monkeypatch.setattr(preprocess, "build_tokenizer_from_args",
                        lambda args: Exploding(real_build(args)))
    monkeypatch.setattr(preprocess, "tokenizer_eod_id", lambda tokenizer: 2)
    monkeypatch.setattr(Exploding, "vocab_size", 400, raising=False)
    path = write_jsonl(tmp_path / "in.jsonl", [{"text": "fine"}, {"text": "BOOM here"}])
    summary = _run([path], tmp_path / "o", ("SentencePieceTokenizer", sp_model))
    assert summary["skipped_by_category"]["tokenizer_error"] == {
        "count": 1, "first_lines": [f"{path}:2"]}
    _check_reconciles(summary)


def test_multiple_json_keys_stay_aligned(tmp_path, sp_model):
    records = [{"text": f"body {i}", "title": f"title {i}", "id": i} for i in range(10)]
    records[4] = {"text": "body without title", "id": 4}
    path = write_jsonl(tmp_path / "in.jsonl", records)
    summary = _run([path], tmp_path / "o", ("SentencePieceTokenizer", sp_model),
                   json_keys=("text", "title"), metadata_keys=("id",))
    assert summary["skipped_by_category"]["missing_key"]["first_lines"] == [f"{path}:5"]
    tokenizer = build_tokenizer("SentencePieceTokenizer", sp_model)
    kept = [r for r in records if "title" in r]
    for key in ("text", "title"):
        dataset = IndexedDataset(f"{tmp_path}/o_{key}_document")
        assert [dataset[i].tolist() for i in range(len(dataset))] == [
            tokenizer.tokenize(r[key]) + [tokenizer.eod] for r in kept]
        with open(f"{tmp_path}/o_{key}_document.metadata.jsonl") as f:
            assert [json.loads(line)["id"] for line in f] == [r["id"] for r in kept]
        summary_k = json.load(open(f"{tmp_path}/o_{key}_document.summary.json"))
        _check_reconciles(summary_k)


def _load_tool(name: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "tools", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cli_npy_conversion_and_argument_errors(tmp_path, capsys):
    tool = _load_tool("preprocess_data")
    np.array([7, 8, 3, 9, 3, 5], dtype=np.uint32).tofile(tmp_path / "tokens.npy")
    base = ["--input-format", "npy", "--input", str(tmp_path / "tokens.npy"),
            "--output-prefix", str(tmp_path / "o"), "--quiet"]
    assert tool.main(base + ["--eos-id", "3", "--vocab-size", "10"]) == 0
    dataset = IndexedDataset(f"{tmp_path}/o_text_document")
    assert [dataset[i].tolist() for i in range(len(dataset))] == [[7, 8, 3], [9, 3], [5]]
    assert "records_in=3 documents_written=3" in capsys.readouterr().out
    assert tool.main(base + ["--eos-id", "3"]) == 2
    assert "--input-format npy needs --eos-id and --vocab-size" in capsys.readouterr().err
    assert tool.main(base + ["--eos-id", "3", "--vocab-size", "10",
                             "--metadata-keys", "domain"]) == 2
    assert tool.main(["--input", str(tmp_path / "tokens.npy"), "--output-prefix",
                      str(tmp_path / "p")]) == 2
    assert "--tokenizer-type is required" in capsys.readouterr().err


@pytest.mark.parametrize("signal_name", ["SIGINT", "SIGKILL"], ids=["sigint", "sigkill"])
def test_killed_cli_never_leaves_complete_looking_dataset(tmp_path, sp_model, signal_name):
    """A real process killed mid-run: SIGINT cleans up; SIGKILL leaves only ``*.partial``."""
    import signal
    import time

    path = write_jsonl(tmp_path / "in.jsonl", make_records(20_000, seed=5) * 3)
    cmd = [sys.executable, os.path.join(ROOT, "tools", "preprocess_data.py"), "--input", path,
           "--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", sp_model,
           "--output-prefix", str(tmp_path / "out" / "c"), "--quiet", "--metadata-keys", "id"]
    proc = subprocess.Popen(cmd, env=subprocess_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    partial = tmp_path / "out" / "c_text_document.bin.partial"
    deadline = time.monotonic() + 120
    while not (partial.exists() and partial.stat().st_size > 0) and proc.poll() is None:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert proc.poll() is None, "run finished before it could be interrupted"
    proc.send_signal(getattr(signal, signal_name))
    proc.communicate(timeout=60)
    assert proc.returncode != 0
    left = sorted(os.listdir(tmp_path / "out"))
    assert not any(name.endswith((".bin", ".idx", ".json", ".jsonl")) for name in left), left
    if signal_name == "SIGINT":
        assert left == []
