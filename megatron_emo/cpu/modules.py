"""The CPU backend's plugin-side pieces: Megatron subclasses that keep state on the host.

The spec/model adapters swap them in (F1-F3, F5, F6 of ``../shared/docs/cpu_megatron.md``).

Megatron symbols: ``tensor_parallel.random.{CudaRNGStatesTracker,
_MODEL_PARALLEL_RNG_TRACKER_NAME}``,
``utils.GlobalMemoryBuffer``, ``models.common.embeddings.rotary_pos_embedding.RotaryEmbedding``,
``transformer.torch_norm.WrappedTorchNorm``, ``transformer.spec_utils.ModuleSpec``,
``transformer.moe.token_dispatcher.MoEAlltoAllTokenDispatcher``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Iterator
from functools import reduce
from operator import mul
from typing import Any

import torch
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
from megatron.core.tensor_parallel import random as mcore_random
from megatron.core.transformer.moe.token_dispatcher import MoEAlltoAllTokenDispatcher
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.torch_norm import WrappedTorchNorm
from megatron.core.utils import GlobalMemoryBuffer

from megatron_emo.mcore.model import ModelAdapter

__all__ = [
    "CPU_MODEL_ADAPTER",
    "CPUAlltoAllTokenDispatcher",
    "CPUGlobalMemoryBuffer",
    "CPURNGStatesTracker",
    "CPURotaryEmbedding",
    "CPUSequenceParallelNorm",
    "adapt_model_for_cpu",
    "adapt_spec_for_cpu",
]


class CPURNGStatesTracker(mcore_random.CudaRNGStatesTracker):
    """F1: Megatron's named RNG states, kept as CPU generator states."""

    def add(self, name: str, seed: int) -> None:
        """Registers a named state seeded with ``seed``."""
        self._is_initialized = True
        if seed in self.seeds_:
            raise Exception(f"seed {seed} already exists")
        if name in self.states_:
            raise Exception(f"rng state {name} already exists")
        self.seeds_.add(seed)
        self.states_[name] = torch.Generator().manual_seed(seed).get_state()

    @contextlib.contextmanager
    def fork(self, name: str = mcore_random._MODEL_PARALLEL_RNG_TRACKER_NAME) -> Iterator[None]:
        """Runs the block with the CPU RNG set to the named state, then restores it."""
        if name not in self.states_:
            raise Exception(f"rng state {name} is not added")
        orig_state = torch.get_rng_state()
        torch.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(orig_state)


class CPUGlobalMemoryBuffer(GlobalMemoryBuffer):
    """F2: the attention scratch buffer on the host."""

    def get_tensor(self, tensor_shape, dtype, name, mem_alloc_context=None):
        """A (possibly reused) host tensor of ``tensor_shape``."""
        required_len = reduce(mul, tensor_shape, 1)
        buf = self.buffer.get((name, dtype))
        if buf is None or buf.numel() < required_len:
            buf = self.buffer[(name, dtype)] = torch.empty(required_len, dtype=dtype)
        return buf[:required_len].view(*tensor_shape)


class CPURotaryEmbedding(RotaryEmbedding):
    """F3: RoPE whose ``inv_freq`` stays on its device."""

    def get_emb(self, max_seq_len: int, offset: int = 0) -> torch.Tensor:
        """RoPE table ``[s, 1, 1, dim]`` (Megatron's ``get_emb`` without the move to CUDA)."""
        freqs = self.get_freqs_non_repeated(max_seq_len, offset)
        if not self.rotary_interleaved:
            emb = torch.cat((freqs, freqs), dim=-1)
        else:
            emb = torch.stack((freqs.view(-1, 1), freqs.view(-1, 1)), dim=-1).view(
                freqs.shape[0], -1
            )
        return emb[:, None, None, :]


class CPUSequenceParallelNorm:
    """F6: the local spec's torch norm, usable with sequence parallelism.

    ``transformer/torch_norm.py:50`` (``WrappedTorchNorm``, the local spec's norm without apex)
    refuses ``sequence_parallel``, and apex's ``FusedLayerNorm`` needs CUDA. A norm over the
    hidden dimension is per token, so it runs unchanged on a sequence shard; its weight
    gradients are partial sums over the shard, which Megatron all-reduces over the TP group for
    parameters marked ``sequence_parallel`` (``distributed/finalize_model_grads.py:452``), as
    ``fusions/fused_layer_norm.py:119`` marks them.
    """

    def __new__(
        cls,
        config,
        hidden_size: int,
        eps: float = 1e-5,
        persist_layer_norm: bool = False,
        zero_centered_gamma: bool = False,
        normalization: str = "LayerNorm",
    ) -> torch.nn.Module:
        """A torch ``LayerNorm``/``RMSNorm`` whose parameters carry ``sequence_parallel``."""
        if config.layernorm_zero_centered_gamma or config.memory_efficient_layer_norm:
            raise ValueError(
                "--cpu: the torch norm supports neither layernorm_zero_centered_gamma "
                f"({config.layernorm_zero_centered_gamma}) nor memory_efficient_layer_norm "
                f"({config.memory_efficient_layer_norm})"
            )
        if config.normalization == "LayerNorm":
            norm = torch.nn.LayerNorm(hidden_size, eps=eps)
        elif config.normalization == "RMSNorm":
            norm = torch.nn.RMSNorm(hidden_size, eps=eps)
        else:
            raise ValueError(f"--cpu supports LayerNorm and RMSNorm, not {config.normalization!r}")
        for param in norm.parameters():
            param.sequence_parallel = config.sequence_parallel
        return norm


def _replace_norms(node: Any, memo: dict[int, Any]) -> Any:
    """A copy of a spec tree with ``WrappedTorchNorm`` replaced by ``CPUSequenceParallelNorm``."""
    if node is WrappedTorchNorm:
        return CPUSequenceParallelNorm
    if id(node) in memo:
        return memo[id(node)]
    if isinstance(node, ModuleSpec) or (
        dataclasses.is_dataclass(node) and not isinstance(node, type)
    ):
        changes = {
            f.name: _replace_norms(getattr(node, f.name), memo)
            for f in dataclasses.fields(node)
            if f.init
        }
        new = dataclasses.replace(node, **changes)
    elif isinstance(node, functools.partial):
        new = functools.partial(
            node.func,
            *(_replace_norms(a, memo) for a in node.args),
            **{k: _replace_norms(v, memo) for k, v in node.keywords.items()},
        )
    elif isinstance(node, list):
        new = [_replace_norms(x, memo) for x in node]
    else:
        return node
    memo[id(node)] = new
    return new


def adapt_spec_for_cpu(spec: Any) -> Any:
    """A copy of a local-spec block/layer spec whose norms are ``CPUSequenceParallelNorm`` (F6).

    Args:
        spec: a ``TransformerBlockSubmodules`` or layer ``ModuleSpec`` (not modified).

    Returns:
        The new spec; objects shared between layers stay shared.
    """
    return _replace_norms(spec, {})


class CPUAlltoAllTokenDispatcher(MoEAlltoAllTokenDispatcher):
    """F5: the all-to-all dispatcher without CUDA streams.

    The splits become numpy arrays as on GPU (gloo's ``all_to_all_single`` rejects tensors as
    split sizes; ``moe_utils.py:1184`` only converts CUDA tensors).
    """

    def _maybe_dtoh_and_synchronize(
        self, point: str, tokens_per_expert: torch.Tensor | None = None
    ):
        if not self.drop_and_pad and point == self.cuda_dtoh_point:
            as_np = lambda t: t.numpy() if torch.is_tensor(t) else t  # noqa: E731
            self.input_splits = as_np(self.input_splits)
            self.output_splits = as_np(self.output_splits)
            self.output_splits_tp = as_np(self.output_splits_tp)
        return tokens_per_expert


def adapt_model_for_cpu(model: torch.nn.Module) -> torch.nn.Module:
    """Swaps a built model's RoPE and all-to-all dispatchers for their CPU subclasses (F3, F5).

    Args:
        model: a Megatron model (or module) built with the CPU backend enabled.

    Returns:
        ``model`` (modified in place).
    """
    for module in model.modules():
        if type(module) is RotaryEmbedding:
            module.__class__ = CPURotaryEmbedding
        dispatcher = getattr(module, "token_dispatcher", None)
        if type(dispatcher) is MoEAlltoAllTokenDispatcher:
            dispatcher.__class__ = CPUAlltoAllTokenDispatcher
    return model


CPU_MODEL_ADAPTER = ModelAdapter(adapt_spec=adapt_spec_for_cpu, adapt_model=adapt_model_for_cpu)
"""What ``megatron_emo.mcore.model.build_emo_gpt_model`` injects for a CPU build (F3, F5, F6)."""
