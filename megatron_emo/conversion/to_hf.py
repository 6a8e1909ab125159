"""Export: Megatron torch_dist checkpoint (any TP / PP / EP layout) -> EMO HF directory.

Streams tensor by tensor: each step loads only the slices of one layer (experts in chunks) from
the checkpoint, converts them with the ``key_map`` table and hands them to a shard writer that
keeps at most one output shard in memory.
"""

from __future__ import annotations

import dataclasses
import os

import torch

from megatron_emo.conversion import checkpoint_io as cio
from megatron_emo.conversion.hf_config import (copy_modeling_files, write_config,
                                               write_generation_config)
from megatron_emo.conversion.hf_io import ShardWriter, copy_tokenizer
from megatron_emo.conversion.key_map import (SHARED_ROUTER_ROWS_KEY, expand_mappings,
                                             mcore_num_experts, to_hf_tensors)

__all__ = ["export_to_hf"]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _check_stored(stored: dict, mappings, shape, layout: str) -> None:
    """Refuses checkpoints whose stored tensors do not match the args, naming them."""
    needed: dict[str, tuple[int, ...]] = {}
    for m in mappings:
        key, index = cio.storage_key(m.mcore)
        needed[key] = index
    model_keys = {k for k in stored if not k.startswith(("optimizer.", "rng_state", "rerun"))}
    unknown = sorted(model_keys - set(needed))
    if unknown:
        raise ValueError(f"unknown keys in checkpoint (not in the EMO mapping): {unknown}")
    missing = sorted(set(needed) - model_keys)
    if missing:
        raise ValueError(f"missing keys in checkpoint: {missing}")
    n_mcore = mcore_num_experts(shape, layout)
    for key, index in needed.items():
        gshape = stored[key][0]
        if index and gshape[0] != shape.num_layers:
            raise ValueError(f"shape mismatch for {key}: {gshape[0]} layers stored, args say "
                             f"{shape.num_layers}")
        if len(index) == 2 and gshape[1] != n_mcore:
            kind = "missing experts" if gshape[1] < n_mcore else "unexpected experts"
            raise ValueError(f"{kind}: {key} stores {gshape[1]} experts per layer, args say "
                             f"{n_mcore}")
    for key in ("embedding.word_embeddings.weight", "output_layer.weight"):
        rows = stored[key][0][0]
        if rows != shape.vocab_size:
            raise ValueError(f"vocab mismatch: {key} has {rows} rows, args padded vocab is "
                             f"{shape.vocab_size}")


def export_to_hf(checkpoint: str, output_dir: str, *, max_shard_bytes: int = 2 * 1024**3,
                 dtype: str | None = None, tokenizer: str | None = None, dry_run: bool = False,
                 experts_per_load: int = 16, eos_token_id: int | None = None,
                 pad_token_id: int | None = None, print_fn=print) -> dict:
    """Converts a Megatron checkpoint to an EMO HF directory.

    Args:
        checkpoint: the directory with ``latest_checkpointed_iteration.txt`` or an ``iter_*`` dir.
        output_dir: HF directory to write (created).
        max_shard_bytes: largest safetensors shard.
        dtype: ``float32`` / ``bfloat16`` / ``float16``; default: the stored dtype.
        tokenizer: HF tokenizer directory or sentencepiece ``.model`` file to copy.
        dry_run: print the mapping and the checks, write nothing.
        experts_per_load: experts loaded per read (bounds the read buffer).
        eos_token_id: overrides the id taken from ``args`` (``eos_token_id``, else EMO's 100257).
        pad_token_id: overrides the id taken from ``args`` (``pad_token_id``, else EMO's 100277).

    Returns:
        The ``model.safetensors.index.json`` content (empty dict on a dry run) plus
        ``largest_shard_bytes``.
    """
    from megatron.core import dist_checkpointing

    cio.ensure_process_group()
    ckpt_dir = cio.resolve_checkpoint_dir(checkpoint)
    common = dist_checkpointing.load_common_state_dict(ckpt_dir)
    if "args" not in common:
        raise ValueError(f"{ckpt_dir} has no 'args' in its common state")
    shape, layout = cio.shape_from_args(common["args"])
    if eos_token_id is not None:
        shape = dataclasses.replace(shape, eos_token_id=eos_token_id)
    if pad_token_id is not None:
        shape = dataclasses.replace(shape, pad_token_id=pad_token_id)
    shared_rows = common.get(SHARED_ROUTER_ROWS_KEY) or {}
    mappings = expand_mappings(shape, layout)
    stored = cio.stored_tensor_keys(ckpt_dir)
    _check_stored(stored, mappings, shape, layout)
    if dry_run:
        print_fn(f"# {ckpt_dir}: {shape} shared_layout={layout}")
        for m in mappings:
            key, index = cio.storage_key(m.mcore)
            print_fn(f"{m.mcore} [{key}{list(index)}] --{m.op}--> {', '.join(m.hf)}")
        return {}
    os.makedirs(output_dir, exist_ok=True)
    out_dtype = _DTYPES[dtype] if dtype else None
    writer = ShardWriter(output_dir, max_shard_bytes)
    # Group: global tensors, then per layer the dense tensors and chunks of experts.
    groups: list[list] = []
    current_key = None
    for m in mappings:
        key = (m.layer, None if m.expert is None else m.expert // experts_per_load)
        if key != current_key:
            groups.append([])
            current_key = key
        groups[-1].append(m)
    for group in groups:
        loaded = cio.load_slices(ckpt_dir, [m.mcore for m in group], stored)
        for m in group:
            row = shared_rows.get(m.layer) if m.op == "router_mlp" else None
            for name, t in to_hf_tensors(m, loaded.pop(m.mcore), shape, row).items():
                writer.add(name, t if out_dtype is None else t.to(out_dtype))
        del loaded
    index = writer.close()
    stored_dtype = str(next(iter(stored.values()))[1]).replace("torch.", "")
    write_config(output_dir, shape, dtype or stored_dtype)
    write_generation_config(output_dir, shape)
    copy_modeling_files(output_dir)
    if tokenizer:
        copy_tokenizer(tokenizer, output_dir, shape.vocab_size)
    index["largest_shard_bytes"] = writer.largest_shard_bytes
    return index
