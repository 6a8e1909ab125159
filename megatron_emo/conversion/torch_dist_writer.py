"""Streaming writer of Megatron ``torch_dist`` checkpoints, one tensor chunk at a time.

A torch_dist checkpoint is a PyTorch distributed-checkpoint (DCP) directory plus Megatron's
``metadata.json``; Megatron keeps the common state (``args`` ...) as the byte object
``common_state`` and every ``ShardedObject`` (e.g. ``_extra_state``) as a byte object named by its
``unique_key`` (``megatron/core/dist_checkpointing/serialization.py:446-452`` and
``strategies/torch.py:316-322``). Megatron's own saver stages the whole state dict before writing
(``filesystem_async.py`` ``prepare_write_data``), so it needs a built model in memory. Here the
write plan is made from a table of chunks (key, global shape, offset, size, dtype, loader) and
DCP's ``FileSystemWriter`` asks the planner for each chunk's tensor only when it writes it
(``_SerialCpuLoader``, selected by ``per_thread_copy_ahead=0``,
``torch/distributed/checkpoint/filesystem.py:397-412``): memory holds one chunk at a time.

``dcp.save(..., no_dist=True)`` needs no process group, no model-parallel state and no CUDA, so
the same code runs on machines with and without GPUs.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint import save as dcp_save
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata,
    MetadataIndex,
    TensorProperties,
)
from torch.distributed.checkpoint.planner import SavePlan, TensorWriteData, WriteItem, WriteItemType

__all__ = ["TensorChunk", "extra_state_key", "write_torch_dist"]


@dataclass(frozen=True)
class TensorChunk:
    """One stored chunk of a global torch_dist tensor and how to produce its data.

    ``load()`` returns the chunk's values in any shape with ``size``'s trailing dims (the leading
    layer / expert axes of size 1 are added here); they are cast to ``dtype``.
    """

    key: str
    global_shape: tuple[int, ...]
    offset: tuple[int, ...]
    size: tuple[int, ...]
    dtype: torch.dtype
    load: Callable[[], torch.Tensor]

    @property
    def nbytes(self) -> int:
        """Bytes of the chunk's data in ``dtype``."""
        n = 1
        for d in self.size:
            n *= d
        return n * torch.empty((), dtype=self.dtype).element_size()


def extra_state_key(key: str, global_shape: tuple[int, ...], offset: tuple[int, ...]) -> str:
    """Storage name of a ``ShardedObject`` (Megatron ``ShardedObject.unique_key``)."""
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    return ShardedObject(key, None, global_shape, offset, replica_id=0).unique_key


def _serialized(obj) -> bytes:
    buf = io.BytesIO()
    torch.save([obj], buf)  # a list: one entry per local shard (strategies/torch.py:319-321)
    return buf.getvalue()


class _StreamingSavePlanner(DefaultSavePlanner):
    """Save planner whose write items come from a chunk table and resolve lazily."""

    def __init__(self, chunks: Sequence[TensorChunk], objects: dict[str, bytes],
                 on_write: Callable[[TensorChunk], None] | None):
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)
        self._chunks = {(c.key, tuple(c.offset)): c for c in chunks}
        if len(self._chunks) != len(chunks):
            raise ValueError("duplicate (key, offset) in the torch_dist chunk table")
        self._objects = objects
        self._on_write = on_write
        self._previous: torch.Tensor | None = None

    def set_up_planner(self, state_dict, storage_meta=None, is_coordinator: bool = False) -> None:
        self.state_dict = {}
        self.is_coordinator = is_coordinator

    def create_local_plan(self) -> SavePlan:
        items = [WriteItem(index=MetadataIndex(fqn), type=WriteItemType.BYTE_IO)
                 for fqn in self._objects]
        for c in self._chunks.values():
            items.append(WriteItem(
                index=MetadataIndex(c.key, torch.Size(c.offset)),
                type=WriteItemType.SHARD,
                tensor_data=TensorWriteData(
                    chunk=ChunkStorageMetadata(offsets=torch.Size(c.offset),
                                               sizes=torch.Size(c.size)),
                    properties=TensorProperties(dtype=c.dtype),
                    size=torch.Size(c.global_shape))))
        self.plan = SavePlan(items)
        return self.plan

    def resolve_data(self, write_item: WriteItem):
        if write_item.type == WriteItemType.BYTE_IO:
            return io.BytesIO(self._objects[write_item.index.fqn])
        c = self._chunks[(write_item.index.fqn, tuple(write_item.index.offset))]
        t = c.load()
        lead = len(c.size) - t.dim()
        if lead < 0 or tuple(t.shape) != tuple(c.size[lead:]) or any(c.size[:lead][i] != 1
                                                                     for i in range(lead)):
            raise ValueError(f"{c.key} at offset {c.offset}: got a tensor of shape "
                             f"{tuple(t.shape)}, the chunk is {c.size}")
        t = t.to(c.dtype).reshape(c.size)
        storage = t.untyped_storage()
        if storage.nbytes() != t.nbytes or not storage.resizable():
            t = t.clone()  # own storage, so the loader hands this very tensor to torch.save
        # NOTE: the writer keeps every written tensor in a dict keyed by tensor name until the
        # file is closed (filesystem.py:449, only read for the safetensors format), so one chunk
        # per key (the embedding and the output layer whole) would stay in memory. The previous
        # chunk is on disk once the next one is asked for: free its storage.
        self.release()
        self._previous = t
        if self._on_write is not None:
            self._on_write(c)
        return t

    def release(self) -> None:
        """Frees the storage of the last chunk handed out (already written)."""
        if self._previous is not None:
            self._previous.untyped_storage().resize_(0)
            self._previous = None


def write_torch_dist(ckpt_dir: str, chunks: Sequence[TensorChunk], *, common_state: dict,
                     sharded_objects: dict[str, object] | None = None,
                     on_write: Callable[[TensorChunk], None] | None = None) -> None:
    """Writes a torch_dist checkpoint directory (what ``dist_checkpointing.save`` writes).

    Args:
        ckpt_dir: the ``release`` / ``iter_XXXXXXX`` directory (created).
        chunks: every chunk of every tensor; DCP checks that the chunks of a key cover its global
            shape exactly once (``_validate_global_plan``).
        common_state: the non-sharded state (``args``, ``checkpoint_version``, ``iteration``...).
        sharded_objects: ``ShardedObject`` storage names (``extra_state_key``) -> data.
        on_write: called after each chunk's tensor is produced, in writing order.
    """
    from megatron.core.dist_checkpointing.core import CheckpointingConfig, save_config

    os.makedirs(ckpt_dir, exist_ok=True)
    objects = {k: _serialized(v) for k, v in (sharded_objects or {}).items()}
    objects[extra_state_key("common_state", (1,), (0,))] = _serialized(common_state)
    writer = FileSystemWriter(ckpt_dir, single_file_per_rank=True, sync_files=True,
                              thread_count=1, per_thread_copy_ahead=0)
    planner = _StreamingSavePlanner(chunks, objects, on_write)
    try:
        dcp_save({}, storage_writer=writer, planner=planner, no_dist=True)
        planner.release()
    except CheckpointException as err:
        # DCP wraps whatever a chunk's loader raised (a refusal naming a tensor, an I/O error,
        # KeyboardInterrupt); the caller gets the original.
        failures = list(err.failures.values())
        if len(failures) == 1 and isinstance(failures[0][0], BaseException):
            raise failures[0][0] from None
        raise
    # Megatron writes metadata.json last: it marks a complete checkpoint (serialization.py:454).
    save_config(CheckpointingConfig("torch_dist", 1), ckpt_dir)
