"""HF directory I/O without megatron.

Shard size limits and index, tokenizer export with its vocab check (HF ``tokenizer.json``; a
sentencepiece ``.model`` file is copied as ``tokenizer.model`` without a vocab check, since
sentencepiece is not a dependency), and the ``--dtype`` names.

Run: ``OMP_NUM_THREADS=1 python -m pytest tests/conversion/test_hf_io.py -q``
"""

from __future__ import annotations

import json
import os

import pytest
import torch

from megatron_emo.conversion.hf_io import (
    HFWeights,
    ShardWriter,
    StreamingShardWriter,
    copy_tokenizer,
    dtype_from_name,
)


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


def test_streaming_writer_matches_buffered_writer_and_safetensors(tmp_path):
    """Planned shards: same bytes as ShardWriter, readable by safetensors; reader reads both."""
    from safetensors.torch import load_file, save_file

    gen = torch.Generator().manual_seed(0)
    tensors = {"a": torch.randn(3, 40, generator=gen),
               "b": torch.randn(70, generator=gen).bfloat16(),
               "c": torch.arange(12).reshape(3, 4), "d": torch.zeros(0, 5),
               "e": torch.randn(100, generator=gen).half()}
    entries = [(k, tuple(v.shape), v.dtype) for k, v in tensors.items()]
    for name in ("buffered", "streamed"):
        os.makedirs(tmp_path / name)
    buffered = ShardWriter(str(tmp_path / "buffered"), max_shard_bytes=500)
    streamed = StreamingShardWriter(str(tmp_path / "streamed"), entries, max_shard_bytes=500)
    for k, v in tensors.items():
        buffered.add(k, v)
        streamed.add(k, v)
    assert buffered.close() == streamed.close()
    assert buffered.largest_shard_bytes == streamed.largest_shard_bytes == 480
    files = sorted(os.listdir(tmp_path / "buffered"))
    assert len(files) == 3 and files == sorted(os.listdir(tmp_path / "streamed"))
    loaded = {}
    for f in files:
        a, b = (open(tmp_path / d / f, "rb").read() for d in ("buffered", "streamed"))
        assert a == b, f
        if f.endswith(".safetensors"):
            loaded.update(load_file(str(tmp_path / "streamed" / f)))
    assert loaded.keys() == tensors.keys()
    assert all(torch.equal(loaded[k], v) and loaded[k].dtype == v.dtype for k, v in tensors.items())
    back = HFWeights(str(tmp_path / "streamed"))
    assert back.shape("a") == (3, 40) and back.dtype("b") == torch.bfloat16
    assert all(torch.equal(back.get(k), v) for k, v in tensors.items())
    # Files written by safetensors itself read back the same.
    os.makedirs(tmp_path / "official")
    save_file(tensors, str(tmp_path / "official" / "model.safetensors"))
    official = HFWeights(str(tmp_path / "official"))
    assert all(torch.equal(official.get(k), v) for k, v in tensors.items())


def test_streaming_writer_refuses_tensors_off_plan(tmp_path):
    w = StreamingShardWriter(str(tmp_path), [("x", (2, 3), torch.float32),
                                             ("y", (4,), torch.float32)], max_shard_bytes=100)
    with pytest.raises(ValueError, match=r"expected x \(2, 3\) torch.float32, got y"):
        w.add("y", torch.zeros(4))
    w2 = StreamingShardWriter(str(tmp_path), [("x", (2, 3), torch.float32)], max_shard_bytes=100)
    with pytest.raises(ValueError, match=r"expected x \(2, 3\) torch.float32, got x \(3, 2\)"):
        w2.add("x", torch.zeros(3, 2))
    w3 = StreamingShardWriter(str(tmp_path), [("x", (2,), torch.float32),
                                              ("y", (2,), torch.float32)], max_shard_bytes=4)
    w3.add("x", torch.zeros(2))
    with pytest.raises(ValueError, match="closed early: shard 1 of 2"):
        w3.close()


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


def test_dtype_names_and_the_error_that_lists_them():
    assert dtype_from_name("bfloat16") is torch.bfloat16
    assert dtype_from_name("float32") is torch.float32
    with pytest.raises(ValueError, match=r"dtype must be one of \['bfloat16', 'float16', "
                                         r"'float32'\], got 'fp8'"):
        dtype_from_name("fp8")
