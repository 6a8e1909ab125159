"""``examples/01_preprocess.sh`` parses and, run for real, writes a reconciled dataset.

It parses with ``bash -n`` and, run for real on the embedded corpus, trains a tokenizer and writes a
reconciled dataset whose metadata sidecar names all 5 domains.

    PYTHONPATH=. python -m pytest -x -q tests/preprocessing/test_example_preprocess.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from megatron.core.datasets.indexed_dataset import IndexedDataset

from preprocessing_helpers import subprocess_env

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, "examples", "01_preprocess.sh")


def test_script_parses():
    subprocess.run(["bash", "-n", SCRIPT], check=True)


def test_script_runs_on_embedded_corpus(tmp_path):
    env = subprocess_env()
    env.update(PY=sys.executable, OUT_DIR=str(tmp_path), VOCAB_SIZE="2048", WORKERS="1")
    proc = subprocess.run(["bash", SCRIPT], capture_output=True, text=True, env=env,
                          timeout=300, cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    prefix = tmp_path / "emo_sample_text_document"
    summary = json.loads((tmp_path / "emo_sample_text_document.summary.json").read_text())
    assert summary["records_in"] == summary["documents_written"] + summary["skipped"]
    assert summary["skipped"] == 0 and summary["eod_id"] == 2
    dataset = IndexedDataset(str(prefix))
    assert len(dataset) == summary["documents_written"] >= 5 * 300
    with open(f"{prefix}.metadata.jsonl") as f:
        metadata = [json.loads(line) for line in f]
    assert len(metadata) == len(dataset)
    assert {m["domain"] for m in metadata} == {"code", "legal", "manual", "math", "narrative"}
    assert all(set(m) == {"domain", "source", "id"} for m in metadata)
    assert int(dataset[0][-1]) == 2
