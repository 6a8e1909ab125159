"""Streaming sharded safetensors writer and reader for HF model directories. No megatron import."""

from __future__ import annotations

import json
import os
import shutil

import torch
from safetensors import safe_open
from safetensors.torch import save_file

__all__ = ["HFWeights", "ShardWriter", "copy_tokenizer"]

INDEX_FILE = "model.safetensors.index.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json")


class ShardWriter:
    """Writes tensors to ``model-XXXXX-of-YYYYY.safetensors`` files of at most ``max_shard_bytes``.

    Holds at most one shard in memory; files are renamed to their final names by ``close()``,
    which also writes ``model.safetensors.index.json``.
    """

    def __init__(self, output_dir: str, max_shard_bytes: int):
        self.output_dir = output_dir
        self.max_shard_bytes = max_shard_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.files: list[tuple[str, list[str]]] = []
        self.total_bytes = 0
        self.largest_shard_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + nbytes > self.max_shard_bytes:
            self.flush()
        self.pending[name] = tensor.detach().contiguous().clone()
        self.pending_bytes += nbytes
        self.total_bytes += nbytes

    def flush(self) -> None:
        if not self.pending:
            return
        tmp = os.path.join(self.output_dir, f"tmp-shard-{len(self.files):05d}.safetensors")
        save_file(self.pending, tmp, metadata={"format": "pt"})
        self.files.append((tmp, list(self.pending)))
        self.largest_shard_bytes = max(self.largest_shard_bytes, self.pending_bytes)
        self.pending, self.pending_bytes = {}, 0

    def close(self) -> dict:
        self.flush()
        n = len(self.files)
        weight_map = {}
        for i, (tmp, names) in enumerate(self.files):
            final = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            os.replace(tmp, os.path.join(self.output_dir, final))
            for name in names:
                weight_map[name] = final
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
        with open(os.path.join(self.output_dir, INDEX_FILE), "w") as f:
            json.dump(index, f, indent=2, sort_keys=True)
        return index


class HFWeights:
    """Lazy access to the tensors of an HF directory (sharded with index, or one file)."""

    def __init__(self, hf_dir: str):
        index_path = os.path.join(hf_dir, INDEX_FILE)
        if os.path.isfile(index_path):
            weight_map = json.load(open(index_path))["weight_map"]
        elif os.path.isfile(os.path.join(hf_dir, "model.safetensors")):
            with safe_open(os.path.join(hf_dir, "model.safetensors"), "pt") as f:
                weight_map = {k: "model.safetensors" for k in f.keys()}
        else:
            raise FileNotFoundError(f"{hf_dir} has neither {INDEX_FILE} nor model.safetensors")
        self.hf_dir = hf_dir
        self.weight_map = weight_map
        self._handles = {}

    def names(self) -> set[str]:
        return set(self.weight_map)

    def get(self, name: str) -> torch.Tensor:
        file = self.weight_map[name]
        if file not in self._handles:
            self._handles[file] = safe_open(os.path.join(self.hf_dir, file), "pt")
        return self._handles[file].get_tensor(name)


def tokenizer_vocab_size(tokenizer_dir: str) -> int | None:
    """Token count of an HF ``tokenizer.json`` (model vocab plus added tokens), else None."""
    path = os.path.join(tokenizer_dir, "tokenizer.json")
    if not os.path.isfile(path):
        return None
    tok = json.load(open(path))
    ids = set(tok.get("model", {}).get("vocab", {}).values()) if isinstance(
        tok.get("model", {}).get("vocab"), dict) else set(range(len(tok["model"].get("vocab", []))))
    ids |= {t["id"] for t in tok.get("added_tokens", [])}
    return max(ids) + 1 if ids else 0


def copy_tokenizer(tokenizer: str, output_dir: str, vocab_size: int) -> list[str]:
    """Copies HF tokenizer files (a directory) or a sentencepiece ``.model`` file.

    Raises:
        ValueError: the tokenizer has more tokens than the model's (padded) vocabulary.
    """
    copied = []
    if os.path.isfile(tokenizer):
        if not tokenizer.endswith(".model"):
            raise ValueError(f"tokenizer file {tokenizer} is not a sentencepiece .model file")
        shutil.copyfile(tokenizer, os.path.join(output_dir, "tokenizer.model"))
        return ["tokenizer.model"]
    n = tokenizer_vocab_size(tokenizer)
    if n is not None and n > vocab_size:
        raise ValueError(
            f"vocab mismatch: tokenizer in {tokenizer} has {n} tokens, the model's padded "
            f"vocabulary has {vocab_size} rows"
        )
    for name in TOKENIZER_FILES:
        src = os.path.join(tokenizer, name)
        if os.path.isfile(src):
            shutil.copyfile(src, os.path.join(output_dir, name))
            copied.append(name)
    if not copied:
        raise FileNotFoundError(f"no tokenizer files ({', '.join(TOKENIZER_FILES)}) in {tokenizer}")
    return copied
