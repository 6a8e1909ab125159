"""HF directory I/O without megatron: shard size limits and index, tokenizer export with its
vocab check (HF ``tokenizer.json``; a sentencepiece ``.model`` file is copied
as ``tokenizer.model`` without a vocab check, since sentencepiece is not a dependency).

Run: ``OMP_NUM_THREADS=1 python -m pytest tests/conversion/test_hf_io.py -q``
"""

from __future__ import annotations

import json
import os

import pytest
import torch

from megatron_emo.conversion.hf_io import HFWeights, ShardWriter, copy_tokenizer


def test_shard_writer_limits_shards_and_indexes_everything(tmp_path):
    w = ShardWriter(str(tmp_path), max_shard_bytes=1000)
    tensors = {f"t{i}": torch.full((60,), float(i)) for i in range(10)}  # 240 bytes each
    for k, v in tensors.items():
        w.add(k, v)
    index = w.close()
    files = sorted(set(index["weight_map"].values()))
    assert files == [f"model-{i:05d}-of-00003.safetensors" for i in range(1, 4)]
    assert w.largest_shard_bytes <= 1000 and index["metadata"]["total_size"] == 2400
    back = HFWeights(str(tmp_path))
    assert back.names() == set(tensors)
    assert all(torch.equal(back.get(k), v) for k, v in tensors.items())


def _tokenizer_dir(path, n_tokens):
    from tokenizers import Tokenizer, models

    vocab = {f"w{i}": i for i in range(n_tokens - 1)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="w0"))
    tok.add_special_tokens(["<|endoftext|>"])
    os.makedirs(path, exist_ok=True)
    tok.save(os.path.join(path, "tokenizer.json"))
    json.dump({"eos_token": "<|endoftext|>", "tokenizer_class": "PreTrainedTokenizerFast"},
              open(os.path.join(path, "tokenizer_config.json"), "w"))
    return str(path)


def test_tokenizer_copied_and_loadable(tmp_path):
    src = _tokenizer_dir(tmp_path / "tok", 100)
    out = tmp_path / "out"
    os.makedirs(out)
    assert copy_tokenizer(src, str(out), vocab_size=128) == ["tokenizer.json",
                                                             "tokenizer_config.json"]
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(out))
    assert len(tok) == 100 and tok.eos_token == "<|endoftext|>"


def test_tokenizer_vocab_mismatch_refused(tmp_path):
    src = _tokenizer_dir(tmp_path / "tok", 200)
    with pytest.raises(ValueError, match="vocab mismatch: tokenizer .* 200 tokens.* 128 rows"):
        copy_tokenizer(src, str(tmp_path), vocab_size=128)


def test_sentencepiece_model_file_copied(tmp_path):
    spm = tmp_path / "sp.model"
    spm.write_bytes(b"\x0a\x00")
    out = tmp_path / "out"
    os.makedirs(out)
    assert copy_tokenizer(str(spm), str(out), vocab_size=128) == ["tokenizer.model"]
    assert (out / "tokenizer.model").read_bytes() == b"\x0a\x00"
    (tmp_path / "x.txt").write_text("x")
    with pytest.raises(ValueError, match="not a sentencepiece"):
        copy_tokenizer(str(tmp_path / "x.txt"), str(out), vocab_size=128)
