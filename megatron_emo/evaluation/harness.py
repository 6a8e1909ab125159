"""lm-evaluation-harness on EMO models: scoring full or pruned exports, and task calibration data.

``evaluate_model`` runs any lm-eval task (the harness' own, which need their datasets locally,
or the offline ``emo_mc_*`` tasks of ``local_tasks``) on an EMO HF directory, loaded by lm-eval's
HF backend with ``trust_remote_code``, or on a model object (e.g. a full model with an expert
subset masked). ``task_calibration_texts`` turns a task's documents into selection examples the
way the reference does (emo_spec.md 5.1): the task's prompt with its few-shot examples, followed
by the gold answer.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from megatron_emo.evaluation.local_tasks import LOCAL_GROUP, LOCAL_TASK_PREFIX, write_local_tasks

__all__ = ["DEFAULT_TASK_DIR", "evaluate_model", "make_task_manager", "summarize_results",
           "task_calibration_texts"]

DEFAULT_TASK_DIR = os.path.join("runs", "lm_eval_tasks")


def _is_local(name: str) -> bool:
    return name == LOCAL_GROUP or name.startswith(LOCAL_TASK_PREFIX)


def make_task_manager(tasks: Sequence[str], *, include_path: str | None = None,
                      task_dir: str | None = None):
    """An lm-eval ``TaskManager`` that knows ``tasks``.

    The offline ``emo_mc*`` tasks are written to ``task_dir`` (default ``runs/lm_eval_tasks``)
    when requested; lm-eval's built-in task index (thousands of YAML files, slow to scan) is
    loaded only when a task is neither local nor under ``include_path``.
    """
    from lm_eval.tasks import TaskManager

    paths = [include_path] if include_path else []
    if any(_is_local(t) for t in tasks):
        paths.append(write_local_tasks(task_dir or DEFAULT_TASK_DIR))
    manager = TaskManager(include_path=paths or None, include_defaults=False)
    missing = [t for t in tasks if t not in manager.all_tasks]
    local = sorted(t for t in manager.all_tasks if _is_local(t))
    if any(_is_local(t) for t in missing):  # our prefix: never a built-in lm-eval task
        raise ValueError(f"unknown lm-eval tasks {missing}; the local tasks are {local}")
    if missing:
        manager = TaskManager(include_path=paths or None, include_defaults=True)
        missing = [t for t in tasks if t not in manager.all_tasks]
        if missing:
            raise ValueError(f"unknown lm-eval tasks {missing} (local tasks: {LOCAL_GROUP}, "
                             f"{LOCAL_TASK_PREFIX}<domain>; others need --include-path or a "
                             f"built-in lm-eval task name)")
    return manager


def summarize_results(results: dict) -> dict[str, dict[str, float]]:
    """``{task: {metric: value}}`` from lm-eval's results (filter suffixes and stderr dropped)."""
    out: dict[str, dict[str, float]] = {}
    for task, metrics in results.get("results", {}).items():
        row = {}
        for key, value in metrics.items():
            if not isinstance(value, (int, float)) or "_stderr" in key or key == "samples":
                continue
            row[key.split(",")[0]] = float(value)
        out[task] = row
    return out


def evaluate_model(model, tasks: Sequence[str], *, tokenizer=None, device: str = "cpu",
                   dtype: str = "float32", batch_size: int = 8, num_fewshot: int | None = None,
                   limit: int | float | None = None, include_path: str | None = None,
                   task_dir: str | None = None, seed: int = 1234) -> dict:
    """Scores ``model`` on lm-eval ``tasks`` with lm-eval's HF backend.

    Args:
        model: an EMO HF directory (full or pruned; lm-eval loads it with ``trust_remote_code``)
            or an ``EmoForCausalLM`` object.
        tasks: lm-eval task or group names (``emo_mc``, ``emo_mc_<domain>``, built-in names).
        tokenizer: a tokenizer object, an HF tokenizer directory or a sentencepiece ``.model``
            (default: the one in the model directory, see ``sources.load_tokenizer``).
        device: ``cpu`` or ``cuda``.
        dtype: model dtype when loading a directory.
        batch_size: requests per forward.
        num_fewshot: override the tasks' few-shot count.
        limit: at most this many documents per task (a fraction when below 1).
        include_path: a directory of the user's own task YAML files.
        task_dir: where the local tasks are written.
        seed: lm-eval's random / numpy / torch / few-shot seeds.

    Returns:
        lm-eval's results dict (``results``, ``configs``, ``n-shot``, ...) without samples.

    Raises:
        ValueError: unknown tasks, a directory without a tokenizer.
    """
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    from megatron_emo.subsets.sources import load_tokenizer, read_emo_config

    if isinstance(model, str):
        read_emo_config(model)
        if tokenizer is None:
            tokenizer = model
    elif tokenizer is None:
        raise ValueError("evaluating a model object needs a tokenizer (object or path)")
    if isinstance(tokenizer, str):
        tokenizer = load_tokenizer(tokenizer)
    manager = make_task_manager(tasks, include_path=include_path, task_dir=task_dir)
    if isinstance(model, str):
        lm = HFLM(pretrained=model, tokenizer=tokenizer, trust_remote_code=True, device=device,
                  dtype=dtype, batch_size=batch_size)
    else:
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    results = simple_evaluate(model=lm, tasks=list(tasks), num_fewshot=num_fewshot,
                              limit=limit, task_manager=manager, log_samples=False,
                              random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
                              fewshot_random_seed=seed, bootstrap_iters=0)
    return results


def task_calibration_texts(task_name: str, *, split: str = "validation",
                           num_fewshot: int | None = None, num_examples: int | None = None,
                           seed: int = 0, include_path: str | None = None,
                           task_dir: str | None = None) -> list[str]:
    """Selection examples from an lm-eval task: few-shot prompt + gold answer per document.

    As the reference (emo_spec.md 5.1): multiple-choice documents contribute only the correct
    choice, generation documents their first reference answer. Few-shot examples come from the
    task's few-shot split, drawn with ``seed``.

    Args:
        task_name: one lm-eval task (not a group).
        split: ``validation`` (the reference's calibration split), ``train`` or ``test``.
        num_fewshot: few-shot examples per prompt (default: the task's own ``num_fewshot``).
        num_examples: subsample this many documents (``sources.subsample_indices``, ``seed``).
        seed: subsample and few-shot seed.
        include_path: directory of the user's task YAML files.
        task_dir: where the local tasks are written.

    Returns:
        The texts, in document order.

    Raises:
        ValueError: an unknown task or split, a group name, a task without that split.
    """
    from lm_eval.tasks import get_task_dict

    from megatron_emo.subsets.sources import subsample_indices

    if split not in ("train", "validation", "test"):
        raise ValueError(f"split must be train, validation or test, got {split!r}")
    manager = make_task_manager([task_name], include_path=include_path, task_dir=task_dir)
    task_dict = get_task_dict([task_name], manager)
    if len(task_dict) != 1 or not hasattr(next(iter(task_dict.values())), "doc_to_text"):
        raise ValueError(f"{task_name!r} is an lm-eval group; name one of its tasks for "
                         f"calibration")
    task = next(iter(task_dict.values()))
    has = {"train": task.has_training_docs, "validation": task.has_validation_docs,
           "test": task.has_test_docs}[split]()
    if not has:
        raise ValueError(f"lm-eval task {task_name!r} has no {split} split")
    docs = list({"train": task.training_docs, "validation": task.validation_docs,
                 "test": task.test_docs}[split]())
    shots = task.config.num_fewshot if num_fewshot is None else num_fewshot
    shots = int(shots or 0)
    task.set_fewshot_seed(seed)
    texts = []
    for i in subsample_indices(len(docs), num_examples, seed):
        doc = docs[i]
        prompt = task.fewshot_context(doc, shots)
        if isinstance(prompt, list):  # multiple-input tasks: the gold context
            prompt = prompt[task.doc_to_target(doc)]
            texts.append(prompt)
            continue
        target = task.doc_to_target(doc)
        if task.OUTPUT_TYPE == "multiple_choice":
            choices = task.doc_to_choice(doc)
            answer = choices[target] if isinstance(target, int) else str(target)
        else:
            answer = target[0] if isinstance(target, list) else str(target)
        texts.append(prompt + task.config.target_delimiter + answer)
    return texts
