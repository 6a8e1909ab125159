"""Export: Megatron torch_dist checkpoint (any TP / PP / EP layout) -> EMO HF directory.

Streams tensor by tensor: each Megatron tensor's slice (one layer, or one layer's expert) is read
from the checkpoint's storage, converted with the ``key_map`` table and written at once by a
shard writer whose headers are planned up front, so memory holds about one tensor beyond the
imports whatever the shard size. Padding experts (``emo_num_padding_experts`` in ``args``) are
dropped. Needs no process group, model-parallel state or CUDA. Output goes to a hidden sibling
directory renamed to ``output_dir`` at the end: a killed export leaves nothing that looks
complete.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable

import torch

from megatron_emo.conversion import checkpoint_io as cio
from megatron_emo.conversion.hf_config import (
    copy_modeling_files,
    write_config,
    write_generation_config,
)
from megatron_emo.conversion.hf_io import StreamingShardWriter, copy_tokenizer, dtype_from_name
from megatron_emo.conversion.key_map import (
    SHARED_ROUTER_ROWS_KEY,
    expand_mappings,
    hf_shapes_for,
    mcore_num_experts,
    to_hf_tensors,
)
from megatron_emo.conversion.staging import staged_output_dir

__all__ = ["export_to_hf"]


def _check_stored(stored: dict, mappings, shape, layout: str, num_padding: int) -> None:
    """Refuses checkpoints whose stored tensors do not match the args, naming them."""
    needed: dict[str, tuple[int, ...]] = {}
    for m in mappings:
        key, index = cio.storage_key(m.mcore)
        needed[cio.stored_key(key, stored)] = index
    model_keys = {k for k in stored if not k.startswith(("optimizer.", "rng_state", "rerun"))}
    # Both spellings of an aliased tensor may be stored (from-hf writes both): one is read.
    aliases = {a for k, a in cio.STORAGE_ALIASES.items() if k in needed or a in needed} | {
        k for k, a in cio.STORAGE_ALIASES.items() if a in needed}
    unknown = sorted(model_keys - set(needed) - aliases)
    if unknown:
        raise ValueError(f"unknown keys in checkpoint (not in the EMO mapping): {unknown}")
    missing = sorted(set(needed) - model_keys)
    if missing:
        raise ValueError(f"missing keys in checkpoint: {missing}")
    n_mcore = mcore_num_experts(shape, layout, num_padding)
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
                 eos_token_id: int | None = None, pad_token_id: int | None = None,
                 progress: bool | None = None,
                 print_fn: Callable[[str], None] = print) -> dict:
    """Converts a Megatron checkpoint to an EMO HF directory, streaming.

    Args:
        checkpoint: the directory with ``latest_checkpointed_iteration.txt`` or an ``iter_*`` dir.
        output_dir: HF directory to create (an existing empty directory or a previous HF export
            there is replaced once the new one is complete).
        max_shard_bytes: largest safetensors shard.
        dtype: ``float32`` / ``bfloat16`` / ``float16``; default: the stored dtype.
        tokenizer: HF tokenizer directory or sentencepiece ``.model`` file to copy.
        dry_run: print the mapping and the checks, write nothing.
        eos_token_id: overrides the id taken from ``args`` (``eos_token_id``, else EMO's 100257).
        pad_token_id: overrides the id taken from ``args`` (``pad_token_id``, else EMO's 100277).
        progress: tqdm bar (tensors and GB written); ``None``: only on a terminal.
        print_fn: where ``--dry-run`` prints.

    Returns:
        The ``model.safetensors.index.json`` content (empty dict on a dry run) plus
        ``largest_shard_bytes``.
    """
    from megatron.core import dist_checkpointing

    ckpt_dir = cio.resolve_checkpoint_dir(checkpoint)
    common = dist_checkpointing.load_common_state_dict(ckpt_dir)  # no process group needed
    if "args" not in common:
        raise ValueError(f"{ckpt_dir} has no 'args' in its common state")
    shape, layout, padding = cio.shape_from_args(common["args"])
    if eos_token_id is not None:
        shape = dataclasses.replace(shape, eos_token_id=eos_token_id)
    if pad_token_id is not None:
        shape = dataclasses.replace(shape, pad_token_id=pad_token_id)
    shared_rows = common.get(SHARED_ROUTER_ROWS_KEY) or {}
    mappings = expand_mappings(shape, layout, padding)
    stored = cio.stored_tensor_keys(ckpt_dir)
    _check_stored(stored, mappings, shape, layout, padding)
    if dry_run:
        print_fn(f"# {ckpt_dir}: {shape} shared_layout={layout} padding_experts={padding}")
        for m in mappings:
            key, index = cio.storage_key(m.mcore)
            key = cio.stored_key(key, stored)
            target = ", ".join(m.hf) if m.hf else "(padding expert, dropped)"
            print_fn(f"{m.mcore} [{key}{list(index)}] --{m.op}--> {target}")
        return {}
    out_dtype = dtype_from_name(dtype) if dtype else None
    mappings = [m for m in mappings if m.op != "zeros"]
    entries = []
    for m in mappings:
        key = cio.stored_key(cio.storage_key(m.mcore)[0], stored)
        for name, hf_shape in hf_shapes_for(m, shape).items():
            entries.append((name, tuple(hf_shape), out_dtype or stored[key][1]))

    from tqdm import tqdm

    bar = tqdm(total=sum(_nbytes(e) for e in entries), unit="B",
               unit_scale=True, unit_divisor=1024, dynamic_ncols=True,
               desc=f"to-hf {os.path.basename(os.path.abspath(output_dir))}",
               disable=None if progress is None else not progress)
    written = 0
    try:
        with staged_output_dir(output_dir, what="HF model directory", is_previous_output=lambda p:
                               os.path.isfile(os.path.join(p, "config.json"))) as tmp:
            if tokenizer:  # first: its vocabulary check must not wait for the weights
                copy_tokenizer(tokenizer, tmp, shape.vocab_size)
            writer = StreamingShardWriter(tmp, entries, max_shard_bytes)
            for m in mappings:
                t = cio.load_slice(ckpt_dir, m.mcore, stored)
                row = shared_rows.get(m.layer) if m.op == "router_mlp" else None
                for name, h in to_hf_tensors(m, t, shape, row).items():
                    h = h if out_dtype is None else h.to(out_dtype)
                    writer.add(name, h)
                    written += 1
                    bar.update(h.numel() * h.element_size())
                    bar.set_postfix_str(f"{written}/{len(entries)} tensors", refresh=False)
                del t
            index = writer.close()
            stored_dtype = str(stored[cio.storage_key(mappings[0].mcore)[0]][1])
            write_config(tmp, shape, dtype or stored_dtype.replace("torch.", ""))
            write_generation_config(tmp, shape)
            copy_modeling_files(tmp)
    finally:
        bar.close()
    index["largest_shard_bytes"] = writer.largest_shard_bytes
    return index


def _nbytes(entry) -> int:
    _, shape, dt = entry
    n = 1
    for d in shape:
        n *= d
    return n * torch.empty((), dtype=dt).element_size()
