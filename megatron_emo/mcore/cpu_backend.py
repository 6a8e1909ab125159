"""CPU backend: runs real Megatron-Core MoE GPT models on a machine without CUDA (tests, demos).

The project's single CPU module (STYLE.md). Activated explicitly (``enable_cpu_backend()``), never
on GPU runs. Plugin-side subclasses first; the two process-level patches cover module functions
with no subclass seam. Every fix names the megatron-core 0.19.2 site it works around
(see ``../shared/docs/cpu_megatron.md`` F1-F5):

* F1 ``tensor_parallel/random.py:303`` ``CudaRNGStatesTracker.add``/``fork`` use the CUDA RNG:
  ``CPURNGStatesTracker`` keeps CPU generator states with Megatron's seed offsets (``:446``).
* F2 ``utils.py:715`` ``GlobalMemoryBuffer.get_tensor`` allocates on CUDA:
  ``CPUGlobalMemoryBuffer``.
* F3 ``models/common/embeddings/rotary_pos_embedding.py:160-162`` moves ``inv_freq`` to CUDA:
  ``CPURotaryEmbedding``.
* F4 ``transformer/moe/router.py:96-100`` gating moves weights to CUDA: fixed in ``EMORouter``.
* F5 ``transformer/moe/token_dispatcher.py:468-469`` creates a CUDA stream in ``__init__`` and
  ``:913-953`` syncs through CUDA streams: placeholder class attribute plus
  ``CPUAlltoAllTokenDispatcher``.
* F6 ``transformer/torch_norm.py:50`` refuses sequence parallelism (apex/TE norms need CUDA):
  ``CPUSequenceParallelNorm``, swapped into the local spec by ``adapt_spec_for_cpu``.
* F7 ``tensor_parallel/mappings.py:152-154/188-196`` all-gather / reduce-scatter uneven splits
  with list collectives gloo lacks (expert TP > 1 with the all-to-all dispatcher): padded to
  equal splits.
* Patch: ``torch.cuda.current_device`` -> CPU device, for ``tensor_parallel/mappings.py:95/145/
  152/185/447`` (EP > 1 collectives) and the ``TopKRouter.__init__`` buffers
  (``router.py:177-198``).
* Patch: ``torch.cuda.synchronize`` no-op, for
  ``dist_checkpointing/strategies/filesystem_async.py:248``.

``enable_cpu_training`` adds what ``megatron.training.pretrain()`` needs (the "full shim" of
``cpu_megatron.md`` section 4, plus F8-F11 for the distributed optimizer and a skipped JIT
warm-up); see its docstring.

Megatron symbols: ``parallel_state.initialize_model_parallel``, ``parallel_state.
_GLOBAL_MEMORY_BUFFER``, ``tensor_parallel.random.{CudaRNGStatesTracker, _CUDA_RNG_STATE_TRACKER,
_*_RNG_TRACKER_NAME}``, ``utils.GlobalMemoryBuffer``, ``RotaryEmbedding``,
``MoEAlltoAllTokenDispatcher``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import sys
from collections.abc import Iterator
from functools import reduce
from operator import mul
from typing import Any

import numpy as np
import torch
from megatron.core import parallel_state
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
from megatron.core.tensor_parallel import mappings as mcore_mappings
from megatron.core.tensor_parallel import random as mcore_random
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.torch_norm import WrappedTorchNorm
from megatron.core.transformer.moe.token_dispatcher import MoEAlltoAllTokenDispatcher
from megatron.core.utils import GlobalMemoryBuffer

__all__ = [
    "CPUAlltoAllTokenDispatcher",
    "CPUGlobalMemoryBuffer",
    "CPURNGStatesTracker",
    "CPURotaryEmbedding",
    "CPUSequenceParallelNorm",
    "adapt_model_for_cpu",
    "adapt_spec_for_cpu",
    "enable_cpu_backend",
    "enable_cpu_training",
    "initialize_model_parallel_cpu",
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
            emb = torch.stack((freqs.view(-1, 1), freqs.view(-1, 1)), dim=-1).view(freqs.shape[0], -1)
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


class _NoStream:
    """Stands in for the CUDA stream Megatron's all-to-all dispatcher creates at construction."""


class CPUAlltoAllTokenDispatcher(MoEAlltoAllTokenDispatcher):
    """F5: the all-to-all dispatcher without CUDA streams.

    The splits become numpy arrays as on GPU (gloo's ``all_to_all_single`` rejects tensors as
    split sizes; ``moe_utils.py:1184`` only converts CUDA tensors).
    """

    def _maybe_dtoh_and_synchronize(self, point: str, tokens_per_expert: torch.Tensor | None = None):
        if not self.drop_and_pad and point == self.cuda_dtoh_point:
            as_np = lambda t: t.numpy() if torch.is_tensor(t) else t  # noqa: E731
            self.input_splits = as_np(self.input_splits)
            self.output_splits = as_np(self.output_splits)
            self.output_splits_tp = as_np(self.output_splits_tp)
        return tokens_per_expert


def _padded_rows(tensor: torch.Tensor, rows: int) -> torch.Tensor:
    out = tensor.new_zeros((rows, *tensor.shape[1:]))
    out[: tensor.shape[0]] = tensor
    return out


def _uneven_gather_on_gloo(original):
    """F7: ``tensor_parallel/mappings.py:152-154`` all-gathers uneven first dimensions (the
    all-to-all dispatcher's expert-TP gather, ``token_dispatcher.py:738-743``) with
    ``torch.distributed.all_gather`` on a list of unequal tensors, which gloo refuses
    ("invalid tensor size"). Pads every rank's rows to the largest split, gathers equal
    chunks, and drops the padding: the same result."""

    def gather(input_, group, output_split_sizes=None, use_global_buffer=False):
        if output_split_sizes is None or group.size() == 1:
            return original(input_, group, output_split_sizes, use_global_buffer)
        sizes = [int(n) for n in output_split_sizes]
        rows = max(sizes)
        gathered = original(_padded_rows(input_, rows), group)  # (size * rows, ...)
        chunks = gathered.split(rows, dim=0)
        return torch.cat([chunk[:n] for chunk, n in zip(chunks, sizes)], dim=0)

    return gather


def _uneven_reduce_scatter_on_gloo(original):
    """F7: ``tensor_parallel/mappings.py:188-196`` reduce-scatters uneven splits (the
    dispatcher's combine, ``token_dispatcher.py:819-825``) with the list form of
    ``torch.distributed.reduce_scatter``, which gloo lacks. Pads every split to the largest,
    reduce-scatters equal chunks, and drops the padding: the same result."""

    def reduce_scatter(input_, group, input_split_sizes=None, use_global_buffer=False):
        if input_split_sizes is None or group.size() == 1:
            return original(input_, group, input_split_sizes, use_global_buffer)
        sizes = [int(n) for n in input_split_sizes]
        rows = max(sizes)
        padded = torch.cat([_padded_rows(t, rows) for t in input_.split(sizes, dim=0)], dim=0)
        return original(padded, group)[: sizes[group.rank()]]

    return reduce_scatter


_ENABLED = False


def enable_cpu_backend() -> None:
    """Installs the process-level pieces of the CPU backend (idempotent).

    Raises:
        RuntimeError: on a machine with CUDA, where the backend must not be used.
    """
    global _ENABLED
    if _ENABLED:
        return
    if torch.cuda.is_available():
        raise RuntimeError("the CPU backend is for machines without CUDA; this one has a GPU")
    cpu = torch.device("cpu")
    torch.cuda.current_device = lambda: cpu  # mappings.py:95/145/152/185/447, router.py:177-198
    torch.cuda.synchronize = lambda *args, **kwargs: None  # filesystem_async.py:248
    # token_dispatcher.py:468-469 creates this stream only while the class attribute is None.
    MoEAlltoAllTokenDispatcher.cuda_dtoh_stream = _NoStream()
    mcore_mappings._gather_along_first_dim = _uneven_gather_on_gloo(
        mcore_mappings._gather_along_first_dim
    )
    mcore_mappings._reduce_scatter_along_first_dim = _uneven_reduce_scatter_on_gloo(
        mcore_mappings._reduce_scatter_along_first_dim
    )
    mcore_random._CUDA_RNG_STATE_TRACKER = CPURNGStatesTracker()
    mcore_random._CUDA_RNG_STATE_TRACKER_INITIALIZED = True
    _ENABLED = True


def initialize_model_parallel_cpu(
    *,
    tensor_model_parallel_size: int = 1,
    pipeline_model_parallel_size: int = 1,
    expert_model_parallel_size: int = 1,
    context_parallel_size: int = 1,
    virtual_pipeline_model_parallel_size: int | None = None,
    expert_tensor_parallel_size: int | None = None,
    seed: int = 1234,
) -> None:
    """Megatron's model-parallel state on an initialised gloo group, plus CPU RNG and buffer.

    The bootstrap for CPU runs: the only function of the CPU backend that calls
    ``parallel_state``.

    Args:
        tensor_model_parallel_size: TP size.
        pipeline_model_parallel_size: PP size.
        expert_model_parallel_size: EP size.
        context_parallel_size: CP size.
        virtual_pipeline_model_parallel_size: virtual pipeline chunks per stage (None: none).
        expert_tensor_parallel_size: expert TP size (None: the TP size, as in Megatron).
        seed: model seed (Megatron's offsets: +2718 + tp_rank for TP, +1024 + 100 * ep_rank +
            etp_rank for experts).
    """
    enable_cpu_backend()
    parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tensor_model_parallel_size,
        pipeline_model_parallel_size=pipeline_model_parallel_size,
        expert_model_parallel_size=expert_model_parallel_size,
        context_parallel_size=context_parallel_size,
        virtual_pipeline_model_parallel_size=virtual_pipeline_model_parallel_size,
        expert_tensor_parallel_size=expert_tensor_parallel_size,
    )
    parallel_state._GLOBAL_MEMORY_BUFFER = CPUGlobalMemoryBuffer()
    tracker = mcore_random._CUDA_RNG_STATE_TRACKER
    tracker.reset()
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    ep_rank = parallel_state.get_expert_model_parallel_rank()
    etp_rank = parallel_state.get_expert_tensor_parallel_rank()
    tracker.add(mcore_random._DATA_PARALLEL_RNG_TRACKER_NAME, seed)
    tracker.add(mcore_random._MODEL_PARALLEL_RNG_TRACKER_NAME, seed + 2718 + tp_rank)
    tracker.add(mcore_random._EXPERT_PARALLEL_RNG_TRACKER_NAME, seed + 1024 + 100 * ep_rank + etp_rank)


def adapt_model_for_cpu(model: torch.nn.Module) -> torch.nn.Module:
    """Swaps a built model's RoPE and all-to-all dispatchers for their CPU subclasses (F3, F5).

    Args:
        model: a Megatron model built after ``enable_cpu_backend()``.

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


# --------------------------------------------------------------------------------------------
# Training shim: what ``megatron.training.pretrain()`` additionally needs on CPU (--cpu runs).
# --------------------------------------------------------------------------------------------


def _is_cuda_device(device) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    return isinstance(device, int) and not isinstance(device, bool)


_CUDA_TYPE_QUERY_FILES = ("megatron/core/optimizer/distrib_optimizer.py",)


class _CudaToCPUMode(torch.overrides.TorchFunctionMode):
    """Rewrites CUDA placement to the host for torch functions called by megatron.training.

    Covers ``device='cuda'``/``device=<int>`` factory arguments (``optimizer.py:1249``,
    ``training.py:2613/2884``, ``rerun_state_machine.py:268/979``, ``common_utils.py:285/308``,
    ``checkpointing.py:375/417``, ``schedules.py:749``, ``utils.py:1332``), ``Tensor.cuda()``
    and ``Tensor.to('cuda')`` (``training.py:4587``), ``pin_memory()`` and ``record_stream()``.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        name = getattr(func, "__name__", "")
        if name == "type" and len(args) == 1 and not kwargs and torch.is_tensor(args[0]):
            # F8: distrib_optimizer.py:401/466 accept only "torch.cuda.*Tensor" parameters
            # (raising at :477 otherwise); to that caller alone a host tensor reports the CUDA
            # type string of its dtype, the type it has on a GPU run.
            caller = sys._getframe(1).f_code.co_filename
            if caller.endswith(_CUDA_TYPE_QUERY_FILES):
                return func(*args).replace("torch.", "torch.cuda.", 1)
        if name == "cuda" and args and torch.is_tensor(args[0]):
            return args[0]
        if name in ("pin_memory",) and args and torch.is_tensor(args[0]):
            return args[0]
        if name == "record_stream":
            return None
        if name == "is_pinned":
            return False
        if "device" in kwargs and _is_cuda_device(kwargs["device"]):
            kwargs["device"] = "cpu"
        if name == "to" and args and torch.is_tensor(args[0]):
            args = tuple("cpu" if i > 0 and _is_cuda_device(a) else a for i, a in enumerate(args))
        return func(*args, **kwargs)


class _NoOpStream:
    """Stands in for ``torch.cuda.Stream``/``Event`` (``training.py:1876-1896``, ``timers.py``)."""

    def __init__(self, *args, **kwargs):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def wait_stream(self, *args, **kwargs) -> None:
        return None

    def wait_event(self, *args, **kwargs) -> None:
        return None

    def record_event(self, *args, **kwargs) -> "_NoOpStream":
        return self

    def record(self, *args, **kwargs) -> None:
        return None

    def synchronize(self) -> None:
        return None

    def query(self) -> bool:
        return True

    def elapsed_time(self, other) -> float:
        return 0.0


def _caller_scoped_cuda_is_available(real_is_available):
    """``torch.cuda.is_available`` that answers True only to ``initialize.py:66``'s assert."""

    def is_available() -> bool:
        caller = sys._getframe(1)
        if caller.f_code.co_name == "initialize_megatron" and caller.f_code.co_filename.endswith(
            "megatron/training/initialize.py"
        ):
            return True
        return real_is_available()

    return is_available


def _state_dict_with_initial_adam_state(original):
    """F9: ``optimizer/distrib_optimizer.py:837-839``: without apex or Transformer Engine (always
    so on CPU) the distributed optimizer reads Adam's ``step`` from the torch optimizer's
    per-parameter state and asserts that there is exactly one value. Loading a checkpoint calls
    it on a fresh optimizer (``:1532``, from ``sharded_state_dict(is_loading=True)``), whose
    state is still empty. Materialises torch Adam's initial state first (``step`` 0, zero
    moments: what ``torch.optim.Adam`` creates on its first step), which the load overwrites.
    """

    def state_dict(self):
        from megatron.core.optimizer import distrib_optimizer

        inner = self.optimizer
        if (
            not distrib_optimizer.HAVE_APEX_OR_TE
            and isinstance(inner, torch.optim.Adam | torch.optim.AdamW)
            and len(inner.state) == 0
        ):
            for group in inner.param_groups:
                for param in group["params"]:
                    state = inner.state[param]
                    state["step"] = torch.tensor(0.0)
                    state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(
                        param, memory_format=torch.preserve_format
                    )
                    if group.get("amsgrad"):
                        state["max_exp_avg_sq"] = torch.zeros_like(
                            param, memory_format=torch.preserve_format
                        )
        return original(self)

    return state_dict


def _load_state_dict_with_own_adam_steps(original):
    """F11: ``optimizer/distrib_optimizer.py:1025-1031``: without apex or TE the loaded Adam
    ``step`` is ONE tensor assigned to every parameter's state, and torch Adam increments each
    state's step in place, so after the first resumed step every parameter's step has grown by
    the number of parameters (bias correction then differs from the uninterrupted run). Gives
    every state its own copy, as the ``HybridDeviceOptimizer`` branch (``:1040``) does."""

    def load_state_dict(self, state_dict):
        from megatron.core.optimizer import distrib_optimizer

        original(self, state_dict)
        if not distrib_optimizer.HAVE_APEX_OR_TE:
            for state in self.optimizer.state.values():
                if torch.is_tensor(state.get("step")):
                    state["step"] = state["step"].detach().clone()

    return load_state_dict


class _MissingIsNone(dict):
    def __missing__(self, key):
        return None


def _set_states_without_adam_step(original):
    """F10: ``optimizer/distrib_optimizer.py:1216-1222`` copies every tensor of a parameter's
    torch-optimizer state from the loaded ``tensors``, but the fully reshardable loader leaves
    torch Adam's ``step`` out of them (``:2388``; the step is restored from the parameter
    groups at ``:1025-1031``), so a load without apex or TE raises ``KeyError: 'step'``. States
    missing from ``tensors`` are skipped, as the original skips non-tensor entries."""

    def set_states(self, model_param, tensors):
        return original(self, model_param, _MissingIsNone(tensors))

    return set_states


_TRAINING_SHIM: _CudaToCPUMode | None = None


def enable_cpu_training() -> None:
    """Installs the CPU backend plus the shim ``megatron.training.pretrain()`` needs (idempotent).

    On top of ``enable_cpu_backend()`` (``cpu_megatron.md`` section 4, about 45 CUDA sites in
    megatron.training, none with a subclass seam):

    * ``torch.cuda.{Stream, Event, current_stream, stream, set_device, get_rng_state,
      set_rng_state, memory_*}`` become host no-ops/equivalents (``training.py:1876-1896`` DDP
      init stream, ``timers.py:152/165/303``, ``checkpointing.py:375/417/2665`` RNG states).
    * ``tensor_parallel/random.py:104/135`` ``_get/_set_cuda_rng_state`` use the CPU generator.
    * ``torch.nn.Module.cuda`` returns the module (``training.py:1818``).
    * A ``TorchFunctionMode`` maps CUDA placement to the host (see ``_CudaToCPUMode``).
    * ``torch.cuda.is_available`` answers True only to ``initialize.py:66`` (faking it globally
      breaks dynamo/inductor).
    * ``training/arguments.py:1414`` asks the GPU architecture for TP/CP > 1: none (0), and
      ``CUDA_DEVICE_MAX_CONNECTIONS=1`` (``:1437``) is set, meaningless on the host.
    * ``initialize.py:497`` JIT warm-up is skipped: on the host it would draw TP/SP-dependent
      amounts from the generator that then initialises the weights.
    * The distributed optimizer: F8 (``distrib_optimizer.py:477`` CUDA type check, see
      ``_CudaToCPUMode``), F9-F11 (torch Adam without apex/TE: state of a fresh optimizer
      before a load, ``KeyError: 'step'``, one ``step`` tensor shared by every parameter).

    Not patchable: gradient clipping (``clip_grads.py:174`` checks the CUDA tensor type) and the
    bf16/fp16 mixed-precision optimizer; ``megatron_emo.training.arguments`` refuses them with
    ``--cpu``.
    """
    global _TRAINING_SHIM
    enable_cpu_backend()
    if _TRAINING_SHIM is not None:
        return
    cuda = torch.cuda
    cuda.Stream = _NoOpStream
    cuda.Event = _NoOpStream
    cuda.current_stream = lambda *a, **k: _NoOpStream()
    cuda.default_stream = lambda *a, **k: _NoOpStream()
    cuda.stream = lambda *a, **k: contextlib.nullcontext()
    cuda.set_device = lambda *a, **k: None
    cuda.get_rng_state = lambda *a, **k: torch.get_rng_state()
    cuda.set_rng_state = lambda state, *a, **k: torch.set_rng_state(state)
    cuda.get_rng_state_all = lambda: [torch.get_rng_state()]
    cuda.set_rng_state_all = lambda states: None
    for name in ("memory_allocated", "max_memory_allocated", "memory_reserved", "max_memory_reserved"):
        setattr(cuda, name, lambda *a, **k: 0)
    cuda.memory_stats = lambda *a, **k: {}
    cuda.reset_peak_memory_stats = lambda *a, **k: None
    cuda.empty_cache = lambda: None
    cuda.is_available = _caller_scoped_cuda_is_available(cuda.is_available)
    mcore_random._get_cuda_rng_state = lambda *a, **k: torch.get_rng_state()
    mcore_random._set_cuda_rng_state = lambda state, *a, **k: torch.set_rng_state(state)
    torch.nn.Module.cuda = lambda self, device=None: self
    # training/arguments.py:1414 asks the GPU's architecture (common_utils.py:504) for TP/CP > 1
    # and then requires CUDA_DEVICE_MAX_CONNECTIONS=1 (:1437), a CUDA stream setting that has no
    # meaning on the host: report no GPU architecture and satisfy the check.
    from megatron.training import arguments as training_arguments
    from megatron.training import initialize as training_initialize

    training_arguments.get_device_arch_version = lambda: 0
    # initialize.py:497-559 warms up the GPU fusion kernels on random "cuda" tensors whose sizes
    # depend on TP/SP. On a GPU those draws come from the CUDA generator; on the host they would
    # come from the CPU generator that then initialises the weights, so TP=2 would start from
    # other weights than TP=1. Nothing to warm up on the host: skip it.
    training_initialize._warmup_jit_function = lambda *a, **k: None
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    DistributedOptimizer.state_dict = _state_dict_with_initial_adam_state(
        DistributedOptimizer.state_dict
    )
    DistributedOptimizer.load_state_dict = _load_state_dict_with_own_adam_steps(
        DistributedOptimizer.load_state_dict
    )
    DistributedOptimizer._set_main_param_and_optimizer_states = _set_states_without_adam_step(
        DistributedOptimizer._set_main_param_and_optimizer_states
    )
    os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")
    _TRAINING_SHIM = _CudaToCPUMode()
    _TRAINING_SHIM.__enter__()
