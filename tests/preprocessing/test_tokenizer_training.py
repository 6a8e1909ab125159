"""Sentencepiece training, as Megatron's SentencePieceTokenizer loads it.

Megatron's SentencePieceTokenizer (as megatron.training builds it) loads the model with eod=2 and
pad=3, training is byte-deterministic, and text round-trips exactly.

    PYTHONPATH=. python -m pytest -x -q tests/preprocessing/test_tokenizer_training.py
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from megatron_emo.preprocessing.tokenizer_training import SPECIAL_IDS, train_sentencepiece
from megatron_emo.preprocessing.tokenizers import build_tokenizer

from preprocessing_helpers import make_records, subprocess_env, write_jsonl

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_megatron_loads_model_with_eod_and_pad(sp_model):
    tokenizer = build_tokenizer("SentencePieceTokenizer", sp_model)
    assert tokenizer.eod == SPECIAL_IDS["eos_id"] == 2
    assert tokenizer.pad == SPECIAL_IDS["pad_id"] == 3
    assert tokenizer.vocab_size == 400
    text = "def f(x):\n    return  x + 1\n\ncaf\u00e9 \u2603 unseen \U0001f600"
    ids = tokenizer.tokenize(text)
    assert SPECIAL_IDS["unk_id"] not in ids  # byte fallback
    assert tokenizer.detokenize(ids) == text


@pytest.mark.parametrize("model_type", ["bpe", "unigram"], ids=["bpe", "unigram"])
def test_training_is_deterministic(tmp_path, training_jsonl, model_type):
    paths = [train_sentencepiece([training_jsonl], output_prefix=str(tmp_path / f"m{i}"),
                                 vocab_size=320, model_type=model_type) for i in range(2)]
    with open(paths[0], "rb") as a, open(paths[1], "rb") as b:
        assert a.read() == b.read()
    assert os.path.exists(tmp_path / "m0.vocab")


def test_cli_trains_from_gzip(tmp_path):
    path = write_jsonl(tmp_path / "in.jsonl.gz", make_records(200, seed=3), compress=True)
    cmd = [sys.executable, os.path.join(ROOT, "tools", "train_tokenizer.py"), "--input", path,
           "--vocab-size", "330", "--output-prefix", str(tmp_path / "tok")]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=subprocess_env(), timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "tok.model").exists() and "SentencePieceTokenizer" in proc.stdout


def test_bad_arguments_are_value_errors(tmp_path, training_jsonl):
    with pytest.raises(ValueError, match=r"vocab_size \(100\) must be > 261"):
        train_sentencepiece([training_jsonl], output_prefix=str(tmp_path / "m"), vocab_size=100)
    empty = write_jsonl(tmp_path / "empty.jsonl", [{"body": "x"}])
    with pytest.raises(ValueError, match="no 'text' text found"):
        train_sentencepiece([empty], output_prefix=str(tmp_path / "m"), vocab_size=400)
