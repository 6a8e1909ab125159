"""Forward step, loss and dataset provider for ``megatron.training.pretrain``.

Every micro-batch's forward runs inside ``routing_context`` with the micro-batch's documents
(and, on logging steps, the metrics tracker of ``EMOTrainingStep``), on every pipeline stage
(middle stages read the same deterministic sample stream for the document ids). With
``--dataloader-inter-document-masking`` attention is restricted to each document: an explicit
block-causal mask on the local spec, packed THD sequences (``cu_seqlens``) with Transformer
Engine, so attention and routing agree on every boundary. Which TP rank reads the batch and
how CP shards it is the rank's ``BatchLayout`` (``megatron_emo.parallel``).

Megatron symbols: ``training.{get_args, get_timers, get_tokenizer, get_tensorboard_writer}``,
``training.utils.{get_blend_and_blend_per_split, print_rank_0}``,
``core.{mpu, parallel_state}``, ``core.utils.{get_attr_wrapped_model, get_batch_on_this_cp_rank}``,
``core.packed_seq_params.PackedSeqParams``, ``core.datasets.gpt_dataset.GPTDatasetConfig``,
``core.datasets.blended_megatron_dataset_builder.BlendedMegatronDatasetBuilder``.
"""

from __future__ import annotations

import dataclasses
from functools import partial

import torch
import torch.distributed as dist
from megatron.core import mpu
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDatasetConfig
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.utils import get_attr_wrapped_model, get_batch_on_this_cp_rank
from megatron.training import get_args, get_tensorboard_writer, get_timers, get_tokenizer
from megatron.training.utils import get_blend_and_blend_per_split, print_rank_0

from megatron_emo.mcore.routing_context import RoutingMetricsTracker, routing_context
from megatron_emo.parallel import BatchLayout
from megatron_emo.training.dataset import (
    EMOGPTDataset,
    EMOMockGPTDataset,
    document_attention_mask,
    documents_from_batch,
)
from megatron_emo.training.metrics import report_routing_metrics

__all__ = [
    "EMOTrainingStep",
    "batch_layout",
    "get_batch",
    "loss_func",
    "train_valid_test_datasets_provider",
]

_INPUT_KEYS = ("tokens", "labels", "loss_mask", "position_ids")


def batch_layout(args) -> BatchLayout:
    """This rank's ``BatchLayout`` from Megatron's model-parallel state (TP reader, CP shard)."""
    cp_shard_fn = None
    if args.context_parallel_size > 1:
        cp_shard_fn = partial(
            get_batch_on_this_cp_rank,
            is_hybrid_cp=False,
            cp_group=mpu.get_context_parallel_group(),
            use_per_sequence_balancing=True,
        )
    return BatchLayout(
        tp_group=mpu.get_tensor_model_parallel_group() if dist.is_initialized() else None,
        tp_src_rank=mpu.get_tensor_model_parallel_src_rank(),
        tp_rank=mpu.get_tensor_model_parallel_rank(),
        cp_size=args.context_parallel_size,
        cp_shard_fn=cp_shard_fn,
    )


def get_batch(data_iterator, *, iteration: int, layout: BatchLayout):
    """The micro-batch's model inputs and documents, on this rank's device and CP shard.

    Returns:
        ``(inputs, documents)``: ``inputs`` holds ``tokens``, ``labels``, ``loss_mask``,
        ``position_ids``, ``attention_mask`` and ``packed_seq_params`` (None where unused);
        ``documents`` is the ``DocumentBatch`` for ``routing_context``.
    """
    args = get_args()
    raw = layout.read(data_iterator)
    host_documents = documents_from_batch(raw, iteration=iteration)
    device = torch.device("cpu") if args.cpu else torch.device("cuda", torch.cuda.current_device())
    batch = {k: raw[k].to(device, non_blocking=True) for k in _INPUT_KEYS}
    documents = host_documents.to(device)

    attention_mask = None
    packed_seq_params = None
    use_te = args.transformer_impl == "transformer_engine"
    if args.dataloader_inter_document_masking and use_te:
        # THD: the micro-batch becomes one packed row; ids are already dense over it. The
        # boundaries come from the host copy of the ids, so no device sync is needed.
        batch = {k: v.reshape(1, -1) for k, v in batch.items()}
        documents = dataclasses.replace(documents, doc_ids=documents.doc_ids.reshape(1, -1))
        doc_ids_T = host_documents.doc_ids.reshape(-1)
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
        attention_mask = document_attention_mask(documents.doc_ids)
    elif args.cpu:
        # GPTModel without a mask asks for a CUDA causal mask; give the causal mask explicitly.
        seq = batch["tokens"].shape[1]
        attention_mask = torch.triu(torch.ones(1, 1, seq, seq, dtype=torch.bool), diagonal=1)

    if layout.cp_size > 1:
        # The document ids are sharded with the tokens, so routing and attention agree.
        shard = layout.shard(
            dict(batch, doc_ids=documents.doc_ids, attention_mask=attention_mask, cu_seqlens=None)
        )
        attention_mask = shard["attention_mask"]
        batch = {k: shard[k] for k in _INPUT_KEYS}
        documents = dataclasses.replace(documents, doc_ids=shard["doc_ids"])

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


def _first_of_stage() -> bool:
    """Whether this rank is the first TP x DP x CP rank of its pipeline stage."""
    return (
        mpu.get_tensor_model_parallel_rank() == 0
        and mpu.get_data_parallel_rank(with_context_parallel=True) == 0
    )


class EMOTrainingStep:
    """``pretrain()``'s forward step, with the state it keeps between micro-batches.

    Holds the routing-metrics tracker the routers record into on logging steps, the step whose
    diagnostics wait to be reported, this rank's batch layout and, on pipeline stages other
    than the last, the stage's own event writer. Pass ``step.forward_step`` to ``pretrain()``
    and call ``step.flush_routing_metrics()`` after it.
    """

    def __init__(self) -> None:
        self.metrics = RoutingMetricsTracker()
        self.pending_iteration: int | None = None
        self._stage_writer = None
        self._layout: BatchLayout | None = None

    def _metrics_writer(self, args):
        """This rank's TensorBoard writer for the routing diagnostics, or None.

        Megatron's writer on the last rank; on the first TP x DP x CP rank of every other
        pipeline stage a writer of its own in the same directory (TensorBoard merges the files).
        """
        writer = get_tensorboard_writer()
        if writer is not None or not args.tensorboard_dir:
            return writer
        if mpu.get_pipeline_model_parallel_world_size() == 1:
            return None
        if not _first_of_stage() or mpu.is_pipeline_last_stage(ignore_virtual=True):
            return None
        if self._stage_writer is None:
            from torch.utils.tensorboard import SummaryWriter

            stage = mpu.get_pipeline_model_parallel_rank()
            self._stage_writer = SummaryWriter(
                log_dir=args.tensorboard_dir, filename_suffix=f".emo_pp_stage_{stage}"
            )
        return self._stage_writer

    def flush_routing_metrics(self) -> dict[str, float] | None:
        """Reports the diagnostics of the last collecting step, if any (all ranks call it)."""
        if self.pending_iteration is None:
            return None
        args = get_args()
        writer = self._metrics_writer(args)
        means = report_routing_metrics(
            self.metrics, iteration=self.pending_iteration, num_layers=args.num_layers,
            writer=writer,
        )
        if means is not None and _first_of_stage():
            text = " | ".join(f"{k} {v:.4g}" for k, v in means.items())
            stage = mpu.get_pipeline_model_parallel_rank()
            where = f" stage {stage}" if mpu.get_pipeline_model_parallel_world_size() > 1 else ""
            print(
                f" [EMO routing{where}] iteration {self.pending_iteration:8d} | {text}",
                flush=True,
            )
        if writer is not None:
            writer.flush()
        self.pending_iteration = None
        return means

    def forward_step(self, data_iterator, model, return_schedule_plan: bool = False):
        """Megatron forward step: the micro-batch forward inside ``routing_context``."""
        args = get_args()
        timers = get_timers()
        iteration = args.curr_iteration
        # Megatron logs after step ``iteration + 1`` when it is a multiple of --log-interval.
        logging_step = args.emo_log_routing_metrics and model.training and (
            (iteration + 1) % args.log_interval == 0
        )
        if model.training and self.pending_iteration not in (None, iteration + 1):
            # First forward after a collecting step: report what every model chunk recorded.
            self.flush_routing_metrics()
        if logging_step:
            self.pending_iteration = iteration + 1
        if self._layout is None:
            self._layout = batch_layout(args)

        timers("batch-generator", log_level=2).start()
        inputs, documents = get_batch(data_iterator, iteration=iteration, layout=self._layout)
        timers("batch-generator").stop()

        pre_process = get_attr_wrapped_model(model, "pre_process")
        metrics = self.metrics if logging_step else None
        with routing_context(documents, metrics=metrics):
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
