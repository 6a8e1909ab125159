"""Fixtures for the preprocessing tests.

A tiny JSONL corpus, a tiny sentencepiece model and a local Hugging Face tokenizer directory (built
with ``tokenizers``, no hub access).
"""

from __future__ import annotations

import json

import pytest

from preprocessing_helpers import make_records, write_jsonl


@pytest.fixture(scope="session")
def training_jsonl(tmp_path_factory) -> str:
    """A small JSONL corpus to train the test tokenizers on."""
    path = tmp_path_factory.mktemp("corpus") / "train.jsonl"
    return write_jsonl(path, make_records(400, seed=123))


@pytest.fixture(scope="session")
def sp_model(training_jsonl, tmp_path_factory) -> str:
    """A 400-piece sentencepiece BPE model trained by ``train_sentencepiece``."""
    from megatron_emo.preprocessing.tokenizer_training import train_sentencepiece

    prefix = tmp_path_factory.mktemp("sp") / "tiny"
    return train_sentencepiece([training_jsonl], output_prefix=str(prefix), vocab_size=400)


def _build_hf_dir(training_jsonl: str, out_dir: str, *, with_eos: bool) -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|pad|>"] if with_eos else ["<|pad|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=500, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    with open(training_jsonl) as f:
        texts = [json.loads(line)["text"] for line in f]
    tok.train_from_iterator(texts, trainer=trainer)
    kwargs = {"pad_token": "<|pad|>"}
    if with_eos:
        kwargs["eos_token"] = "<|endoftext|>"
    PreTrainedTokenizerFast(tokenizer_object=tok, **kwargs).save_pretrained(out_dir)
    return out_dir


@pytest.fixture(scope="session")
def hf_tokenizer_dir(training_jsonl, tmp_path_factory) -> str:
    """A local byte-level BPE HF tokenizer directory with eos ``<|endoftext|>`` and a pad token."""
    return _build_hf_dir(training_jsonl, str(tmp_path_factory.mktemp("hf") / "tok"),
                         with_eos=True)


@pytest.fixture(scope="session")
def hf_tokenizer_dir_without_eos(training_jsonl, tmp_path_factory) -> str:
    """Like ``hf_tokenizer_dir`` but with no eos token (so no EOD id)."""
    return _build_hf_dir(training_jsonl, str(tmp_path_factory.mktemp("hf") / "noeos"),
                         with_eos=False)


@pytest.fixture
def tokenizer_spec(request, sp_model, hf_tokenizer_dir) -> tuple[str, str]:
    """``(tokenizer_type, tokenizer_model)`` for the parametrized tokenizer kind."""
    kind = getattr(request, "param", "sentencepiece")
    if kind == "sentencepiece":
        return "SentencePieceTokenizer", sp_model
    return "HuggingFaceTokenizer", hf_tokenizer_dir
