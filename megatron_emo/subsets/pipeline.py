"""Checkpoint + examples -> ``selection.json``, pruned HF directory and Megatron checkpoint.

The library behind ``tools/select_experts.py``. Calibration examples come from a JSONL file or
from an lm-eval task's documents (few-shot prompt + gold answer, ``evaluation.harness``), either
optionally subsampled to ``num_examples`` with ``seed``. Output layout of ``output_dir``:
``selection.json`` (kept expert ids per layer of the input checkpoint, plus
``extra.experts_kept_per_layer_original`` when the input is itself a subset, and provenance),
``hf/`` (pruned EMO HF directory, spec 4.4) and ``megatron/`` (the subset as a torch_dist
checkpoint for further training). Megatron needs the same expert count in every layer: with
per-layer keep counts that differ, ``megatron/`` is skipped with a warning (the HF subset is
still written).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence

from megatron_emo.subsets.pruning import (
    check_megatron_subset,
    export_megatron_subset,
    layer_num_experts,
    prune_hf_dir,
)
from megatron_emo.subsets.selection import Method, Selection, resolve_keep, select_experts
from megatron_emo.subsets.sources import (
    Examples,
    examples_from_texts,
    load_examples,
    load_hf_model,
    load_tokenizer,
    read_emo_config,
    resolve_hf_dir,
    subsample_indices,
)

__all__ = ["load_calibration", "select_and_export"]


def load_calibration(hf_dir: str, *, examples_path: str | None = None, task: str | None = None,
                     task_split: str = "validation", num_fewshot: int | None = None,
                     include_path: str | None = None, task_dir: str | None = None,
                     num_examples: int | None = None, seed: int = 0,
                     tokenizer: str | None = None) -> Examples:
    """Calibration examples from a JSONL file or an lm-eval task, subsampled with ``seed``.

    Args:
        hf_dir: the EMO HF directory (vocabulary, max length, tokenizer).
        examples_path: JSONL with ``text`` or ``tokens`` records.
        task: an lm-eval task name instead (``evaluation.task_calibration_texts``).
        task_split: the task split to draw documents from.
        num_fewshot: few-shot examples per task prompt (default: the task's).
        include_path: directory of the user's lm-eval task YAML files.
        task_dir: where the offline ``emo_mc_*`` tasks are written.
        num_examples: keep this many examples (``sources.subsample_indices``).
        seed: subsample (and few-shot) seed.
        tokenizer: tokenizer for text (default: the one in ``hf_dir``).

    Raises:
        ValueError: neither or both sources, bad examples, an unknown task.
    """
    if (examples_path is None) == (task is None):
        raise ValueError("give exactly one calibration source: an examples JSONL file or an "
                         "lm-eval task")
    cfg = read_emo_config(hf_dir)
    if task is not None:
        from megatron_emo.evaluation.harness import task_calibration_texts

        texts = task_calibration_texts(task, split=task_split, num_fewshot=num_fewshot,
                                       num_examples=num_examples, seed=seed,
                                       include_path=include_path, task_dir=task_dir)
        return examples_from_texts(
            texts, load_tokenizer(tokenizer or hf_dir), vocab_size=cfg["vocab_size"],
            max_length=cfg.get("max_position_embeddings", 4096),
            source=f"lm-eval:{task}/{task_split}")
    examples = load_examples(examples_path, hf_dir, tokenizer=tokenizer)
    keep = subsample_indices(len(examples.sequences), num_examples, seed)
    examples.sequences = [examples.sequences[i] for i in keep]
    return examples


def select_and_export(checkpoint: str, examples_path: str | None, output_dir: str, *,
                      keep: int | None = None, keep_per_layer: Sequence[int] | None = None,
                      method: Method = "greedy-layerwise", ep: int = 1,
                      shared_layout: str = "auto", megatron: bool = True,
                      tokenizer: str | None = None, batch_size: int = 8,
                      device: str = "cpu", dtype: str = "float32",
                      task: str | None = None, task_split: str = "validation",
                      num_fewshot: int | None = None, include_path: str | None = None,
                      task_dir: str | None = None, num_examples: int | None = None,
                      seed: int = 0, log: Callable[[str], None] = print) -> Selection:
    """Selects an expert subset from examples and writes the pruned HF and Megatron checkpoints.

    Args:
        checkpoint: EMO HF directory or Megatron torch_dist checkpoint (exported to a temporary
            HF directory first).
        examples_path: JSONL with ``text`` or ``tokens`` records (None with ``task``).
        output_dir: created; receives ``selection.json``, ``hf/`` and ``megatron/``.
        keep: experts kept per layer, shared included.
        keep_per_layer: one keep count per layer instead of ``keep``.
        method: ``global``, ``greedy-layerwise``, ``easy-ep`` or ``random``.
        ep: expert-parallel size of the Megatron subset (padding experts make it divide).
        shared_layout: Megatron layout of the shared expert: ``auto`` (SharedExpertMLP plus
            padding to a multiple of ``ep``), ``mlp`` or ``router``.
        megatron: write ``megatron/``.
        tokenizer: tokenizer copied into the export of a Megatron checkpoint, and used for text
            examples when the HF directory has none.
        batch_size: sequences per forward.
        device: where the HF model scores the examples (``cpu``, ``cuda``).
        dtype: compute dtype of the scoring model (the written weights keep their dtype).
        task: an lm-eval task whose documents are the examples (see ``load_calibration``).
        task_split: its split.
        num_fewshot: few-shot examples per task prompt (default: the task's).
        include_path: directory of the user's lm-eval task YAML files.
        task_dir: where the offline ``emo_mc_*`` tasks are written.
        num_examples: subsample the examples to this many.
        seed: subsample, few-shot and ``random``-method seed.
        log: progress messages.

    Returns:
        The selection.

    Raises:
        ValueError: bad keep counts or EP size, bad examples, not an EMO checkpoint.
    """
    workdir = tempfile.mkdtemp(prefix="emo_select_")
    try:
        hf_dir = resolve_hf_dir(checkpoint, workdir, tokenizer=tokenizer, log=log)
        cfg = read_emo_config(hf_dir)
        keeps = resolve_keep(keep, keep_per_layer, layer_num_experts(cfg),
                             cfg.get("num_shared_experts", 0))
        if megatron and len(set(keeps)) > 1:
            log(f"WARNING: per-layer keep counts {keeps} differ; Megatron needs the same expert "
                f"count in every layer, so {output_dir}/megatron is skipped (HF subset only)")
            megatron = False
        if megatron:
            check_megatron_subset(keeps, ep)
        examples = load_calibration(hf_dir, examples_path=examples_path, task=task,
                                    task_split=task_split, num_fewshot=num_fewshot,
                                    include_path=include_path, task_dir=task_dir,
                                    num_examples=num_examples, seed=seed, tokenizer=tokenizer)
        log(f"{len(examples.sequences)} examples, {examples.num_tokens} tokens; method {method}, "
            f"keep per layer {keeps}")
        sel = select_experts(load_hf_model(hf_dir, dtype, device), examples.sequences,
                             keep_per_layer=keeps, method=method, batch_size=batch_size,
                             seed=seed, examples_sha256=examples.sha256,
                             source_checkpoint=os.path.abspath(checkpoint))
        sel.extra.update(examples_path=examples.path, exported_from_megatron=hf_dir != checkpoint,
                         num_examples_requested=num_examples, subsample_seed=seed)
        if task is not None:
            sel.extra.update(task=task, task_split=task_split, num_fewshot=num_fewshot)
        src_meta = os.path.join(hf_dir, "pruning_metadata.json")
        if os.path.isfile(src_meta):
            # The source is already a subset: its indices are not the original model's.
            prev = json.load(open(src_meta))["experts_kept_per_layer"]
            sel.extra["experts_kept_per_layer_original"] = [
                [prev[layer][j] for j in kept] for layer, kept in
                enumerate(sel.experts_kept_per_layer)]
        os.makedirs(output_dir, exist_ok=True)
        sel.save(os.path.join(output_dir, "selection.json"))
        hf_out = os.path.join(output_dir, "hf")
        new_cfg = prune_hf_dir(hf_dir, hf_out, sel.experts_kept_per_layer, metadata={
            "method": method, "keep_k": sel.keep_k, "keep_per_layer": keeps,
            "num_calibration": sel.num_examples, "num_calibration_tokens": sel.num_tokens,
            "examples_sha256": sel.examples_sha256, "examples_path": examples.path,
            "source_checkpoint": sel.source_checkpoint, "seed": seed,
            **({"task": task, "split": task_split, "shots": num_fewshot} if task else {}),
        })
        log(f"wrote {hf_out}: num_experts {new_cfg['num_experts']}, num_experts_per_tok "
            f"{new_cfg['num_experts_per_tok']}, num_experts_per_layer "
            f"{new_cfg['num_experts_per_layer']}")
        if new_cfg["num_experts_per_tok"] < cfg["num_experts_per_tok"]:
            log(f"NOTE: keep_k {max(keeps)} is below num_experts_per_tok "
                f"{cfg['num_experts_per_tok']}: the subset routes every token to all "
                f"{new_cfg['num_experts_per_tok']} kept experts (spec 4.4)")
        if megatron:
            path = export_megatron_subset(hf_out, os.path.join(output_dir, "megatron"), ep=ep,
                                          shared_layout=shared_layout, log=log)
            log(f"wrote Megatron checkpoint {path} for EP {ep}")
        return sel
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
