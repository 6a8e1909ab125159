"""Forward step, loss and dataset provider for ``megatron.training.pretrain``.

Every micro-batch's forward runs inside ``routing_context`` with the micro-batch's documents, on
every pipeline stage (middle stages read the same deterministic sample stream for the document
ids). With ``--dataloader-inter-document-masking`` attention is restricted to each document:
an explicit block-causal mask on the local spec, packed THD sequences (``cu_seqlens``) with
Transformer Engine, so attention and routing agree on every boundary.

Megatron symbols: ``training.{get_args, get_timers, get_tokenizer, get_tensorboard_writer}``,
``training.utils.{get_blend_and_blend_per_split, print_rank_0}``,
``core.{mpu, parallel_state}``, ``core.utils.{get_attr_wrapped_model, get_batch_on_this_cp_rank}``,
``core.packed_seq_params.PackedSeqParams``, ``core.datasets.gpt_dataset.GPTDatasetConfig``,
``core.datasets.blended_megatron_dataset_builder.BlendedMegatronDatasetBuilder``.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import mpu
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDatasetConfig
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.utils import get_attr_wrapped_model, get_batch_on_this_cp_rank
from megatron.training import get_args, get_tensorboard_writer, get_timers, get_tokenizer
from megatron.training.utils import get_blend_and_blend_per_split, print_rank_0

from megatron_emo.mcore.routing_context import routing_context
from megatron_emo.routing import DocumentBatch
from megatron_emo.training.data import (
    EMOGPTDataset,
    EMOMockGPTDataset,
    document_attention_mask,
    documents_from_batch,
)
from megatron_emo.training.metrics import report_routing_metrics

__all__ = ["flush_routing_metrics", "forward_step", "loss_func", "train_valid_test_datasets_provider"]

_SEQ_KEYS = ("tokens", "labels", "loss_mask", "position_ids", "doc_ids")


def _next_batch_on_tp_group(data_iterator) -> dict[str, Any]:
    """TP rank 0 reads the micro-batch; the other TP ranks receive it (one object broadcast)."""
    tp_group = mpu.get_tensor_model_parallel_group()
    tp_size = dist.get_world_size(tp_group) if dist.is_initialized() else 1
    batch = next(data_iterator) if mpu.get_tensor_model_parallel_rank() == 0 else None
    if tp_size > 1:
        box = [batch]
        # Host objects over the TP group (pickled); no gradient is involved.
        dist.broadcast_object_list(box, src=mpu.get_tensor_model_parallel_src_rank(), group=tp_group)
        batch = box[0]
    return batch


def get_batch(data_iterator, *, iteration: int, collect_metrics: bool):
    """The micro-batch's model inputs and documents, on this rank's device and CP shard.

    Returns:
        ``(inputs, documents)``: ``inputs`` holds ``tokens``, ``labels``, ``loss_mask``,
        ``position_ids``, ``attention_mask`` and ``packed_seq_params`` (None where unused);
        ``documents`` is the ``DocumentBatch`` for ``routing_context``.
    """
    args = get_args()
    raw = _next_batch_on_tp_group(data_iterator)
    docs = documents_from_batch(raw, iteration=iteration)
    device = torch.device("cpu") if args.cpu else torch.device("cuda", torch.cuda.current_device())
    batch = {k: raw[k] for k in ("tokens", "labels", "loss_mask", "position_ids")}
    batch["doc_ids"] = docs.doc_ids
    batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
    keys_D = docs.doc_keys.to(device, non_blocking=True)

    attention_mask = None
    packed_seq_params = None
    use_te = args.transformer_impl == "transformer_engine"
    if args.dataloader_inter_document_masking and use_te:
        # THD: the micro-batch becomes one packed row; ids are already dense over it. The
        # boundaries come from the host copy of the ids, so no device sync is needed.
        batch = {k: v.reshape(1, -1) for k, v in batch.items()}
        doc_ids_T = docs.doc_ids.reshape(-1)
        starts = torch.nonzero(doc_ids_T[1:] != doc_ids_T[:-1]).flatten() + 1
        cu_seqlens = torch.cat(
            [starts.new_zeros(1), starts, starts.new_full((1,), doc_ids_T.numel())]
        ).to(torch.int32)
        max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
        cu_seqlens = cu_seqlens.to(device, non_blocking=True)
        packed_seq_params = PackedSeqParams(
            qkv_format="thd",
            cu_seqlens_q=cu_seqlens,
            cu_seqlens_kv=cu_seqlens,
            max_seqlen_q=max_seqlen,
            max_seqlen_kv=max_seqlen,
        )
    elif args.dataloader_inter_document_masking:
        attention_mask = document_attention_mask(batch["doc_ids"])
    elif args.cpu:
        # GPTModel without a mask asks for a CUDA causal mask; give the causal mask explicitly.
        seq = batch["tokens"].shape[1]
        attention_mask = torch.triu(torch.ones(1, 1, seq, seq, dtype=torch.bool), diagonal=1)

    if args.context_parallel_size > 1:
        cp_batch = dict(batch, attention_mask=attention_mask, cu_seqlens=None)
        cp_batch = get_batch_on_this_cp_rank(
            cp_batch, is_hybrid_cp=False, cp_group=mpu.get_context_parallel_group(),
            use_per_sequence_balancing=True,
        )
        attention_mask = cp_batch["attention_mask"]
        batch = {k: cp_batch[k] for k in _SEQ_KEYS}

    documents = DocumentBatch(batch.pop("doc_ids"), keys_D, iteration, collect_metrics)
    inputs = dict(batch, attention_mask=attention_mask, packed_seq_params=packed_seq_params)
    return inputs, documents


def loss_func(loss_mask: torch.Tensor, output_tensor: torch.Tensor):
    """Summed token loss, token count and the ``lm loss`` report (Megatron's GPT contract)."""
    losses = output_tensor.view(-1).float()
    loss_mask = loss_mask.reshape(-1).float()
    loss = torch.sum(losses * loss_mask)
    num_tokens = loss_mask.sum().clone().detach().to(torch.int)
    report = {"lm loss": torch.cat([loss.clone().detach().view(1), num_tokens.view(1)])}
    return loss, num_tokens, report


class _MetricsSchedule:
    """The step whose routing diagnostics wait to be reported, and this rank's event writer."""

    def __init__(self) -> None:
        self.pending_iteration: int | None = None
        self.stage_writer = None
        # Every model chunk that ran a forward on this rank: with virtual pipeline stages the
        # forward step sees one chunk at a time, but a report covers all of them.
        self.model_chunks: list[torch.nn.Module] = []

    def remember(self, chunk: torch.nn.Module) -> None:
        """Adds a model chunk (by identity) to the chunks this rank reports."""
        if not any(chunk is seen for seen in self.model_chunks):
            self.model_chunks.append(chunk)


_SCHEDULE = _MetricsSchedule()


def _first_of_stage() -> bool:
    """Whether this rank is the first TP x DP x CP rank of its pipeline stage."""
    return (
        mpu.get_tensor_model_parallel_rank() == 0
        and mpu.get_data_parallel_rank(with_context_parallel=True) == 0
    )


def _metrics_writer(args):
    """Megatron's writer on the last rank; on the first TP x DP x CP rank of every other
    pipeline stage a writer of its own in the same directory (TensorBoard merges the files)."""
    writer = get_tensorboard_writer()
    if writer is not None or not args.tensorboard_dir:
        return writer
    if mpu.get_pipeline_model_parallel_world_size() == 1:
        return None
    if not _first_of_stage() or mpu.is_pipeline_last_stage(ignore_virtual=True):
        return None
    if _SCHEDULE.stage_writer is None:
        from torch.utils.tensorboard import SummaryWriter

        stage = mpu.get_pipeline_model_parallel_rank()
        _SCHEDULE.stage_writer = SummaryWriter(
            log_dir=args.tensorboard_dir, filename_suffix=f".emo_pp_stage_{stage}"
        )
    return _SCHEDULE.stage_writer


def flush_routing_metrics(model) -> dict[str, float] | None:
    """Reports the diagnostics of the last collecting step, if any (all ranks call it)."""
    if _SCHEDULE.pending_iteration is None:
        return None
    args = get_args()
    chunks = model if isinstance(model, list) else [model]
    writer = _metrics_writer(args)
    means = report_routing_metrics(
        chunks, iteration=_SCHEDULE.pending_iteration, num_layers=args.num_layers, writer=writer
    )
    if means is not None and _first_of_stage():
        text = " | ".join(f"{k} {v:.4g}" for k, v in means.items())
        stage = mpu.get_pipeline_model_parallel_rank()
        where = f" stage {stage}" if mpu.get_pipeline_model_parallel_world_size() > 1 else ""
        print(f" [EMO routing{where}] iteration {_SCHEDULE.pending_iteration:8d} | {text}", flush=True)
    if writer is not None:
        writer.flush()
    _SCHEDULE.pending_iteration = None
    return means


def forward_step(data_iterator, model, return_schedule_plan: bool = False):
    """Megatron forward step: the micro-batch forward inside ``routing_context``."""
    args = get_args()
    timers = get_timers()
    iteration = args.curr_iteration
    # Megatron logs after step ``iteration + 1`` when it is a multiple of --log-interval.
    logging_step = args.emo_log_routing_metrics and model.training and (
        (iteration + 1) % args.log_interval == 0
    )
    _SCHEDULE.remember(model)
    if model.training and _SCHEDULE.pending_iteration not in (None, iteration + 1):
        # First forward after a collecting step: report the routers of every virtual chunk.
        flush_routing_metrics(_SCHEDULE.model_chunks)
    if logging_step:
        _SCHEDULE.pending_iteration = iteration + 1

    timers("batch-generator", log_level=2).start()
    inputs, documents = get_batch(data_iterator, iteration=iteration, collect_metrics=logging_step)
    timers("batch-generator").stop()

    pre_process = get_attr_wrapped_model(model, "pre_process")
    with routing_context(documents):
        output_tensor = model(
            inputs["tokens"] if pre_process else None,
            inputs["position_ids"] if pre_process else None,
            inputs["attention_mask"],
            labels=inputs["labels"],
            loss_mask=inputs["loss_mask"],
            packed_seq_params=inputs["packed_seq_params"],
        )
    return output_tensor, partial(loss_func, inputs["loss_mask"])


def _dataset_config(args) -> GPTDatasetConfig:
    tokenizer = get_tokenizer()
    blend, blend_per_split = get_blend_and_blend_per_split(args)
    return GPTDatasetConfig(
        random_seed=args.seed,
        sequence_length=args.seq_length,
        blend=blend,
        blend_per_split=blend_per_split,
        split=args.split,
        path_to_cache=args.data_cache_path,
        mmap_bin_files=args.mmap_bin_files,
        tokenizer=tokenizer,
        reset_position_ids=args.reset_position_ids,
        reset_attention_mask=args.reset_attention_mask,
        eod_mask_loss=args.eod_mask_loss,
        create_attention_mask=False,
        inter_document_masking=args.dataloader_inter_document_masking,
    )


def train_valid_test_datasets_provider(train_val_test_num_samples, vp_stage=None):
    """GPT datasets whose samples carry their documents, built on TP rank 0 of every stage.

    Every pipeline stage needs the document ids (its routers pool per document), so unlike
    ``pretrain_gpt.py`` middle stages build the (deterministic) datasets too.
    """
    args = get_args()
    config = _dataset_config(args)
    dataset_type = EMOMockGPTDataset if args.mock_data else EMOGPTDataset
    print_rank_0("> building train, validation, and test datasets for EMO ...")
    train_ds, valid_ds, test_ds = BlendedMegatronDatasetBuilder(
        dataset_type,
        train_val_test_num_samples,
        lambda: mpu.get_tensor_model_parallel_rank() == 0,
        config,
    ).build()
    return train_ds, valid_ds, test_ds


train_valid_test_datasets_provider.is_distributed = True
