"""Fixtures for the lm-eval tests.

A small sentencepiece tokenizer trained on the embedded corpus, a random tiny EMO HF directory whose
vocabulary matches it (``hf_tiny`` from ``tests/conversion``, importable through
``tests/conftest.py``), and the offline local tasks.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import sys

import pytest

from helpers import free_port

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    """No hub access: the tests must run on a machine without network."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


@pytest.fixture(scope="session")
def spm_model(tmp_path_factory) -> str:
    """A 512-piece sentencepiece model (the project's tokenizer trainer, 2,000 paragraphs)."""
    from megatron_emo.preprocessing import sample_corpus_files
    from megatron_emo.preprocessing.tokenizer_training import train_sentencepiece

    prefix = tmp_path_factory.mktemp("spm") / "tok"
    return train_sentencepiece(sample_corpus_files(), output_prefix=str(prefix), vocab_size=512,
                               max_sentences=2000)


@pytest.fixture(scope="session")
def tiny_lm_dir(tmp_path_factory, spm_model) -> str:
    """A random tiny EMO HF directory with the sentencepiece model as its tokenizer.

    2 layers, 8 experts incl. 1 shared, top-3, vocab 512, 512 positions; the sentencepiece model
    is ``tokenizer.model`` (as ``to-hf --tokenizer``).
    """
    from hf_tiny import TINY, random_hf_state_dict, write_hf_dir

    shape = dataclasses.replace(TINY, vocab_size=512, max_position_embeddings=512,
                                eos_token_id=2, pad_token_id=3)
    path = tmp_path_factory.mktemp("tiny_lm") / "hf"
    write_hf_dir(path, random_hf_state_dict(shape, seed=4, std=0.3), shape)
    shutil.copyfile(spm_model, path / "tokenizer.model")
    return str(path)


@pytest.fixture(scope="session")
def task_dir(tmp_path_factory) -> str:
    """The offline emo_mc tasks (default sizes), written once."""
    from megatron_emo.evaluation import write_local_tasks

    return write_local_tasks(str(tmp_path_factory.mktemp("tasks")))


@pytest.fixture(scope="session")
def finetune_run(tmp_path_factory, tiny_lm_dir, spm_model, task_dir):
    """``examples/05_finetune_subset.sh`` (Megatron route) on the tiny model.

    Subset of 4 experts from 4 ``emo_mc_math`` validation prompts, 4 fine-tuning iterations, lm-eval
    before/after on 8 test items. Returns ``(output dir, completed process)``.
    """
    run = tmp_path_factory.mktemp("ft")
    env = {k: v for k, v in os.environ.items() if not k.startswith("NVTE_")}
    env.update(PY=sys.executable, PYTHONPATH=REPO, OMP_NUM_THREADS="1", RUN=str(run),
               CHECKPOINT=tiny_lm_dir, TOKENIZER_MODEL=spm_model, TASK_DIR=task_dir,
               TASK="emo_mc_math", KEEP="4", NUM_EXAMPLES="4", FT_ITERS="4", FT_LR="3e-3",
               EVAL_LIMIT="8", MASTER_PORT=str(free_port()), HF_HUB_OFFLINE="1",
               HF_DATASETS_OFFLINE="1")
    proc = subprocess.run(["bash", "examples/05_finetune_subset.sh"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return run / "finetune" / "emo_mc_math-keep4", proc
