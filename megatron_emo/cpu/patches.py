"""The CPU backend's process-level patches: one table, for what megatron leaves no seam for.

Group ``"backend"``: what real Megatron-Core modules need on the host (tests, ``--cpu``).
Group ``"training"``: what ``megatron.training.pretrain()`` adds (the "full shim" of
``../shared/docs/cpu_megatron.md`` section 4, plus F8-F11 for the distributed optimizer and a
skipped JIT warm-up), together with ``TRAINING_CONTEXTS``. Every row names the megatron-core
0.19.2 site it covers. Applied and undone by ``megatron_emo.cpu.enable``/``disable``.

Not patchable: gradient clipping (``clip_grads.py:174`` checks the CUDA tensor type) and the
bf16/fp16 mixed-precision optimizer; ``megatron_emo.training.arguments`` refuses them with
``--cpu``.

Megatron symbols: ``tensor_parallel.mappings.{_gather_along_first_dim,
_reduce_scatter_along_first_dim}``, ``tensor_parallel.random.{_CUDA_RNG_STATE_TRACKER,
_CUDA_RNG_STATE_TRACKER_INITIALIZED, _get_cuda_rng_state, _set_cuda_rng_state}``,
``transformer.moe.token_dispatcher.MoEAlltoAllTokenDispatcher.cuda_dtoh_stream``,
``optimizer.distrib_optimizer.{DistributedOptimizer, HAVE_APEX_OR_TE}``,
``training.arguments.get_device_arch_version``, ``training.initialize._warmup_jit_function``.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator

import torch

from megatron_emo.cpu.modules import CPURNGStatesTracker
from megatron_emo.patching import Patch

__all__ = ["PATCHES", "TRAINING_CONTEXTS"]


# --------------------------------------------------------------------------------------------
# Backend: real Megatron-Core modules on the host.
# --------------------------------------------------------------------------------------------


class _NoStream:
    """Stands in for the CUDA stream Megatron's all-to-all dispatcher creates at construction."""


def _padded_rows(tensor: torch.Tensor, rows: int) -> torch.Tensor:
    out = tensor.new_zeros((rows, *tensor.shape[1:]))
    out[: tensor.shape[0]] = tensor
    return out


def _uneven_gather_on_gloo(original):
    """F7: gathers uneven first dimensions on gloo by padding them to the largest split.

    ``tensor_parallel/mappings.py:152-154`` all-gathers uneven first dimensions (the
    all-to-all dispatcher's expert-TP gather, ``token_dispatcher.py:738-743``) with
    ``torch.distributed.all_gather`` on a list of unequal tensors, which gloo refuses
    ("invalid tensor size"). Pads every rank's rows to the largest split, gathers equal
    chunks, and drops the padding: the same result.
    """

    def gather(input_, group, output_split_sizes=None, use_global_buffer=False):
        if output_split_sizes is None or group.size() == 1:
            return original(input_, group, output_split_sizes, use_global_buffer)
        sizes = [int(n) for n in output_split_sizes]
        rows = max(sizes)
        gathered = original(_padded_rows(input_, rows), group)  # (size * rows, ...)
        chunks = gathered.split(rows, dim=0)
        return torch.cat([chunk[:n] for chunk, n in zip(chunks, sizes, strict=True)], dim=0)

    return gather


def _uneven_reduce_scatter_on_gloo(original):
    """F7: reduce-scatters uneven splits on gloo by padding them to the largest split.

    ``tensor_parallel/mappings.py:188-196`` reduce-scatters uneven splits (the
    dispatcher's combine, ``token_dispatcher.py:819-825``) with the list form of
    ``torch.distributed.reduce_scatter``, which gloo lacks. Pads every split to the largest,
    reduce-scatters equal chunks, and drops the padding: the same result.
    """

    def reduce_scatter(input_, group, input_split_sizes=None, use_global_buffer=False):
        if input_split_sizes is None or group.size() == 1:
            return original(input_, group, input_split_sizes, use_global_buffer)
        sizes = [int(n) for n in input_split_sizes]
        rows = max(sizes)
        padded = torch.cat([_padded_rows(t, rows) for t in input_.split(sizes, dim=0)], dim=0)
        return original(padded, group)[: sizes[group.rank()]]

    return reduce_scatter


# --------------------------------------------------------------------------------------------
# Training: what ``megatron.training.pretrain()`` additionally needs on the host (--cpu runs).
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

    def record_event(self, *args, **kwargs) -> _NoOpStream:
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
    """F9: materialises torch Adam's initial state before the optimizer's state is read.

    ``optimizer/distrib_optimizer.py:837-839``: without apex or Transformer Engine (always
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
    """F11: gives every parameter's loaded Adam state its own ``step`` tensor.

    ``optimizer/distrib_optimizer.py:1025-1031``: without apex or TE the loaded Adam
    ``step`` is ONE tensor assigned to every parameter's state, and torch Adam increments each
    state's step in place, so after the first resumed step every parameter's step has grown by
    the number of parameters (bias correction then differs from the uninterrupted run). Gives
    every state its own copy, as the ``HybridDeviceOptimizer`` branch (``:1040``) does.
    """

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
    """F10: skips the Adam ``step`` that the fully reshardable loader leaves out.

    ``optimizer/distrib_optimizer.py:1216-1222`` copies every tensor of a parameter's
    torch-optimizer state from the loaded ``tensors``, but the fully reshardable loader leaves
    torch Adam's ``step`` out of them (``:2388``; the step is restored from the parameter
    groups at ``:1025-1031``), so a load without apex or TE raises ``KeyError: 'step'``. States
    missing from ``tensors`` are skipped, as the original skips non-tensor entries.
    """

    def set_states(self, model_param, tensors):
        return original(self, model_param, _MissingIsNone(tensors))

    return set_states


@contextlib.contextmanager
def _cuda_device_max_connections() -> Iterator[None]:
    """Sets ``CUDA_DEVICE_MAX_CONNECTIONS=1`` unless it is set, for Megatron's argument check.

    ``training/arguments.py:1437`` requires ``CUDA_DEVICE_MAX_CONNECTIONS=1`` for TP/CP > 1,
    a CUDA stream setting that has no meaning on the host: set it unless it is set.
    """
    added = "CUDA_DEVICE_MAX_CONNECTIONS" not in os.environ
    os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")
    try:
        yield
    finally:
        if added:
            os.environ.pop("CUDA_DEVICE_MAX_CONNECTIONS", None)


_CPU = torch.device("cpu")
_DISPATCHER = "megatron.core.transformer.moe.token_dispatcher.MoEAlltoAllTokenDispatcher"
_MAPPINGS = "megatron.core.tensor_parallel.mappings"
_RANDOM = "megatron.core.tensor_parallel.random"
_DIST_OPT = "megatron.core.optimizer.distrib_optimizer.DistributedOptimizer"


def _backend(target, name, replacement, site, wraps=False) -> Patch:
    return Patch(target, name, replacement, site, wraps=wraps, group="backend")


def _training(target, name, replacement, site, wraps=False) -> Patch:
    return Patch(target, name, replacement, site, wraps=wraps, group="training")


def _zero(*args, **kwargs) -> int:
    return 0


PATCHES: tuple[Patch, ...] = (
    # ---- backend ----
    _backend(torch.cuda, "current_device", lambda: _CPU,
             "mappings.py:95/145/152/185/447, router.py:177-198"),
    _backend(torch.cuda, "synchronize", lambda *args, **kwargs: None,
             "filesystem_async.py:248"),
    # token_dispatcher.py:468-469 creates this stream only while the class attribute is None.
    _backend(_DISPATCHER, "cuda_dtoh_stream", _NoStream(), "token_dispatcher.py:468-469"),
    _backend(_MAPPINGS, "_gather_along_first_dim", _uneven_gather_on_gloo,
             "mappings.py:152-154", wraps=True),
    _backend(_MAPPINGS, "_reduce_scatter_along_first_dim", _uneven_reduce_scatter_on_gloo,
             "mappings.py:188-196", wraps=True),
    # F1: random.py:303 CudaRNGStatesTracker.add/fork use the CUDA RNG.
    _backend(_RANDOM, "_CUDA_RNG_STATE_TRACKER", lambda _: CPURNGStatesTracker(),
             "random.py:303", wraps=True),
    _backend(_RANDOM, "_CUDA_RNG_STATE_TRACKER_INITIALIZED", True, "random.py:303"),
    # ---- training ----
    _training(torch.cuda, "Stream", _NoOpStream, "training.py:1876-1896"),
    _training(torch.cuda, "Event", _NoOpStream, "timers.py:152/165/303"),
    _training(torch.cuda, "current_stream", lambda *a, **k: _NoOpStream(),
              "training.py:1877/1896"),
    _training(torch.cuda, "default_stream", lambda *a, **k: _NoOpStream(),
              "cuda_graphs.py:662"),
    _training(torch.cuda, "stream", lambda *a, **k: contextlib.nullcontext(),
              "training.py:1879"),
    _training(torch.cuda, "set_device", lambda *a, **k: None, "initialize.py:282"),
    _training(torch.cuda, "get_rng_state", lambda *a, **k: torch.get_rng_state(),
              "checkpointing.py:417, rerun_state_machine.py:979"),
    _training(torch.cuda, "set_rng_state", lambda state, *a, **k: torch.set_rng_state(state),
              "checkpointing.py:2665/2677, rerun_state_machine.py:992"),
    _training(torch.cuda, "get_rng_state_all", lambda: [torch.get_rng_state()],
              "none in megatron 0.19.2 (the *_all twins of get/set_rng_state)"),
    _training(torch.cuda, "set_rng_state_all", lambda states: None,
              "none in megatron 0.19.2 (the *_all twins of get/set_rng_state)"),
    _training(torch.cuda, "memory_allocated", _zero, "common_utils.py:322"),
    _training(torch.cuda, "max_memory_allocated", _zero, "common_utils.py:323"),
    _training(torch.cuda, "memory_reserved", _zero, "common_utils.py:324"),
    _training(torch.cuda, "max_memory_reserved", _zero, "common_utils.py:325"),
    _training(torch.cuda, "memory_stats", lambda *a, **k: {}, "training.py:2742"),
    _training(torch.cuda, "reset_peak_memory_stats", lambda *a, **k: None,
              "none in megatron 0.19.2 (with memory_stats)"),
    _training(torch.cuda, "empty_cache", lambda: None, "initialize.py:558, training.py:3060"),
    # Faking is_available globally breaks dynamo/inductor: only initialize.py:66 is told True.
    _training(torch.cuda, "is_available", _caller_scoped_cuda_is_available, "initialize.py:66",
              wraps=True),
    _training(_RANDOM, "_get_cuda_rng_state", lambda *a, **k: torch.get_rng_state(),
              "random.py:104"),
    _training(_RANDOM, "_set_cuda_rng_state", lambda state, *a, **k: torch.set_rng_state(state),
              "random.py:135"),
    _training(torch.nn.Module, "cuda", lambda self, device=None: self, "training.py:1818"),
    # training/arguments.py:1414 asks the GPU's architecture (common_utils.py:504) for TP/CP > 1
    # and then requires CUDA_DEVICE_MAX_CONNECTIONS=1 (:1437, see _cuda_device_max_connections):
    # report no GPU architecture.
    _training("megatron.training.arguments", "get_device_arch_version", lambda: 0,
              "arguments.py:1414"),
    # initialize.py:497-559 warms up the GPU fusion kernels on random "cuda" tensors whose sizes
    # depend on TP/SP. On a GPU those draws come from the CUDA generator; on the host they would
    # come from the CPU generator that then initialises the weights, so TP=2 would start from
    # other weights than TP=1. Nothing to warm up on the host: skip it.
    _training("megatron.training.initialize", "_warmup_jit_function", lambda *a, **k: None,
              "initialize.py:497-559"),
    _training(_DIST_OPT, "state_dict", _state_dict_with_initial_adam_state,
              "distrib_optimizer.py:837-839", wraps=True),
    _training(_DIST_OPT, "load_state_dict", _load_state_dict_with_own_adam_steps,
              "distrib_optimizer.py:1025-1031", wraps=True),
    _training(_DIST_OPT, "_set_main_param_and_optimizer_states", _set_states_without_adam_step,
              "distrib_optimizer.py:1216-1222", wraps=True),
)
"""Every process-level patch of the CPU backend, in the order it is applied."""

TRAINING_CONTEXTS = (_cuda_device_max_connections, _CudaToCPUMode)
"""Entered after the training patches (and exited before they are undone), in this order."""
