"""Offline lm-eval tasks built from the embedded sample corpus: one multiple-choice task per domain.

Each item is the start of a corpus document (``context``) and four candidate continuations: the
document's own next words and the continuations, at the same point, of three other documents of
the same domain. The model is scored by loglikelihood (lm-eval ``multiple_choice``: ``acc``, and
``acc_norm`` normalised by byte length). ``write_local_tasks`` writes, deterministically (same
arguments, same bytes), per domain the JSONL splits (``train``: documents for fine-tuning and
few-shot, ``validation``: calibration for expert selection, ``test``: evaluation) and an lm-eval
custom-task YAML that points at them with absolute paths, plus the group ``emo_mc`` of all
domains. Nothing is downloaded: lm-eval reads the JSONL with the ``json`` dataset builder.

    from megatron_emo.evaluation import write_local_tasks
    task_dir = write_local_tasks("runs/lm_eval_tasks")   # then lm_eval --include_path task_dir
"""

from __future__ import annotations

import gzip
import json
import os
import random
from collections.abc import Sequence

__all__ = ["LOCAL_GROUP", "LOCAL_TASK_PREFIX", "build_domain_items", "local_task_names",
           "read_corpus_domains", "write_local_tasks"]

LOCAL_TASK_PREFIX = "emo_mc_"
LOCAL_GROUP = "emo_mc"
NUM_CHOICES = 4
SPLITS = ("train", "validation", "test")
# Sequence budget: the quickstart model has 256 positions and ~4 characters per token.
CONTEXT_CHARS = 320
CONTINUATION_CHARS = 64


def read_corpus_domains(files: Sequence[str] | None = None) -> dict[str, list[str]]:
    """Document texts per domain of the embedded corpus (or of ``files``), in file order."""
    from megatron_emo.preprocessing import sample_corpus_files

    docs: dict[str, list[str]] = {}
    for path in files or sample_corpus_files():
        with gzip.open(path, "rt", encoding="utf-8") if path.endswith(".gz") else open(
                path, encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    rec = json.loads(line)
                    docs.setdefault(str(rec["domain"]), []).append(rec["text"])
    return dict(sorted(docs.items()))


def _cut(text: str, start: int, num_chars: int) -> int | None:
    """End of a piece of ``text`` from ``start``, or None when the text ends too early.

    The piece ends at the first whitespace at or after ``start + num_chars`` (so words stay
    whole); None when the text ends before that.
    """
    for end in range(start + num_chars, len(text)):
        if text[end].isspace():
            return end
    return None


def _split_document(text: str, context_chars: int, continuation_chars: int
                    ) -> tuple[str, str] | None:
    """Splits a document into ``(context, continuation)``, or None when it is too short.

    The continuation starts with the whitespace that ended the context, so
    ``context + continuation`` is a prefix of the document.
    """
    ctx_end = _cut(text, 0, context_chars)
    if ctx_end is None:
        return None
    cont_end = _cut(text, ctx_end + 1, continuation_chars)
    if cont_end is None:
        return None
    context, continuation = text[:ctx_end], text[ctx_end:cont_end]
    if not context.strip() or not continuation.strip():
        return None
    return context, continuation


def build_domain_items(texts: Sequence[str], domain: str, *, num_test: int = 100,
                       num_validation: int = 50, num_train: int | None = None, seed: int = 0,
                       context_chars: int = CONTEXT_CHARS,
                       continuation_chars: int = CONTINUATION_CHARS) -> dict[str, list[dict]]:
    """Multiple-choice items of one domain, split into train / validation / test.

    Documents long enough for a context and a continuation are shuffled (``seed``); the first
    ``num_test`` go to test, the next ``num_validation`` to validation, the rest (at most
    ``num_train``) to train. Distractors are continuations of other documents of the same split,
    drawn with a generator seeded by domain, split and ``seed``, and differ from the answer.

    Returns:
        ``{split: [{"id", "domain", "context", "choices", "label", "text"}, ...]}``; ``text`` is the
        whole document (fine-tuning data), ``choices[label]`` the true continuation.

    Raises:
        ValueError: too few usable documents for the requested splits (names the counts).
    """
    usable = []
    for i, text in enumerate(texts):
        parts = _split_document(text, context_chars, continuation_chars)
        if parts is not None:
            usable.append((i, text, *parts))
    need = num_test + num_validation + 2 * NUM_CHOICES
    if len(usable) < need:
        raise ValueError(f"domain {domain!r} has {len(usable)} documents of at least "
                         f"{context_chars} + {continuation_chars} characters; num_test "
                         f"({num_test}) + num_validation ({num_validation}) + "
                         f"{2 * NUM_CHOICES} are needed")
    random.Random(f"{domain}/{seed}/order").shuffle(usable)
    chunks = {"test": usable[:num_test],
              "validation": usable[num_test:num_test + num_validation],
              "train": usable[num_test + num_validation:]}
    if num_train is not None:
        chunks["train"] = chunks["train"][:num_train]
    out: dict[str, list[dict]] = {}
    for split in SPLITS:
        pool = chunks[split]
        rng = random.Random(f"{domain}/{seed}/{split}")
        items = []
        for j, (doc_index, text, context, answer) in enumerate(pool):
            distractors: list[str] = []
            order = list(range(len(pool)))
            rng.shuffle(order)
            for k in order:
                cand = pool[k][3]
                if k != j and cand != answer and cand not in distractors:
                    distractors.append(cand)
                if len(distractors) == NUM_CHOICES - 1:
                    break
            if len(distractors) < NUM_CHOICES - 1:
                continue  # a tiny split without 3 distinct distractors
            label = rng.randrange(NUM_CHOICES)
            choices = distractors[:label] + [answer] + distractors[label:]
            items.append({"id": f"{domain}-{doc_index}", "domain": domain, "context": context,
                          "choices": choices, "label": label, "text": text})
        out[split] = items
    return out


def _write_if_changed(path: str, text: str) -> None:
    """Writes ``text`` to ``path`` atomically, and only when the file differs.

    Readers in other processes never see a half-written file, and an unchanged file keeps its
    mtime (the datasets cache of lm-eval's json loader stays valid).
    """
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            if f.read() == text:
                return
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def local_task_names(domains: Sequence[str]) -> list[str]:
    """Task names of the domains (``emo_mc_<domain>``)."""
    return [LOCAL_TASK_PREFIX + d for d in domains]


def _task_yaml(name: str, files: dict[str, str], num_fewshot: int) -> str:
    # JSON is valid YAML: no quoting pitfalls for paths or Jinja templates.
    cfg = {
        "task": name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": files},
        "output_type": "multiple_choice",
        "training_split": "train",
        "validation_split": "validation",
        "test_split": "test",
        "fewshot_split": "train",
        "num_fewshot": num_fewshot,
        "doc_to_text": "{{context}}",
        "doc_to_choice": "{{choices}}",
        "doc_to_target": "label",
        # The continuation carries its own leading whitespace (it is cut from the document).
        "target_delimiter": "",
        "fewshot_delimiter": "\n\n",
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                        {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}],
        "metadata": {"version": 1.0},
    }
    return json.dumps(cfg, indent=1) + "\n"


def write_local_tasks(out_dir: str, *, domains: Sequence[str] | None = None,
                      num_test: int = 100, num_validation: int = 50, num_train: int | None = 200,
                      num_fewshot: int = 0, seed: int = 0,
                      corpus_files: Sequence[str] | None = None) -> str:
    """Writes the local tasks (JSONL splits + YAML per domain, group YAML) to ``out_dir``.

    Args:
        out_dir: created; pass it to lm-eval as ``--include_path``.
        domains: subset of the corpus domains (default: all).
        num_test: test items per domain.
        num_validation: validation (calibration) items per domain.
        num_train: at most this many train items per domain (None: all remaining documents).
        num_fewshot: the tasks' default few-shot count (examples from ``train``).
        seed: document shuffle and distractor seed.
        corpus_files: JSONL(.gz) files with ``text`` and ``domain`` (default: embedded corpus).

    Returns:
        ``out_dir`` as an absolute path.

    Raises:
        ValueError: an unknown domain, or a domain with too few documents.
    """
    corpus = read_corpus_domains(corpus_files)
    domains = list(domains) if domains else list(corpus)
    unknown = [d for d in domains if d not in corpus]
    if unknown:
        raise ValueError(f"unknown domains {unknown}; the corpus has {sorted(corpus)}")
    out_dir = os.path.abspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    names = []
    for domain in domains:
        items = build_domain_items(corpus[domain], domain, num_test=num_test,
                                   num_validation=num_validation, num_train=num_train, seed=seed)
        files = {}
        for split in SPLITS:
            path = os.path.join(out_dir, f"{domain}_{split}.jsonl")
            _write_if_changed(path, "".join(json.dumps(item, ensure_ascii=True, sort_keys=True)
                                            + "\n" for item in items[split]))
            files[split] = path
        name = LOCAL_TASK_PREFIX + domain
        _write_if_changed(os.path.join(out_dir, f"{name}.yaml"),
                          _task_yaml(name, files, num_fewshot))
        names.append(name)
    group = {"group": LOCAL_GROUP, "task": names,
             "aggregate_metric_list": [
                 {"metric": m, "aggregation": "mean", "weight_by_size": True}
                 for m in ("acc", "acc_norm")],
             "metadata": {"version": 1.0}}
    _write_if_changed(os.path.join(out_dir, f"{LOCAL_GROUP}.yaml"),
                      json.dumps(group, indent=1) + "\n")
    return out_dir
