"""Import: EMO HF directory (full or pruned, emo_spec.md 4.4) -> Megatron torch_dist checkpoint.

Writes a ``release`` checkpoint (``latest_checkpointed_iteration.txt`` = ``release``) holding the
model and ``args`` only, which megatron.training's ``--load`` treats as weights-only (iteration 0,
new optimizer and RNG; use ``--finetune`` or ``--no-load-optim --no-load-rng``). torch_dist stores
global tensors, so one checkpoint serves every TP / EP layout; ``tp``/``ep`` are checked against the
model here and recorded in ``args``.

Expert parallelism with the published 127 routed experts: the default ``shared_layout='router'``
keeps the shared expert inside the router as expert ``E-1`` (``emo_num_shared_experts=1``), so
Megatron has E = 128 experts and EP = 2/4/8 divide it: no padding experts are needed. A pruned
model has E = keep_k experts (shared included) and needs EP | keep_k. With ``shared_layout='mlp'``
(Megatron ``SharedExpertMLP``) Megatron has E-1 = 127 experts and EP must divide that; HF's unused
shared router row is then kept in the checkpoint's common state (``key_map.SHARED_ROUTER_ROWS_KEY``)
so the export restores it bit-exactly.

The Megatron model is built once (TP=1, EP=1, CPU) and filled tensor by tensor, so peak memory is
about one copy of the model plus one HF tensor.
"""

from __future__ import annotations

import json
import os

import torch

from megatron_emo.conversion import checkpoint_io as cio
from megatron_emo.conversion.hf_config import shape_from_hf_config
from megatron_emo.conversion.hf_io import HFWeights
from megatron_emo.conversion.key_map import (MCORE_ALIASES, SHARED_ROUTER_ROWS_KEY,
                                             expand_mappings, hf_shapes, mcore_num_experts,
                                             to_mcore_tensor)

__all__ = ["import_from_hf"]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _local_name(name: str) -> str:
    """Maps a TE-spec parameter name (norm fused into the next linear) to the table's name."""
    for te, local in MCORE_ALIASES.items():
        prefix, suffix = te.split("{layer}")
        if name.startswith(prefix) and name.endswith(suffix):
            layer = name[len(prefix):len(name) - len(suffix)]
            if layer.isdigit():
                return local.format(layer=layer)
    return name


def check_parallel_layout(shape, shared_layout: str, tp: int, ep: int) -> None:
    """Refuses TP / EP sizes the model cannot be split into, naming the numbers."""
    n = mcore_num_experts(shape, shared_layout)
    if n % ep:
        hint = (" (use shared_layout='router', which keeps the shared expert as a Megatron "
                "expert)" if shared_layout == "mlp" else "")
        raise ValueError(f"expert_model_parallel_size {ep} does not divide the {n} Megatron "
                         f"experts per layer{hint}")
    for what, count in (("num_attention_heads", shape.num_attention_heads),
                        ("num_key_value_heads", shape.num_key_value_heads)):
        if count % tp:
            raise ValueError(f"tensor_model_parallel_size {tp} does not divide {what}={count}")


def import_from_hf(hf_dir: str, output_dir: str, *, tp: int = 1, ep: int = 1,
                   shared_layout: str = "router", dtype: str | None = None) -> str:
    """Converts an EMO HF directory into a Megatron torch_dist checkpoint.

    Returns:
        The dist_checkpointing directory written (``output_dir/release``).
    """
    cfg = json.load(open(os.path.join(hf_dir, "config.json")))
    shape = shape_from_hf_config(cfg)
    check_parallel_layout(shape, shared_layout, tp, ep)
    weights = HFWeights(hf_dir)
    expected = hf_shapes(shape)
    unknown = sorted(weights.names() - set(expected))
    if unknown:
        raise ValueError(f"unknown keys in {hf_dir}: {unknown[:10]}"
                         f"{' ...' if len(unknown) > 10 else ''}")
    missing = sorted(set(expected) - weights.names())
    if missing:
        raise ValueError(f"missing keys in {hf_dir} (num_experts={shape.num_experts}): "
                         f"{missing[:10]}{' ...' if len(missing) > 10 else ''}")
    first = weights.get("model.embed_tokens.weight")
    if first.shape[0] != shape.vocab_size:
        raise ValueError(f"vocab mismatch: model.embed_tokens.weight has {first.shape[0]} rows, "
                         f"config vocab_size is {shape.vocab_size}")
    params_dtype = _DTYPES[dtype] if dtype else first.dtype

    from megatron.core import parallel_state

    from megatron_emo.mcore.cpu_backend import initialize_model_parallel_cpu

    cio.ensure_process_group()
    if not parallel_state.model_parallel_is_initialized():
        initialize_model_parallel_cpu(seed=1234)
    config = cio.mcore_config_from_shape(shape, shared_layout, params_dtype=params_dtype,
                                         perform_initialization=False)
    model = cio.build_model(config, shape)
    params = {k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
    # Transformer Engine spec spelling of the fused norms -> local-spec names of the table.
    params = {_local_name(k): v for k, v in params.items()}
    filled = set()
    shared_rows = {}
    with torch.no_grad():
        for m in expand_mappings(shape, shared_layout):
            t, row = to_mcore_tensor(m, {n: weights.get(n) for n in m.hf}, shape)
            if m.mcore not in params:
                raise KeyError(f"the Megatron model has no parameter {m.mcore}")
            if row is not None:
                shared_rows[m.layer] = row
            params[m.mcore].copy_(t.to(params_dtype))
            filled.add(m.mcore)
    unfilled = sorted(set(params) - filled)
    if unfilled:
        raise ValueError(f"Megatron parameters without an HF source: {unfilled}")
    args = cio.megatron_args(shape, shared_layout, tp=tp, ep=ep,
                             params_dtype=params_dtype, bf16=params_dtype == torch.bfloat16)
    extra = {SHARED_ROUTER_ROWS_KEY: shared_rows} if shared_layout == "mlp" else {}
    pruning = os.path.join(hf_dir, "pruning_metadata.json")
    if os.path.isfile(pruning):
        extra["emo_pruning_metadata"] = json.load(open(pruning))
    return cio.save_megatron_checkpoint(model, output_dir, args, iteration=None,
                                        extra_common=extra)
