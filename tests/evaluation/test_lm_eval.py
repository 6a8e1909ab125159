"""Offline lm-eval tasks and the lm-eval path: local task files, task calibration, pruned export.

* ``write_local_tasks`` is byte-deterministic; each item's true continuation continues its
  document, the 3 distractors do not, and the splits share no document.
* ``task_calibration_texts`` gives the task's prompt + gold answer (with few-shot examples from
  the train split when asked), subsampled with the seed.
* End to end on CPU (the ``finetune_run`` fixture: ``examples/05_finetune_subset.sh``):
  ``tools/select_experts.py --task emo_mc_math`` prunes a tiny model from 4 task documents, then
  ``tools/evaluate.py`` has lm-eval load the pruned export (HF backend, ``trust_remote_code``)
  and score ``emo_mc_math``; accuracy equals a hand loop over the same documents
  (loglikelihood of each choice with the pruned model).

Run: ``OMP_NUM_THREADS=1 python -m pytest tests/evaluation/test_lm_eval.py -q``
"""

from __future__ import annotations

import json
import os

import pytest
import torch

from megatron_emo.evaluation import build_domain_items, write_local_tasks
from megatron_emo.evaluation.local_tasks import read_corpus_domains

TOOLS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "tools")


def _tool(name: str):
    """A tools/ script as a module under a private name.

    ``evaluate`` would shadow the HF ``evaluate`` package that some lm-eval tasks import.
    """
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"emo_tool_{name}",
                                                  os.path.join(TOOLS, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _read(path):
    return [json.loads(line) for line in open(path)]


def test_local_tasks_deterministic_and_well_formed(tmp_path, task_dir):
    again = write_local_tasks(str(tmp_path / "again"))
    names = sorted(os.listdir(task_dir))
    assert names == sorted(os.listdir(again))
    for name in names:
        a = open(os.path.join(task_dir, name)).read().replace(task_dir, "DIR")
        b = open(os.path.join(again, name)).read().replace(again, "DIR")
        assert a == b, name
    corpus = read_corpus_domains()
    assert sorted(corpus) == ["code", "legal", "manual", "math", "narrative"]
    for domain, texts in corpus.items():
        ids = {}
        for split, count in (("train", 200), ("validation", 50), ("test", 100)):
            items = _read(os.path.join(task_dir, f"{domain}_{split}.jsonl"))
            assert len(items) == count
            ids[split] = {it["id"] for it in items}
            for it in items:
                doc = texts[int(it["id"].split("-")[-1])]
                assert it["text"] == doc and doc.startswith(it["context"])
                choices = it["choices"]
                assert len(set(choices)) == 4 and 0 <= it["label"] < 4
                assert doc.startswith(it["context"] + choices[it["label"]])
                assert not any(doc.startswith(it["context"] + c)
                               for i, c in enumerate(choices) if i != it["label"])
        assert not (ids["train"] & ids["test"] or ids["validation"] & ids["test"]
                    or ids["train"] & ids["validation"])
    cfg = json.load(open(os.path.join(task_dir, "emo_mc_math.yaml")))
    assert cfg["output_type"] == "multiple_choice" and cfg["target_delimiter"] == ""
    assert cfg["dataset_kwargs"]["data_files"]["test"] == os.path.join(task_dir,
                                                                       "math_test.jsonl")
    with pytest.raises(ValueError, match=r"unknown domains \['poetry'\]"):
        write_local_tasks(str(tmp_path / "x"), domains=["poetry"])
    with pytest.raises(ValueError, match=r"domain 'd' has 3 documents .* num_test \(100\)"):
        build_domain_items(["a " * 400] * 3, "d")


def test_task_calibration_texts(task_dir):
    from megatron_emo.evaluation import task_calibration_texts
    from megatron_emo.subsets.sources import subsample_indices

    val = _read(os.path.join(task_dir, "math_validation.jsonl"))
    texts = task_calibration_texts("emo_mc_math", num_examples=5, seed=3, task_dir=task_dir)
    rows = subsample_indices(len(val), 5, 3)
    assert texts == [val[i]["context"] + val[i]["choices"][val[i]["label"]] for i in rows]
    train = {it["context"] + it["choices"][it["label"]] for it in
             _read(os.path.join(task_dir, "math_train.jsonl"))}
    shots = task_calibration_texts("emo_mc_math", num_fewshot=1, num_examples=5, seed=3,
                                   task_dir=task_dir)
    assert len(shots) == 5
    for text, own in zip(shots, texts, strict=True):
        assert text.endswith("\n\n" + own) and text[:-len(own) - 2] in train
    with pytest.raises(ValueError, match=r"unknown lm-eval tasks \['emo_mc_poetry'\]"):
        task_calibration_texts("emo_mc_poetry", task_dir=task_dir)
    with pytest.raises(ValueError, match="is an lm-eval group"):
        task_calibration_texts("emo_mc", task_dir=task_dir)


def _hand_accuracy(model_dir, items, tokenizer):
    """``acc`` / ``acc_norm`` by hand.

    Argmax over choices of the summed log-probability of the choice's tokens after the context
    (split as lm-eval splits context + continuation).
    """
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, trust_remote_code=True).eval()
    hits = hits_norm = 0
    for it in items:
        ctx = tokenizer.encode(it["context"], add_special_tokens=False)
        lls = []
        for choice in it["choices"]:
            whole = tokenizer.encode(it["context"] + choice, add_special_tokens=False)
            cont = whole[len(ctx):]
            with torch.no_grad():
                logp = model(torch.tensor([whole[:-1]])).logits[0].log_softmax(-1)
            lls.append(sum(float(logp[len(whole) - len(cont) - 1 + j, t])
                           for j, t in enumerate(cont)))
        norm = [ll / len(c.encode("utf-8")) for ll, c in zip(lls, it["choices"], strict=True)]
        hits += int(max(range(4), key=lambda i: lls[i]) == it["label"])
        hits_norm += int(max(range(4), key=lambda i: norm[i]) == it["label"])
    return hits / len(items), hits_norm / len(items)


def test_select_from_task_then_lm_eval_scores_pruned_export(finetune_run, task_dir):
    """The lm-eval scores of the task-selected pruned export equal a hand loop.

    ``examples/05_finetune_subset.sh`` selected its subset with ``select_experts.py --task`` and had
    lm-eval (``tools/evaluate.py``, HF backend, ``trust_remote_code``) score the pruned export: the
    scores equal a hand loop over the same 8 test items.
    """
    from megatron_emo.subsets.sources import load_tokenizer

    out, _ = finetune_run
    sel = json.load(open(out / "subset" / "selection.json"))
    assert sel["num_examples"] == 4 and sel["extra"]["task"] == "emo_mc_math"
    assert sel["extra"]["examples_path"] == "lm-eval:emo_mc_math/validation"
    pruned = str(out / "subset" / "hf")
    assert os.path.isfile(os.path.join(pruned, "tokenizer.model"))
    assert json.load(open(os.path.join(pruned, "config.json")))["num_experts"] == 4
    row = json.load(open(out / "scores.json"))[pruned]["emo_mc_math"]
    items = _read(os.path.join(task_dir, "math_test.jsonl"))[:8]
    acc, acc_norm = _hand_accuracy(pruned, items, load_tokenizer(pruned))
    assert row["acc"] == pytest.approx(acc) and row["acc_norm"] == pytest.approx(acc_norm)
    evaluate_cli = _tool("evaluate")
    with pytest.raises(ValueError, match=r"unknown lm-eval tasks \['emo_mc_poetry'\]; the local "
                                         r"tasks are \['emo_mc', 'emo_mc_code'"):
        evaluate_cli.main([pruned, "--tasks", "emo_mc_poetry", "--task-dir", task_dir])
    with pytest.raises(ValueError, match="--limit must be positive, got 0"):
        evaluate_cli.main([pruned, "--limit", "0"])
