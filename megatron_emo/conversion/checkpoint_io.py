"""Megatron side of the conversion: torch_dist checkpoint layout, args, models, slice loads.

A checkpoint directory is what ``megatron/training/checkpointing.py`` writes:
``latest_checkpointed_iteration.txt`` (an iteration number or ``release``) and
``iter_XXXXXXX/`` (or ``release/``), a ``dist_checkpointing`` directory whose common state holds
``args`` (an ``argparse.Namespace``), ``checkpoint_version`` and ``iteration``, and whose sharded
state holds the model (``model.sharded_state_dict()``). In torch_dist every per-layer tensor is
stored once for all layers (key ``decoder.layers.<sub>``, leading axis = global layer) and every
expert tensor once for all layers and **global** experts (``decoder.layers.mlp.experts.experts.
<sub>``, leading axes = (layer, expert)); TP shards are stored at their global offsets (fused QKV
keeps Megatron's per-group layout, SwiGLU fc1 is stored as cat(gate, up) of the full matrices), so
the stored layout does not depend on the TP / PP / EP layout it was saved with. Norm weights are
stored under the fused-norm spelling (``linear_qkv.layer_norm_weight``,
``mlp.linear_fc1.layer_norm_weight``) by the local spec and by the Transformer Engine spec of
dense layers; the TE spec of an MoE layer keeps its pre-MLP norm as ``pre_mlp_layernorm.weight``
(``megatron/core/models/gpt/gpt_layer_specs.py:157-166``), read here as an alias.

Nothing here needs a process group, model-parallel state or CUDA: checkpoints are read straight
from the DCP files (and written by ``torch_dist_writer``). Only this module, ``torch_dist_writer``,
``to_hf`` and ``from_hf`` import megatron.
"""

from __future__ import annotations

import argparse
import io
import os
import re

import torch

from megatron_emo.conversion.hf_config import EmoShape
from megatron_emo.conversion.key_map import mcore_num_experts

__all__ = [
    "STORAGE_ALIASES",
    "TRACKER_FILE",
    "load_slice",
    "load_slices",
    "megatron_args",
    "resolve_checkpoint_dir",
    "shape_from_args",
    "storage_key",
    "stored_key",
    "stored_tensor_keys",
]

TRACKER_FILE = "latest_checkpointed_iteration.txt"

_EXPERT_RE = re.compile(r"^decoder\.layers\.(\d+)\.mlp\.experts\.local_experts\.(\d+)\.(.+)$")
_LAYER_RE = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")
_NORM_STORAGE = {
    "input_layernorm.weight": "self_attention.linear_qkv.layer_norm_weight",
    "pre_mlp_layernorm.weight": "mlp.linear_fc1.layer_norm_weight",
}


# torch_dist key -> the spelling another spec stores the same tensor under.
STORAGE_ALIASES = {
    "decoder.layers.mlp.linear_fc1.layer_norm_weight": "decoder.layers.pre_mlp_layernorm.weight",
}


def stored_key(key: str, stored: dict) -> str:
    """``key`` or, when only that is in the checkpoint, its ``STORAGE_ALIASES`` spelling."""
    alias = STORAGE_ALIASES.get(key)
    return alias if key not in stored and alias in stored else key


def storage_key(mcore_name: str) -> tuple[str, tuple[int, ...]]:
    """torch_dist key and leading (layer[, expert]) index of a GPTModel parameter name."""
    m = _EXPERT_RE.match(mcore_name)
    if m:
        key = f"decoder.layers.mlp.experts.experts.{m.group(3)}"
        return key, (int(m.group(1)), int(m.group(2)))
    m = _LAYER_RE.match(mcore_name)
    if m:
        sub = _NORM_STORAGE.get(m.group(2), m.group(2))
        return f"decoder.layers.{sub}", (int(m.group(1)),)
    return mcore_name, ()


def resolve_checkpoint_dir(path: str) -> str:
    """The dist_checkpointing directory of a Megatron checkpoint (tracker file or direct)."""
    tracker = os.path.join(path, TRACKER_FILE)
    if os.path.isfile(tracker):
        text = open(tracker).read().strip()
        sub = "release" if text == "release" else f"iter_{int(text):07d}"
        path = os.path.join(path, sub)
    if not os.path.isfile(os.path.join(path, "metadata.json")):
        raise FileNotFoundError(
            f"{path} is not a torch_dist checkpoint (no metadata.json); pass the directory that "
            f"holds {TRACKER_FILE} or an iter_XXXXXXX directory"
        )
    return path


def stored_tensor_keys(ckpt_dir: str) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Tensor keys of a torch_dist checkpoint with their global shapes and dtypes."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    md = _metadata(ckpt_dir)
    return {
        k: (tuple(v.size), v.properties.dtype)
        for k, v in md.state_dict_metadata.items()
        if isinstance(v, TensorStorageMetadata)
    }


def load_slice(ckpt_dir: str, name: str, stored: dict) -> torch.Tensor:
    """Loads the slice of one GPTModel parameter name (global expert ids) from the storage.

    Reads the torch_dist (PyTorch DCP) storage directly: only the saved chunks that intersect the
    requested (layer[, expert]) slice are read, whatever TP / PP / EP layout wrote them, and each
    chunk is deserialised straight from its byte range of the ``.distcp`` file.
    """
    from torch.distributed.checkpoint.metadata import MetadataIndex

    md = _metadata(ckpt_dir)
    key, index = storage_key(name)
    key = stored_key(key, stored)
    if key not in stored:
        raise KeyError(f"checkpoint {ckpt_dir} has no tensor {key} (needed for {name})")
    gshape, dtype = stored[key]
    for axis, i in enumerate(index):
        if i >= gshape[axis]:
            raise KeyError(
                f"checkpoint tensor {key} has {gshape[axis]} entries on axis {axis}; "
                f"{name} needs index {i} (missing layer or expert)"
            )
    n = len(index)
    chunks = [c for c in md.state_dict_metadata[key].chunks
              if all(c.offsets[a] <= index[a] < c.offsets[a] + c.sizes[a] for a in range(n))]
    if len(chunks) == 1 and tuple(chunks[0].sizes[n:]) == tuple(gshape[n:]):
        # One chunk holds the whole slice (how Megatron saves layers and experts): no copy.
        c = chunks[0]
        t = _read_chunk(ckpt_dir, md.storage_data[MetadataIndex(key, c.offsets)])
        sub = t[tuple(index[a] - c.offsets[a] for a in range(n))]
        return sub if sub.untyped_storage().nbytes() == sub.nbytes else sub.clone()
    buf = torch.empty(gshape[n:], dtype=dtype)
    covered = 0
    for chunk in chunks:
        off, size = tuple(chunk.offsets), tuple(chunk.sizes)
        info = md.storage_data[MetadataIndex(key, chunk.offsets)]
        t = _read_chunk(ckpt_dir, info)
        sub = t[tuple(index[a] - off[a] for a in range(n))]
        region = tuple(slice(o, o + s) for o, s in zip(off[n:], size[n:], strict=True))
        buf[region] = sub
        covered += sub.numel()
        del t, sub
    if covered != buf.numel():
        raise ValueError(f"checkpoint chunks of {key} cover {covered} of {buf.numel()} "
                         f"elements of {name}")
    return buf


def load_slices(ckpt_dir: str, names: list[str], stored: dict) -> dict[str, torch.Tensor]:
    """``load_slice`` for several names."""
    return {name: load_slice(ckpt_dir, name, stored) for name in names}


_MD_CACHE: dict[str, object] = {}


def _metadata(ckpt_dir: str):
    from torch.distributed.checkpoint import FileSystemReader

    path = os.path.abspath(ckpt_dir)
    key = f"{path}:{os.stat(os.path.join(path, '.metadata')).st_mtime_ns}"
    if key not in _MD_CACHE:
        _MD_CACHE.clear()
        _MD_CACHE[key] = FileSystemReader(ckpt_dir).read_metadata()
    return _MD_CACHE[key]


class _FileWindow(io.RawIOBase):
    """Read-only view of ``length`` bytes at ``offset`` of an open file (seekable)."""

    def __init__(self, f, offset: int, length: int):
        self._f, self._start, self._len, self._pos = f, offset, length, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, pos: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._len}[whence]
        self._pos = max(0, base + pos)
        return self._pos

    def readinto(self, b) -> int:
        n = max(0, min(len(b), self._len - self._pos))
        if n == 0:
            return 0
        self._f.seek(self._start + self._pos)
        got = self._f.readinto(memoryview(b)[:n])
        self._pos += got
        return got


def _read_chunk(ckpt_dir: str, info) -> torch.Tensor:
    """One saved chunk (a ``torch.save``d tensor inside a ``.distcp`` file).

    ``torch.load`` reads the record from a window on the file, so the chunk's bytes are not
    held twice (as ``f.read`` + ``BytesIO`` would).
    """
    if getattr(info, "transform_descriptors", None):
        raise ValueError(f"compressed torch_dist chunks are not supported: {info}")
    with open(os.path.join(ckpt_dir, info.relative_path), "rb") as f:
        window = io.BufferedReader(_FileWindow(f, info.offset, info.length))
        return torch.load(window, map_location="cpu", weights_only=True)


def shape_from_args(args) -> tuple[EmoShape, str, int]:
    """HF shape, Megatron shared-expert layout and padding-expert count from ``args``."""
    g = lambda name, default=None: getattr(args, name, default)  # noqa: E731
    heads = g("num_attention_heads")
    groups = g("num_query_groups") if g("group_query_attention", False) else heads
    groups = groups or heads
    num_experts = g("num_experts")
    if not num_experts:
        raise ValueError("checkpoint args have no num_experts: not an MoE model")
    shared_mlp = g("moe_shared_expert_intermediate_size")
    emo_shared = g("emo_num_shared_experts", 0) or 0
    padding = g("emo_num_padding_experts", 0) or 0
    if not 0 <= padding < num_experts - emo_shared:
        raise ValueError(f"checkpoint args emo_num_padding_experts={padding} must be in [0, "
                         f"num_experts - emo_num_shared_experts = {num_experts - emo_shared})")
    ffn = g("moe_ffn_hidden_size") or g("ffn_hidden_size")
    if shared_mlp:
        if emo_shared:
            raise ValueError("checkpoint args set both moe_shared_expert_intermediate_size and "
                             "emo_num_shared_experts")
        if shared_mlp != ffn:
            raise ValueError(
                f"moe_shared_expert_intermediate_size ({shared_mlp}) must equal the expert "
                f"hidden size ({ffn}) to become one HF expert"
            )
        layout, hf_experts, shared = "mlp", num_experts - padding + 1, 1
        topk = g("moe_router_topk") + 1
    else:
        layout, hf_experts, shared = "router", num_experts - padding, emo_shared
        topk = g("moe_router_topk")
    for flag, want in (("swiglu", True), ("add_bias_linear", False),
                       ("untie_embeddings_and_output_weights", True)):
        if hasattr(args, flag) and bool(getattr(args, flag)) != want:
            raise ValueError(f"checkpoint args {flag}={getattr(args, flag)!r}; EMO HF needs {want}")
    if g("normalization", "RMSNorm") != "RMSNorm":
        raise ValueError(f"checkpoint args normalization={g('normalization')!r}; EMO needs RMSNorm")
    shape = EmoShape(
        num_layers=g("num_layers"),
        hidden_size=g("hidden_size"),
        num_attention_heads=heads,
        num_key_value_heads=groups,
        head_dim=g("kv_channels") or g("hidden_size") // heads,
        intermediate_size=ffn,
        num_experts=hf_experts,
        num_shared_experts=shared,
        num_experts_per_tok=topk,
        vocab_size=g("padded_vocab_size") or g("vocab_size"),
        max_position_embeddings=g("max_position_embeddings") or g("seq_length") or 4096,
        rope_theta=float(g("rotary_base", 10000)),
        rms_norm_eps=g("norm_epsilon", 1e-5),
        **_special_token_ids(args),
    )
    return shape, layout, padding


def _special_token_ids(args) -> dict[str, int]:
    """``eos_token_id``/``pad_token_id`` for the HF config, from a checkpoint's ``args``.

    Explicit ids in ``args`` win; otherwise the training tokenizer (``--tokenizer-type`` /
    ``--tokenizer-model`` as stored, built the way megatron.training builds it) gives its EOD
    and pad ids (pad falls back to EOD when it has none); otherwise EMO's published ids.
    """
    g = lambda name, default=None: getattr(args, name, default)  # noqa: E731
    eos, pad = g("emo_eod_token_id", g("eos_token_id")), g("pad_token_id")
    if (eos is None or pad is None) and g("tokenizer_type"):
        try:
            from megatron.core.tokenizers.utils.build_tokenizer import build_tokenizer

            tokenizer = build_tokenizer(args)
            tok_eod = int(tokenizer.eod)
            tok_pad = getattr(tokenizer, "pad", None)
            tok_pad = int(tok_pad) if tok_pad is not None and int(tok_pad) >= 0 else tok_eod
            if tok_eod >= 0:
                eos = tok_eod if eos is None else eos
                pad = tok_pad if pad is None else pad
        except Exception as err:  # noqa: BLE001 (a moved tokenizer file must not stop an export)
            print(f"note: could not rebuild the training tokenizer ({g('tokenizer_type')}, "
                  f"{g('tokenizer_model')}): {err}; using EMO's default special token ids")
    return {"eos_token_id": 100257 if eos is None else int(eos),
            "pad_token_id": 100277 if pad is None else int(pad)}


def megatron_args(shape: EmoShape, shared_layout: str, tp: int = 1, ep: int = 1,
                  num_padding: int = 0, **extra) -> argparse.Namespace:
    """The ``args`` namespace stored in a checkpoint's common state (megatron.training names)."""
    n_mcore = mcore_num_experts(shape, shared_layout, num_padding)
    a = dict(
        num_layers=shape.num_layers,
        hidden_size=shape.hidden_size,
        ffn_hidden_size=shape.intermediate_size,
        num_attention_heads=shape.num_attention_heads,
        group_query_attention=shape.num_key_value_heads != shape.num_attention_heads,
        num_query_groups=shape.num_key_value_heads,
        kv_channels=shape.head_dim,
        num_experts=n_mcore,
        moe_ffn_hidden_size=shape.intermediate_size,
        moe_router_topk=shape.num_experts_per_tok - (1 if shared_layout == "mlp" else 0),
        moe_shared_expert_intermediate_size=(
            shape.intermediate_size if shared_layout == "mlp" else None),
        emo_num_shared_experts=shape.num_shared_experts if shared_layout == "router" else 0,
        emo_num_padding_experts=num_padding,
        padded_vocab_size=shape.vocab_size,
        max_position_embeddings=shape.max_position_embeddings,
        seq_length=shape.max_position_embeddings,
        position_embedding_type="rope",
        rotary_base=shape.rope_theta,
        normalization="RMSNorm",
        norm_epsilon=shape.rms_norm_eps,
        swiglu=True,
        add_bias_linear=False,
        untie_embeddings_and_output_weights=True,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=1,
        expert_model_parallel_size=ep,
        ckpt_format="torch_dist",
        consumed_train_samples=0,
        consumed_valid_samples=0,
        eos_token_id=shape.eos_token_id,
        pad_token_id=shape.pad_token_id,
    )
    a.update(extra)
    return argparse.Namespace(**a)
