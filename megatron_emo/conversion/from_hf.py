"""Import: EMO HF directory (full or pruned, emo_spec.md 4.4) -> Megatron torch_dist checkpoint.

Streams: no Megatron model is built. The checkpoint's layout (keys, global shapes, chunks,
``_extra_state`` objects) comes from the ``key_map`` table, and each chunk is read from its
safetensors shard and converted only when ``torch_dist_writer`` writes it, so memory holds about
one tensor beyond the imports. Needs no process group, model-parallel state or CUDA, so it runs
the same on GPU nodes. Output goes to a hidden sibling directory that is renamed to
``output_dir`` at the end (``staging``): a killed import leaves nothing that looks complete.

Writes a ``release`` checkpoint (``latest_checkpointed_iteration.txt`` = ``release``) holding the
model and ``args`` only, which megatron.training's ``--load`` treats as weights-only (iteration 0,
new optimizer and RNG; use ``--finetune`` or ``--no-load-optim --no-load-rng``). torch_dist stores
global tensors, so one checkpoint serves every TP / PP and every EP that divides its expert count.

Shared expert layouts (``shared_layout``):

* ``'mlp'``: the EP-balanced layout. The shared expert is Megatron's ``SharedExpertMLP``
  (computed on every rank), the routed experts are padded with never-routed padding experts to a
  multiple of ``ep`` (127 routed + 1 padding = 128 at EP=8). HF's unused shared router row is
  kept in the common state (``key_map.SHARED_ROUTER_ROWS_KEY``) so the export is bit-exact.
* ``'router'``: the shared expert inside the router as the last expert
  (``emo_num_shared_experts``); 128 experts divide EP = 2/4/8 without padding, but the EP rank
  holding the shared expert receives every token.
* ``'auto'`` (default): ``'mlp'`` when the model has exactly one shared expert (every EMO
  release), else ``'router'``. It balances EP ranks, divides by padding, and is what the EMO
  recipe trains; at ``ep=1`` it adds no padding.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable

import torch

from megatron_emo.conversion import checkpoint_io as cio
from megatron_emo.conversion.hf_config import EmoShape, shape_from_hf_config
from megatron_emo.conversion.hf_io import HFWeights, dtype_from_name
from megatron_emo.conversion.key_map import (
    SHARED_ROUTER_ROWS_KEY,
    Mapping,
    expand_mappings,
    hf_shapes,
    mcore_num_experts,
    mcore_shape,
    padding_for_ep,
    to_mcore_tensor,
)
from megatron_emo.conversion.staging import staged_output_dir
from megatron_emo.conversion.torch_dist_writer import TensorChunk, extra_state_key, write_torch_dist

__all__ = ["check_parallel_layout", "import_from_hf", "resolve_shared_layout", "training_flags"]

# Layer-level modules whose ``_extra_state`` Megatron stores as one ShardedObject per layer
# (``pre_mlp_layernorm``: only the Transformer Engine MoE spec has it as its own module).
_LAYER_EXTRA_STATES = ("self_attention.linear_qkv", "self_attention.linear_proj",
                       "pre_mlp_layernorm")
_SHARED_MLP_EXTRA_STATES = ("mlp.shared_experts.linear_fc1", "mlp.shared_experts.linear_fc2")
_EXPERT_EXTRA_STATES = ("mlp.experts.experts.linear_fc1", "mlp.experts.experts.linear_fc2")


def resolve_shared_layout(shape: EmoShape, shared_layout: str) -> str:
    """``'auto'`` -> ``'mlp'`` for one shared expert, else ``'router'``; others unchanged."""
    if shared_layout == "auto":
        return "mlp" if shape.num_shared_experts == 1 else "router"
    if shared_layout not in ("router", "mlp"):
        raise ValueError(f"shared_layout must be 'auto', 'router' or 'mlp', got {shared_layout!r}")
    return shared_layout


def check_parallel_layout(shape: EmoShape, shared_layout: str, tp: int, ep: int,
                          num_padding: int = 0) -> None:
    """Refuses TP / EP sizes the model cannot be split into, naming the numbers."""
    n = mcore_num_experts(shape, shared_layout, num_padding)
    if ep < 1 or n % ep:
        raise ValueError(f"expert_model_parallel_size {ep} does not divide the {n} Megatron "
                         f"experts per layer ({num_padding} of them padding); leave "
                         f"num_padding_experts unset to pad to a multiple of {ep}")
    for what, count in (("num_attention_heads", shape.num_attention_heads),
                        ("num_key_value_heads", shape.num_key_value_heads)):
        if tp < 1 or count % tp:
            raise ValueError(f"tensor_model_parallel_size {tp} does not divide {what}={count}")


def training_flags(shape: EmoShape, shared_layout: str, num_padding: int) -> list[str]:
    """The megatron.training MoE flags that match a checkpoint of this layout."""
    flags = ["--num-experts", str(mcore_num_experts(shape, shared_layout, num_padding)),
             "--moe-ffn-hidden-size", str(shape.intermediate_size)]
    if shared_layout == "mlp":
        flags += ["--moe-shared-expert-intermediate-size", str(shape.intermediate_size),
                  "--emo-num-shared-experts", "0",
                  "--moe-router-topk", str(shape.num_experts_per_tok - 1)]
    else:
        flags += ["--emo-num-shared-experts", str(shape.num_shared_experts),
                  "--moe-router-topk", str(shape.num_experts_per_tok)]
    return flags + ["--emo-num-padding-experts", str(num_padding)]


def _check_hf_tensors(weights: HFWeights, shape: EmoShape, hf_dir: str) -> None:
    """Names, vocabulary and shapes from the safetensors headers, before anything is written."""
    expected = hf_shapes(shape)
    unknown = sorted(weights.names() - set(expected))
    if unknown:
        raise ValueError(f"unknown keys in {hf_dir}: {unknown[:10]}"
                         f"{' ...' if len(unknown) > 10 else ''}")
    missing = sorted(set(expected) - weights.names())
    if missing:
        raise ValueError(f"missing keys in {hf_dir} (num_experts={shape.num_experts}): "
                         f"{missing[:10]}{' ...' if len(missing) > 10 else ''}")
    rows = weights.shape("model.embed_tokens.weight")[0]
    if rows != shape.vocab_size:
        raise ValueError(f"vocab mismatch: model.embed_tokens.weight has {rows} rows, "
                         f"config vocab_size is {shape.vocab_size}")
    for name, want in expected.items():
        got = weights.shape(name)
        if got != tuple(want):
            raise ValueError(f"shape mismatch for {name}: got {got}, expected {tuple(want)}")


def _chunks(m: Mapping, shape: EmoShape, weights: HFWeights, n_experts: int,
            dtype: torch.dtype | None, zeros_dtype: torch.dtype) -> list[TensorChunk]:
    """The stored chunks of one Megatron tensor, as Megatron's save lays them out.

    Per-layer tensors get one chunk per layer (leading axis = layer), expert tensors one per
    (layer, global expert), and SwiGLU fc1 two (gate rows, then up rows), as
    ``apply_swiglu_sharded_factory`` stores them (``megatron/core/transformer/mlp.py``).
    """
    key, index = cio.storage_key(m.mcore)
    local = mcore_shape(m, shape)
    lead = (shape.num_layers, n_experts)[:len(index)]
    gshape = tuple(lead) + tuple(local)
    out_dtype = dtype or (weights.dtype(m.hf[0]) if m.hf else zeros_dtype)

    def chunk(row0: int, rows: int, load: Callable[[], torch.Tensor], k: str = key):
        offset = tuple(index) + (row0,) + (0,) * (len(local) - 1)
        size = (1,) * len(index) + (rows,) + tuple(local[1:])
        return TensorChunk(k, gshape, offset, size, out_dtype, load)

    if m.op == "glu" or (m.op == "zeros" and m.mcore.endswith("linear_fc1.weight")):
        half = local[0] // 2
        if m.op == "zeros":
            return [chunk(r, half, lambda: torch.zeros(half, local[1], dtype=out_dtype))
                    for r in (0, half)]
        return [chunk(0, half, lambda: weights.get(m.hf[0])),
                chunk(half, half, lambda: weights.get(m.hf[1]))]

    def load() -> torch.Tensor:
        hf = {n: weights.get(n) for n in m.hf}
        return to_mcore_tensor(m, hf, shape, dtype=out_dtype)[0]

    chunks = [chunk(0, local[0], load)]
    alias = cio.STORAGE_ALIASES.get(key)
    if alias:  # also the Transformer Engine MoE spelling, so TE-spec models find it too
        chunks.append(chunk(0, local[0], load, alias))
    return chunks


def import_from_hf(hf_dir: str, output_dir: str, *, tp: int = 1, ep: int = 1,
                   shared_layout: str = "auto", num_padding_experts: int | None = None,
                   dtype: str | None = None, progress: bool | None = None,
                   print_fn: Callable[[str], None] = print) -> str:
    """Converts an EMO HF directory into a Megatron torch_dist checkpoint, streaming.

    Args:
        hf_dir: EMO HF directory (``config.json`` + safetensors, full or pruned).
        output_dir: checkpoint directory to create (an existing empty directory or a previous
            checkpoint there is replaced once the new one is complete).
        tp: tensor-parallel size to check the heads against (recorded in ``args``).
        ep: expert-parallel size the expert count must divide (padding is added for it).
        shared_layout: ``'auto'``, ``'mlp'`` or ``'router'`` (module docstring).
        num_padding_experts: padding experts; default the fewest that make ``ep`` divide.
        dtype: ``float32`` / ``bfloat16`` / ``float16``; default: each tensor's own dtype.
        progress: tqdm bar (tensors and GB written); ``None``: only on a terminal.
        print_fn: where the summary and the matching training flags go.

    Returns:
        The dist_checkpointing directory written (``output_dir/release``).

    Raises:
        ValueError: unknown / missing HF tensors, shape or vocabulary mismatches, TP or EP sizes
            that do not divide.
    """
    cfg = json.load(open(os.path.join(hf_dir, "config.json")))
    shape = shape_from_hf_config(cfg)
    layout = resolve_shared_layout(shape, shared_layout)
    if num_padding_experts is None:
        num_padding_experts = padding_for_ep(shape, layout, ep)
    check_parallel_layout(shape, layout, tp, ep, num_padding_experts)
    weights = HFWeights(hf_dir)
    _check_hf_tensors(weights, shape, hf_dir)
    out_dtype = dtype_from_name(dtype) if dtype else None
    params_dtype = out_dtype or weights.dtype("model.embed_tokens.weight")
    n_experts = mcore_num_experts(shape, layout, num_padding_experts)
    mappings = expand_mappings(shape, layout, num_padding_experts)
    chunks = [c for m in mappings
              for c in _chunks(m, shape, weights, n_experts, out_dtype, params_dtype)]

    objects: dict[str, object] = {}
    layers = shape.num_layers
    for layer in range(layers):
        subs = _LAYER_EXTRA_STATES + (_SHARED_MLP_EXTRA_STATES if layout == "mlp" else ())
        for sub in subs:
            objects[extra_state_key(f"decoder.layers.{sub}._extra_state", (layers,),
                                    (layer,))] = None
        for expert in range(n_experts):
            for sub in _EXPERT_EXTRA_STATES:
                objects[extra_state_key(f"decoder.layers.{sub}._extra_state",
                                        (layers, n_experts), (layer, expert))] = None

    args = cio.megatron_args(shape, layout, tp=tp, ep=ep, num_padding=num_padding_experts,
                             params_dtype=params_dtype, bf16=params_dtype == torch.bfloat16)
    common: dict = {"args": args, "checkpoint_version": 3.0, "iteration": 0}
    if layout == "mlp":
        # Written before the tensors (DCP writes byte objects first), so read up front: one
        # gate row per layer, never used by HF (a softmax over one logit is 1.0).
        common[SHARED_ROUTER_ROWS_KEY] = {
            layer: weights.get(f"model.layers.{layer}.mlp.gate.weight")[-1].clone()
            for layer in range(layers)}
    pruning = os.path.join(hf_dir, "pruning_metadata.json")
    if os.path.isfile(pruning):
        common["emo_pruning_metadata"] = json.load(open(pruning))

    from tqdm import tqdm

    total = sum(c.nbytes for c in chunks)
    bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, dynamic_ncols=True,
               desc=f"from-hf {os.path.basename(os.path.abspath(output_dir))}",
               disable=None if progress is None else not progress)
    written = [0]

    def on_write(c: TensorChunk) -> None:
        written[0] += 1
        bar.update(c.nbytes)
        bar.set_postfix_str(f"{written[0]}/{len(chunks)} tensors", refresh=False)

    try:
        with staged_output_dir(output_dir, what="Megatron checkpoint", is_previous_output=lambda p:
                               os.path.isfile(os.path.join(p, cio.TRACKER_FILE))) as tmp:
            write_torch_dist(os.path.join(tmp, "release"), chunks, common_state=common,
                             sharded_objects=objects, on_write=on_write)
            with open(os.path.join(tmp, cio.TRACKER_FILE), "w") as f:
                f.write("release")
    finally:
        bar.close()
    flags = " ".join(training_flags(shape, layout, num_padding_experts))
    print_fn(f"wrote {len(chunks)} tensors, {total / 2**30:.2f} GiB: {output_dir}/release "
             f"(shared_layout={layout}, {n_experts} experts per layer, {num_padding_experts} "
             f"padding); train with: {flags}")
    return os.path.join(output_dir, "release")
