"""Fine-tuning an expert subset on a task: the Megatron route and the Hugging Face route.

The Megatron route is ``examples/05_finetune_subset.sh`` end to end, the Hugging Face route
``tools/finetune_subset.py hf`` (transformers Trainer).

* Megatron route on a tiny random model: subset from 4 ``emo_mc_math`` prompts (4 of 8 experts)
  -> ``python -m megatron_emo.train --finetune`` (4 iterations on the task's train split) ->
  ``to-hf`` -> ``tools/evaluate.py`` before/after; the fine-tuned export keeps the subset's shape,
  its weights moved, and its loss on the task's training texts went down.
* ``megatron-flags`` of the pruned tiny model, flag by flag, and the refusal of per-layer counts.
* HF route on the same subset: loss falls over the steps, the saved directory loads with its
  tokenizer and pruning metadata.

Run: ``OMP_NUM_THREADS=1 python -m pytest tests/evaluation/test_finetune.py -q``
"""

from __future__ import annotations

import json
import os

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _tool(name: str):
    """A tools/ script as a module under a private name (tools/ stays off sys.path)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"emo_tool_{name}",
                                                  os.path.join(REPO, "tools", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _train_sequences(task_dir, tokenizer, n=16):
    rows = [json.loads(line) for line in open(os.path.join(task_dir, "math_train.jsonl"))][:n]
    return [tokenizer.encode(r["context"] + r["choices"][r["label"]], add_special_tokens=False)
            for r in rows]


def test_megatron_route_end_to_end(finetune_run, task_dir):
    from megatron_emo.subsets import next_token_loss
    from megatron_emo.subsets.sources import load_hf_model, load_tokenizer

    out, proc = finetune_run
    before_dir, after_dir = str(out / "subset" / "hf"), str(out / "hf")
    assert "| emo_mc_math | acc |" in proc.stdout
    scores = json.load(open(out / "scores.json"))
    assert list(scores) == [before_dir, after_dir]
    assert all(0.0 <= s["emo_mc_math"]["acc"] <= 1.0 for s in scores.values())
    log = open(out / "train.log").read()
    assert "iteration        4/       4" in log
    cfg = json.load(open(os.path.join(after_dir, "config.json")))
    assert (cfg["num_experts"], cfg["num_experts_per_tok"]) == (4, 3)
    before, after = load_hf_model(before_dir), load_hf_model(after_dir)
    w0 = before.model.layers[1].mlp.experts[2].down_proj.weight
    assert not torch.equal(w0, after.model.layers[1].mlp.experts[2].down_proj.weight)
    seqs = _train_sequences(task_dir, load_tokenizer(after_dir))
    assert next_token_loss(after, seqs)[0] < next_token_loss(before, seqs)[0] - 0.05


def test_megatron_flags_of_a_pruned_model(finetune_run, tmp_path):
    from megatron_emo.subsets.finetune import subset_model_flags

    out, _ = finetune_run
    common = [
        "--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4",
        "--kv-channels", "8", "--ffn-hidden-size", "16", "--seq-length", "512",
        "--max-position-embeddings", "512", "--normalization", "RMSNorm", "--norm-epsilon",
        "1e-05", "--swiglu", "--position-embedding-type", "rope", "--rotary-base", "10000",
        "--untie-embeddings-and-output-weights", "--disable-bias-linear"]
    gqa = ["--group-query-attention", "--num-query-groups", "2"]
    hf_dir = str(out / "subset" / "hf")
    # select_experts' default layout (auto): SharedExpertMLP + the 3 routed experts, which is
    # what the fine-tuning run above loaded from DIR/megatron.
    assert subset_model_flags(hf_dir) == [
        *common, "--num-experts", "3", "--moe-ffn-hidden-size", "16",
        "--moe-shared-expert-intermediate-size", "16", "--emo-num-shared-experts", "0",
        "--moe-router-topk", "2", "--emo-num-padding-experts", "0", *gqa]
    assert subset_model_flags(hf_dir, "auto", ep=2)[len(common):len(common) + 12] == [
        "--num-experts", "4", "--moe-ffn-hidden-size", "16",
        "--moe-shared-expert-intermediate-size", "16", "--emo-num-shared-experts", "0",
        "--moe-router-topk", "2", "--emo-num-padding-experts", "1"]
    assert subset_model_flags(hf_dir, "router") == [
        *common, "--num-experts", "4", "--moe-ffn-hidden-size", "16",
        "--emo-num-shared-experts", "1", "--moe-router-topk", "3",
        "--emo-num-padding-experts", "0", *gqa]
    uneven = tmp_path / "uneven"
    uneven.mkdir()
    cfg = json.load(open(out / "subset" / "hf" / "config.json"))
    cfg["num_experts_per_layer"] = [3, 4]
    (uneven / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"keeps \[3, 4\] experts per layer"):
        subset_model_flags(str(uneven))


def test_hf_route_trainer(finetune_run, tmp_path, task_dir):
    from transformers import AutoModelForCausalLM

    from megatron_emo.subsets import next_token_loss
    from megatron_emo.subsets.sources import load_hf_model, load_tokenizer

    finetune_subset = _tool("finetune_subset")
    out, _ = finetune_run
    subset = str(out / "subset" / "hf")
    dest = str(tmp_path / "hf_ft")
    finetune_subset.main(["hf", subset, dest, "--task", "emo_mc_math", "--task-dir", task_dir,
                          "--num-examples", "32", "--batch-size", "4", "--max-steps", "6",
                          "--lr", "3e-3", "--seed", "2"])
    for name in ("tokenizer.model", "pruning_metadata.json", "modeling_emo.py", "config.json"):
        assert os.path.isfile(os.path.join(dest, name)), name
    tuned = AutoModelForCausalLM.from_pretrained(dest, trust_remote_code=True).eval()
    assert len(tuned.model.layers[0].mlp.experts) == 4
    seqs = _train_sequences(task_dir, load_tokenizer(dest))
    assert next_token_loss(tuned, seqs)[0] < next_token_loss(load_hf_model(subset), seqs)[0] - 0.05
    with pytest.raises(ValueError, match=r"--epochs \(0.0\) and --lr \(0.001\) must be positive"):
        finetune_subset.main(["hf", subset, dest, "--task", "emo_mc_math", "--epochs", "0",
                              "--lr", "1e-3"])
