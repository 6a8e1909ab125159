"""Streaming safetensors I/O for HF model directories. No megatron import.

Reading (``HFWeights``) parses each file's safetensors header once and reads a tensor's bytes
with one positioned read, so memory holds only the tensors asked for (no memory map whose touched
pages would count as resident for the whole file). Writing goes through one byte-level writer
(``_SafetensorsFile``: header, then tensor bytes in order, written straight from the tensor's
memory): ``ShardWriter`` buffers one shard when shapes are not known in advance,
``StreamingShardWriter`` plans every shard up front and keeps no tensor after ``add`` returns. Both
lay out identical bytes for the same tensors in the same order and shard limit.
``dtype_from_name`` is the one table of the dtypes a conversion or a loaded model can take.
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import struct
from collections.abc import Sequence

import torch

__all__ = ["DTYPES", "HFWeights", "ShardWriter", "StreamingShardWriter", "copy_tokenizer",
           "dtype_from_name", "shard_plan"]

INDEX_FILE = "model.safetensors.index.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json")

_ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
_ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
"""The dtypes a conversion (``--dtype``) or a loaded HF model can take, by name."""


def dtype_from_name(name: str) -> torch.dtype:
    """The torch dtype called ``name`` in ``DTYPES``.

    Args:
        name: ``float32``, ``bfloat16`` or ``float16``.

    Returns:
        The torch dtype.

    Raises:
        ValueError: for any other name, naming it and the allowed ones.
    """
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {name!r}")
    return DTYPES[name]

Entry = tuple[str, tuple[int, ...], torch.dtype]  # (name, shape, dtype)


def _nbytes(shape: Sequence[int], dtype: torch.dtype) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n * torch.empty((), dtype=dtype).element_size()


def _shard_name(i: int, n: int) -> str:
    return f"model-{i + 1:05d}-of-{n:05d}.safetensors"


def shard_plan(entries: Sequence[Entry], max_shard_bytes: int) -> list[list[Entry]]:
    """Splits ``entries`` (in order) into shards of at most ``max_shard_bytes``.

    A new shard starts when the current one is not empty and the next tensor would overflow it,
    so a tensor larger than the limit gets a shard of its own.
    """
    shards: list[list[Entry]] = []
    size = 0
    for entry in entries:
        nbytes = _nbytes(entry[1], entry[2])
        if not shards or (shards[-1] and size + nbytes > max_shard_bytes):
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += nbytes
    return shards


class _SafetensorsFile:
    """Writes one safetensors file: the header for ``entries``, then each tensor as it comes."""

    def __init__(self, path: str, entries: Sequence[Entry]):
        header: dict = {"__metadata__": {"format": "pt"}}
        offset = 0
        for name, shape, dtype in entries:
            if dtype not in _ST_NAMES:
                raise ValueError(f"{name}: dtype {dtype} has no safetensors name")
            nbytes = _nbytes(shape, dtype)
            header[name] = {"dtype": _ST_NAMES[dtype], "shape": list(shape),
                            "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)  # 8-byte aligned data, as safetensors itself writes
        self.path = path
        self.entries = list(entries)
        self.nbytes = offset
        self._next = 0
        self._f = open(path, "wb")
        self._f.write(struct.pack("<Q", len(blob)) + blob)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if self._next >= len(self.entries):
            raise ValueError(f"{self.path}: unexpected tensor {name} (all planned ones written)")
        want, shape, dtype = self.entries[self._next]
        if name != want or tuple(tensor.shape) != tuple(shape) or tensor.dtype != dtype:
            raise ValueError(f"{self.path}: expected {want} {tuple(shape)} {dtype}, got {name} "
                             f"{tuple(tensor.shape)} {tensor.dtype}")
        t = tensor.detach().to("cpu").contiguous()
        if t.numel():
            self._f.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
        self._next += 1

    def close(self) -> None:
        if self._next != len(self.entries):
            missing = [e[0] for e in self.entries[self._next:]]
            raise ValueError(f"{self.path}: {len(missing)} planned tensors not written, first "
                             f"{missing[0]}")
        self._f.close()


def _write_index(output_dir: str, weight_map: dict[str, str], total_bytes: int) -> dict:
    index = {"metadata": {"total_size": total_bytes}, "weight_map": weight_map}
    with open(os.path.join(output_dir, INDEX_FILE), "w") as f:
        json.dump(index, f, indent=2, sort_keys=True)
    return index


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
        """Buffers a copy of ``tensor`` as ``name``, first flushing a shard it would overflow."""
        nbytes = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + nbytes > self.max_shard_bytes:
            self.flush()
        self.pending[name] = tensor.detach().contiguous().clone()
        self.pending_bytes += nbytes
        self.total_bytes += nbytes

    def flush(self) -> None:
        """Writes the buffered tensors to a temporary shard file (nothing when none are pending)."""
        if not self.pending:
            return
        tmp = os.path.join(self.output_dir, f"tmp-shard-{len(self.files):05d}.safetensors")
        out = _SafetensorsFile(tmp, [(k, tuple(v.shape), v.dtype) for k, v in self.pending.items()])
        for name, t in self.pending.items():
            out.write(name, t)
        out.close()
        self.files.append((tmp, list(self.pending)))
        self.largest_shard_bytes = max(self.largest_shard_bytes, self.pending_bytes)
        self.pending, self.pending_bytes = {}, 0

    def close(self) -> dict:
        """Flushes, gives the shards their final names, writes the index and returns it."""
        self.flush()
        n = len(self.files)
        weight_map = {}
        for i, (tmp, names) in enumerate(self.files):
            final = _shard_name(i, n)
            os.replace(tmp, os.path.join(self.output_dir, final))
            for name in names:
                weight_map[name] = final
        return _write_index(self.output_dir, weight_map, self.total_bytes)


class StreamingShardWriter:
    """Shard writer for tensors whose names, shapes and dtypes are known in advance.

    Every shard's header is planned up front (same split as ``ShardWriter``), so each ``add``
    writes the tensor's bytes to disk at once and nothing is buffered. Tensors must come in the
    planned order.

    Args:
        output_dir: existing directory that receives the shards and the index.
        entries: ``(name, shape, dtype)`` of every tensor, in writing order.
        max_shard_bytes: largest shard (a larger single tensor gets a shard of its own).
    """

    def __init__(self, output_dir: str, entries: Sequence[Entry], max_shard_bytes: int):
        self.output_dir = output_dir
        self.shards = shard_plan(entries, max_shard_bytes)
        n = len(self.shards)
        self.weight_map = {e[0]: _shard_name(i, n) for i, shard in enumerate(self.shards)
                           for e in shard}
        self.total_bytes = sum(_nbytes(e[1], e[2]) for e in entries)
        self.largest_shard_bytes = max((sum(_nbytes(e[1], e[2]) for e in shard)
                                        for shard in self.shards), default=0)
        self._shard = -1
        self._file: _SafetensorsFile | None = None
        self._left = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Writes ``tensor``, the next planned one, to disk, opening the next shard as needed."""
        if self._left == 0:
            if self._file is not None:
                self._file.close()
            self._shard += 1
            if self._shard >= len(self.shards):
                raise ValueError(f"unexpected tensor {name}: every planned tensor was written")
            entries = self.shards[self._shard]
            self._file = _SafetensorsFile(
                os.path.join(self.output_dir, _shard_name(self._shard, len(self.shards))), entries)
            self._left = len(entries)
        self._file.write(name, tensor)
        self._left -= 1

    def close(self) -> dict:
        """Closes the last shard, writes the index and returns it; raises if tensors are missing."""
        if self._left or self._shard != len(self.shards) - 1:
            raise ValueError(f"shard writer closed early: shard {self._shard + 1} of "
                             f"{len(self.shards)}, {self._left} tensors left in it")
        if self._file is not None:
            self._file.close()
        return _write_index(self.output_dir, self.weight_map, self.total_bytes)


def read_safetensors_header(path: str) -> tuple[dict[str, dict], int]:
    """The tensor table of a safetensors file and the byte offset where its data starts."""
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise ValueError(f"{path} is not a safetensors file (shorter than 8 bytes)")
        (n,) = struct.unpack("<Q", head)
        if n > 100 * 2**20:
            raise ValueError(f"{path} is not a safetensors file (header length {n})")
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return header, 8 + n


class HFWeights:
    """Lazy access to the tensors of an HF directory (sharded with index, or one file)."""

    def __init__(self, hf_dir: str):
        index_path = os.path.join(hf_dir, INDEX_FILE)
        if os.path.isfile(index_path):
            weight_map = json.load(open(index_path))["weight_map"]
        elif os.path.isfile(os.path.join(hf_dir, "model.safetensors")):
            header, _ = read_safetensors_header(os.path.join(hf_dir, "model.safetensors"))
            weight_map = {k: "model.safetensors" for k in header}
        else:
            raise FileNotFoundError(f"{hf_dir} has neither {INDEX_FILE} nor model.safetensors")
        self.hf_dir = hf_dir
        self.weight_map = weight_map
        self._headers: dict[str, tuple[dict[str, dict], int]] = {}

    def names(self) -> set[str]:
        """Names of all tensors in the directory."""
        return set(self.weight_map)

    def _info(self, name: str) -> tuple[str, dict, int]:
        if name not in self.weight_map:
            raise KeyError(f"{self.hf_dir} has no tensor {name}")
        file = self.weight_map[name]
        if file not in self._headers:
            self._headers[file] = read_safetensors_header(os.path.join(self.hf_dir, file))
        header, start = self._headers[file]
        if name not in header:
            raise KeyError(f"{os.path.join(self.hf_dir, file)} has no tensor {name} (the index "
                           f"lists it there)")
        return file, header[name], start

    def shape(self, name: str) -> tuple[int, ...]:
        """Shape of ``name`` from its file's header (no data read)."""
        return tuple(self._info(name)[1]["shape"])

    def dtype(self, name: str) -> torch.dtype:
        """Dtype of ``name`` from its file's header (no data read)."""
        code = self._info(name)[1]["dtype"]
        if code not in _ST_DTYPES:
            raise ValueError(f"{name}: unsupported safetensors dtype {code}")
        return _ST_DTYPES[code]

    def get(self, name: str) -> torch.Tensor:
        """Reads ``name`` with one positioned read (only its bytes are held in memory)."""
        file, info, start = self._info(name)
        dtype, shape = self.dtype(name), tuple(info["shape"])
        begin, end = info["data_offsets"]
        if end - begin != _nbytes(shape, dtype):
            raise ValueError(f"{name} in {file}: {end - begin} bytes for shape {shape} {dtype}")
        t = torch.empty(shape, dtype=dtype)
        if end == begin:
            return t
        # Read straight into the tensor's memory. Not through ``.numpy()``: that makes the
        # storage non-resizable, and the checkpoint writer frees written chunks by resizing.
        view = memoryview((ctypes.c_char * (end - begin)).from_address(t.data_ptr())).cast("B")
        with open(os.path.join(self.hf_dir, file), "rb") as f:
            f.seek(start + begin)
            if f.readinto(view) != end - begin:
                raise ValueError(f"{os.path.join(self.hf_dir, file)} is truncated at {name}")
        return t


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
