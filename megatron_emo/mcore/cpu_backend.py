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
* Patch: ``torch.cuda.current_device`` -> CPU device, for ``tensor_parallel/mappings.py:95/145/
  152/185/447`` (EP > 1 collectives) and the ``TopKRouter.__init__`` buffers (``router.py:177-198``).
* Patch: ``torch.cuda.synchronize`` no-op, for
  ``dist_checkpointing/strategies/filesystem_async.py:248``.

Megatron symbols: ``parallel_state.initialize_model_parallel``, ``parallel_state.
_GLOBAL_MEMORY_BUFFER``, ``tensor_parallel.random.{CudaRNGStatesTracker, _CUDA_RNG_STATE_TRACKER,
_*_RNG_TRACKER_NAME}``, ``utils.GlobalMemoryBuffer``, ``RotaryEmbedding``,
``MoEAlltoAllTokenDispatcher``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from functools import reduce
from operator import mul

import numpy as np
import torch
from megatron.core import parallel_state
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
from megatron.core.tensor_parallel import random as mcore_random
from megatron.core.transformer.moe.token_dispatcher import MoEAlltoAllTokenDispatcher
from megatron.core.utils import GlobalMemoryBuffer

__all__ = [
    "CPUAlltoAllTokenDispatcher",
    "CPUGlobalMemoryBuffer",
    "CPURNGStatesTracker",
    "CPURotaryEmbedding",
    "adapt_model_for_cpu",
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
    mcore_random._CUDA_RNG_STATE_TRACKER = CPURNGStatesTracker()
    mcore_random._CUDA_RNG_STATE_TRACKER_INITIALIZED = True
    _ENABLED = True


def initialize_model_parallel_cpu(
    *,
    tensor_model_parallel_size: int = 1,
    pipeline_model_parallel_size: int = 1,
    expert_model_parallel_size: int = 1,
    context_parallel_size: int = 1,
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
    import sys

    def is_available() -> bool:
        caller = sys._getframe(1)
        if caller.f_code.co_name == "initialize_megatron" and caller.f_code.co_filename.endswith(
            "megatron/training/initialize.py"
        ):
            return True
        return real_is_available()

    return is_available


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

    Not patchable: gradient clipping (``clip_grads.py:174`` checks the CUDA tensor type), the
    distributed optimizer (``distrib_optimizer.py:477``) and the bf16/fp16 mixed-precision
    optimizer; ``megatron_emo.training.arguments`` refuses them with ``--cpu``.
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
    _TRAINING_SHIM = _CudaToCPUMode()
    _TRAINING_SHIM.__enter__()
