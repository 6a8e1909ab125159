"""Fine-tuning an expert subset briefly on a task (the reference's 1-epoch fine-tune, emo_spec 5.3).

Two routes over the same subset (``tools/select_experts.py`` output):

* Megatron (``examples/05_finetune_subset.sh``): ``subset_model_flags`` gives the Megatron model
  flags of the pruned model (read from its HF ``config.json``), ``write_task_texts`` the task's
  training documents as JSONL for ``tools/preprocess_data.py``; then ``python -m
  megatron_emo.train --finetune --load SUBSET/megatron ...`` and ``to-hf``.
* Hugging Face (``finetune_hf``): ``transformers.Trainer`` on the pruned HF export, whose loss
  (token cross-entropy plus the router balancing term, ``modeling_emo.py``) honours
  ``num_items_in_batch`` and masks padding.

The subset routes like the HF model (no document pools: the kept experts are the task's fixed
pool), so the Megatron route trains with ``--emo-routing standard``.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence

import torch

from megatron_emo.subsets.scoring import padded_batches

__all__ = ["finetune_hf", "subset_model_flags", "write_task_texts"]


def subset_model_flags(hf_dir: str, shared_layout: str = "auto", ep: int = 1) -> list[str]:
    """Megatron model / MoE / EMO flags that build the (pruned) EMO HF model in ``hf_dir``.

    The shape comes from ``config.json`` through the converter's own mapping
    (``conversion.checkpoint_io.megatron_args``); the MoE flags are ``from-hf``'s own
    (``conversion.from_hf.training_flags``) for the layout and padding it picks with the same
    ``shared_layout`` and ``ep`` (``select_experts`` exports ``DIR/megatron`` with its
    ``--shared-layout``, default ``auto``), so the flags match the checkpoint.

    Args:
        hf_dir: the pruned HF export (``DIR/hf`` of ``select_experts``).
        shared_layout: ``auto``, ``mlp`` or ``router``, as given to ``select_experts``.
        ep: expert-parallel size of the Megatron export (padding experts make it divide).

    Raises:
        ValueError: per-layer expert counts differ (Megatron needs one count), or a bad layout.
    """
    from megatron_emo.conversion.checkpoint_io import megatron_args
    from megatron_emo.conversion.from_hf import resolve_shared_layout, training_flags
    from megatron_emo.conversion.hf_config import shape_from_hf_config
    from megatron_emo.conversion.key_map import padding_for_ep
    from megatron_emo.subsets.sources import read_emo_config

    cfg = read_emo_config(hf_dir)
    if cfg.get("num_experts_per_layer") and len(set(cfg["num_experts_per_layer"])) > 1:
        raise ValueError(f"{hf_dir} keeps {cfg['num_experts_per_layer']} experts per layer; a "
                         f"Megatron model needs the same count in every layer")
    shape = shape_from_hf_config(cfg)
    layout = resolve_shared_layout(shape, shared_layout)
    num_padding = padding_for_ep(shape, layout, ep)
    a = megatron_args(shape, layout, num_padding=num_padding)
    flags = [
        "--num-layers", a.num_layers, "--hidden-size", a.hidden_size,
        "--num-attention-heads", a.num_attention_heads, "--kv-channels", a.kv_channels,
        "--ffn-hidden-size", a.ffn_hidden_size,
        "--seq-length", a.seq_length, "--max-position-embeddings", a.max_position_embeddings,
        "--normalization", "RMSNorm", "--norm-epsilon", a.norm_epsilon, "--swiglu",
        "--position-embedding-type", "rope", "--rotary-base", int(a.rotary_base)
        if float(a.rotary_base).is_integer() else a.rotary_base,
        "--untie-embeddings-and-output-weights", "--disable-bias-linear",
        *training_flags(shape, layout, num_padding),
    ]
    if a.group_query_attention:
        flags += ["--group-query-attention", "--num-query-groups", a.num_query_groups]
    return [str(f) for f in flags]


def write_task_texts(task: str, output_path: str, *, split: str = "train",
                     num_fewshot: int = 0, num_examples: int | None = None, seed: int = 0,
                     include_path: str | None = None, task_dir: str | None = None) -> int:
    """Writes an lm-eval task's documents (prompt + gold answer) as ``{"text": ...}`` JSONL.

    Returns:
        The number of records written.
    """
    from megatron_emo.evaluation.harness import task_calibration_texts

    texts = task_calibration_texts(task, split=split, num_fewshot=num_fewshot,
                                   num_examples=num_examples, seed=seed,
                                   include_path=include_path, task_dir=task_dir)
    os.makedirs(os.path.dirname(os.path.abspath(output_path)), exist_ok=True)
    with open(output_path, "w", encoding="utf-8") as f:
        for text in texts:
            f.write(json.dumps({"text": text}) + "\n")
    return len(texts)


class _TokenDataset(torch.utils.data.Dataset):
    def __init__(self, sequences: Sequence[Sequence[int]]):
        self.sequences = [list(s) for s in sequences]

    def __len__(self) -> int:
        return len(self.sequences)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.sequences[i]}


def _collate(pad_id: int) -> Callable[[list[dict]], dict]:
    def collate(rows: list[dict]) -> dict:
        # One right-padded batch of the rows, as the scoring passes build them.
        ids, mask = next(padded_batches([r["input_ids"] for r in rows], len(rows), pad_id))
        return {"input_ids": ids, "attention_mask": mask,
                "labels": ids.masked_fill(mask == 0, -100)}
    return collate


def finetune_hf(model, sequences: Sequence[Sequence[int]], output_dir: str | None, *,
                num_epochs: float = 1.0, lr: float = 5e-5, batch_size: int = 8,
                grad_accum: int = 1, warmup_ratio: float = 0.1, weight_decay: float = 0.0,
                max_steps: int = -1, seed: int = 0, source_dir: str | None = None,
                log: Callable[[str], None] = print) -> dict:
    """Fine-tunes an EMO HF model (typically a pruned subset) with ``transformers.Trainer``.

    The reference's recipe (emo_spec.md 5.3) by default: 1 epoch, lr 5e-5 with 10% warmup, no
    weight decay, router balancing loss active (``output_router_logits``).

    Args:
        model: an ``EmoForCausalLM`` or an EMO HF directory (loaded in fp32).
        sequences: token-id lists (right-padded per batch; padding is masked out of the loss).
        output_dir: where the fine-tuned model is saved (with the source directory's tokenizer
            and ``pruning_metadata.json`` when ``source_dir`` or the model path gives them);
            None keeps the model in memory only.
        num_epochs: passes over ``sequences``.
        lr: peak learning rate.
        batch_size: sequences per device step.
        grad_accum: gradient-accumulation steps.
        warmup_ratio: linear warm-up share of the steps.
        weight_decay: AdamW weight decay.
        max_steps: stop after this many optimizer steps (-1: the epochs decide).
        seed: Trainer seed (data order, init of nothing else).
        source_dir: directory whose tokenizer / metadata files are copied to ``output_dir``.
        log: progress messages.

    Returns:
        ``{"model", "train_losses" (per logged step), "num_steps"}``.

    Raises:
        ValueError: no sequences, or a sequence shorter than 2 tokens.
    """
    from transformers import Trainer, TrainingArguments

    from megatron_emo.conversion.hf_config import copy_modeling_files
    from megatron_emo.conversion.hf_io import TOKENIZER_FILES
    from megatron_emo.subsets.sources import load_hf_model

    if not sequences:
        raise ValueError("finetune_hf needs at least one training sequence")
    short = [i for i, s in enumerate(sequences) if len(s) < 2]
    if short:
        raise ValueError(f"training sequences {short[:5]} have fewer than 2 tokens")
    if isinstance(model, str):
        source_dir = source_dir or model
        model = load_hf_model(model)
    model.train()
    model.config.output_router_logits = True
    steps_per_epoch = math.ceil(len(sequences) / (batch_size * grad_accum))
    work = output_dir or tempfile.mkdtemp(prefix="emo_finetune_")
    args = TrainingArguments(
        output_dir=work, num_train_epochs=num_epochs, max_steps=max_steps,
        learning_rate=lr, warmup_ratio=warmup_ratio, weight_decay=weight_decay,
        per_device_train_batch_size=batch_size, gradient_accumulation_steps=grad_accum,
        lr_scheduler_type="linear", logging_steps=1, save_strategy="no", report_to=[],
        seed=seed, data_seed=seed, use_cpu=not torch.cuda.is_available(),
        dataloader_num_workers=0, disable_tqdm=True, remove_unused_columns=False,
    )
    pad_id = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    trainer = Trainer(model=model, args=args, train_dataset=_TokenDataset(sequences),
                      data_collator=_collate(pad_id))
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    log(f"fine-tuned {trainer.state.global_step} steps ({steps_per_epoch} per epoch): loss "
        f"{losses[0]:.4f} -> {losses[-1]:.4f}")
    model.eval()
    if output_dir:
        model.save_pretrained(output_dir)
        copy_modeling_files(output_dir)  # the project's modeling files, as to-hf writes them
        if source_dir:
            for name in TOKENIZER_FILES + ("pruning_metadata.json",):
                src = os.path.join(source_dir, name)
                if os.path.isfile(src):
                    shutil.copyfile(src, os.path.join(output_dir, name))
    else:
        shutil.rmtree(work, ignore_errors=True)
    return {"model": model, "train_losses": losses, "num_steps": trainer.state.global_step}
