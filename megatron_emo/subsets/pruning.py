"""Applying an expert subset: gate masking on the full model, or physical pruning (spec 4.4).

* ``mask_experts``: forward hooks set the gate logits of the non-kept experts to ``-inf``; the
  full model then computes what the pruned model computes (up to summation order).
* ``prune_hf_model`` (in memory) and ``prune_hf_dir`` (streaming, directory to directory): the
  kept experts are re-indexed (kept routed ascending, then the shared experts), gate rows are
  sliced, the config gets ``num_experts = keep_k`` (shared included) or ``num_experts_per_layer``
  when the counts differ, ``num_experts_per_tok = min(original, keep_k)``, and
  ``pruning_metadata.json`` records the original indices.
* ``export_megatron_subset``: the pruned HF directory as a Megatron torch_dist checkpoint
  (the streaming ``from-hf``; by default the EP-balanced layout: SharedExpertMLP and the kept
  routed experts padded with never-routed experts to a multiple of ``ep``).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import nn

from megatron_emo.conversion.hf_config import copy_modeling_files
from megatron_emo.conversion.hf_io import TOKENIZER_FILES, HFWeights, ShardWriter
from megatron_emo.subsets.scoring import moe_blocks

__all__ = ["check_megatron_subset", "export_megatron_subset", "layer_num_experts",
           "mask_experts", "prune_hf_dir", "prune_hf_model", "pruned_config"]

_EXPERT_RE = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(.+)$")
_GATE_RE = re.compile(r"^model\.layers\.(\d+)\.mlp\.gate\.weight$")


def layer_num_experts(cfg: dict) -> list[int]:
    """Experts per layer (shared included) of an HF config dict."""
    per_layer = cfg.get("num_experts_per_layer")
    return list(per_layer) if per_layer else [cfg["num_experts"]] * cfg["num_hidden_layers"]


def _check_kept(kept: Sequence[Sequence[int]], counts: Sequence[int], num_shared: int) -> None:
    if len(kept) != len(counts):
        raise ValueError(f"experts_kept_per_layer has {len(kept)} layers, the model has "
                         f"{len(counts)}")
    for layer, (ids, n) in enumerate(zip(kept, counts, strict=True)):
        shared = list(range(n - num_shared, n))
        ids = [int(j) for j in ids]
        routed = [j for j in ids if j < n - num_shared]
        if ids != sorted(set(ids)) or (num_shared and ids[-num_shared:] != shared):
            raise ValueError(f"layer {layer}: kept experts {list(ids)} must be ascending, unique "
                             f"and end with the shared experts {shared}")
        if not routed or any(not 0 <= j < n for j in ids):
            raise ValueError(f"layer {layer}: kept experts {list(ids)} need at least one routed "
                             f"expert and ids in [0, {n})")


@contextlib.contextmanager
def mask_experts(model, experts_kept_per_layer: Sequence[Sequence[int] | None]) -> Iterator:
    """Within the context, the gate logits of non-kept experts are ``-inf`` (layer by layer).

    Args:
        model: an ``EmoForCausalLM``.
        experts_kept_per_layer: kept expert ids per layer; ``None`` or a shorter list leaves the
            remaining layers unmasked (greedy selection masks the already-selected prefix).
    """
    blocks = moe_blocks(model)
    handles = []
    try:
        for block, kept in zip(blocks, experts_kept_per_layer, strict=False):
            if kept is None:
                continue
            keep_E = torch.zeros(block.num_experts, dtype=torch.bool)
            keep_E[list(kept)] = True

            def hook(module, inputs, output, keep_E=keep_E):
                return output.masked_fill(~keep_E.to(output.device), float("-inf"))

            handles.append(block.gate.register_forward_hook(hook))
        yield model
    finally:
        for h in handles:
            h.remove()


def pruned_config(cfg: dict, experts_kept_per_layer: Sequence[Sequence[int]]) -> dict:
    """The HF config dict of the subset (spec 4.4; per-layer counts via num_experts_per_layer)."""
    counts = [len(k) for k in experts_kept_per_layer]
    out = dict(cfg)
    top = max(counts)
    out["num_experts"] = top
    out["num_experts_per_layer"] = counts if len(set(counts)) > 1 else None
    # Layer l routes to min(num_experts_per_tok, its count) experts (modeling_emo.py).
    out["num_experts_per_tok"] = min(cfg["num_experts_per_tok"], top)
    out["output_router_logits"] = True
    return out


def prune_hf_model(model, experts_kept_per_layer: Sequence[Sequence[int]]):
    """Prunes an ``EmoForCausalLM`` in place (experts re-indexed, gate rows sliced, config).

    Returns:
        ``model``.
    """
    blocks = moe_blocks(model)
    counts = [b.num_experts for b in blocks]
    _check_kept(experts_kept_per_layer, counts, model.config.num_shared_experts)
    for block, kept in zip(blocks, experts_kept_per_layer, strict=True):
        kept = list(kept)
        gate = nn.Linear(block.gate.in_features, len(kept), bias=False,
                         dtype=block.gate.weight.dtype, device=block.gate.weight.device)
        with torch.no_grad():
            gate.weight.copy_(block.gate.weight[kept])
        block.gate = gate
        block.experts = nn.ModuleList([block.experts[j] for j in kept])
        block.num_experts = len(kept)
        block.top_k = min(model.config.num_experts_per_tok, len(kept))
    new = pruned_config(model.config.to_dict(), experts_kept_per_layer)
    for key in ("num_experts", "num_experts_per_layer", "num_experts_per_tok"):
        setattr(model.config, key, new[key])
    return model


def prune_hf_dir(src_dir: str, out_dir: str, experts_kept_per_layer: Sequence[Sequence[int]],
                 *, metadata: dict | None = None, max_shard_bytes: int = 2 * 1024**3) -> dict:
    """Writes the pruned copy of an EMO HF directory, tensor by tensor.

    Args:
        src_dir: the EMO HF directory (full or already pruned).
        out_dir: the pruned HF directory (created).
        experts_kept_per_layer: kept expert ids per layer (ascending, shared experts last).
        metadata: extra ``pruning_metadata.json`` fields (method, examples, ...). Its
            ``experts_kept_per_layer`` holds indices of the original model (composed with the
            source's own ``pruning_metadata.json`` when the source is already a subset).
        max_shard_bytes: largest safetensors shard.

    Returns:
        The written config dict.
    """
    from megatron_emo.subsets.sources import read_emo_config

    cfg = read_emo_config(src_dir)
    counts = layer_num_experts(cfg)
    num_shared = cfg.get("num_shared_experts", 0)
    _check_kept(experts_kept_per_layer, counts, num_shared)
    new_index = [{old: new for new, old in enumerate(k)} for k in experts_kept_per_layer]
    weights = HFWeights(src_dir)
    os.makedirs(out_dir, exist_ok=True)
    writer = ShardWriter(out_dir, max_shard_bytes)
    for name in sorted(weights.names(), key=_natural_key):
        m = _EXPERT_RE.match(name)
        if m:
            layer, j = int(m.group(1)), int(m.group(2))
            if j in new_index[layer]:
                writer.add(f"model.layers.{layer}.mlp.experts.{new_index[layer][j]}."
                           f"{m.group(3)}", weights.get(name))
            continue
        g = _GATE_RE.match(name)
        t = weights.get(name)
        if g:
            t = t[list(experts_kept_per_layer[int(g.group(1))])]
        writer.add(name, t)
    writer.close()
    new_cfg = pruned_config(cfg, experts_kept_per_layer)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(new_cfg, f, indent=2)
    copy_modeling_files(out_dir)
    for name in ("generation_config.json",) + TOKENIZER_FILES:
        if os.path.isfile(os.path.join(src_dir, name)):
            shutil.copyfile(os.path.join(src_dir, name), os.path.join(out_dir, name))
    kept_ids = [list(map(int, k)) for k in experts_kept_per_layer]
    src_meta_path = os.path.join(src_dir, "pruning_metadata.json")
    src_meta = json.load(open(src_meta_path)) if os.path.isfile(src_meta_path) else None
    if src_meta and src_meta.get("experts_kept_per_layer"):
        # Re-pruning a subset: record indices of the original (unpruned) model.
        prev = src_meta["experts_kept_per_layer"]
        original = [[prev[layer][j] for j in ids] for layer, ids in enumerate(kept_ids)]
        counts_original = src_meta.get("num_experts_per_layer_original", counts)
    else:
        original, counts_original = kept_ids, counts
    meta = {
        "experts_kept_per_layer": original,
        "experts_kept_per_layer_of_source": kept_ids,
        "num_experts_per_layer_source": counts,
        "num_experts_per_layer_original": counts_original,
        "num_experts_kept_per_layer": [len(k) for k in experts_kept_per_layer],
        "num_shared_experts": num_shared,
        "num_experts_per_tok": new_cfg["num_experts_per_tok"],
        "task": None, "split": None, "num_calibration": None, "seed": None, "shots": None,
    }
    meta.update(metadata or {})
    with open(os.path.join(out_dir, "pruning_metadata.json"), "w") as f:
        json.dump(meta, f, indent=2)
    return new_cfg


def _natural_key(name: str) -> list:
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


def check_megatron_subset(num_experts_per_layer: Sequence[int], ep: int) -> None:
    """Refuses subsets Megatron cannot hold: different counts per layer, or a bad EP size.

    Any EP size works otherwise: the export pads the experts to a multiple of it.

    Raises:
        ValueError: naming the counts or the EP size.
    """
    if len(set(num_experts_per_layer)) > 1:
        raise ValueError(f"a Megatron checkpoint needs the same expert count in every layer; the "
                         f"subset keeps {list(num_experts_per_layer)} experts per layer")
    if ep < 1:
        raise ValueError(f"expert_model_parallel_size must be >= 1, got {ep}")


def export_megatron_subset(pruned_hf_dir: str, out_dir: str, *, ep: int = 1, tp: int = 1,
                           shared_layout: str = "auto", dtype: str | None = None,
                           log: Callable[[str], None] = print) -> str:
    """Imports a pruned HF directory as a Megatron torch_dist checkpoint (weights only).

    Args:
        pruned_hf_dir: the pruned EMO HF directory (uniform expert count per layer).
        out_dir: the checkpoint directory to create.
        ep: expert-parallel size; padding experts make it divide the experts.
        tp: tensor-parallel size checked against the heads.
        shared_layout: ``auto`` (SharedExpertMLP + padding), ``mlp`` or ``router``
            (``conversion.from_hf``).
        dtype: stored dtype; default the source's.
        log: receives the summary and the matching training flags.

    Returns:
        The dist_checkpointing directory written (``out_dir/release``).

    Raises:
        ValueError: per-layer expert counts differ, or TP / EP sizes do not fit.
    """
    from megatron_emo.conversion.from_hf import import_from_hf
    from megatron_emo.subsets.sources import read_emo_config

    check_megatron_subset(layer_num_experts(read_emo_config(pruned_hf_dir)), ep)
    return import_from_hf(pruned_hf_dir, out_dir, tp=tp, ep=ep, shared_layout=shared_layout,
                          dtype=dtype, print_fn=log)
