"""The committed sample corpus and the script that builds it.

>= 5 domains x >= 300 documents with full records, and the build script reproduces it byte for byte
(generated domains always; all domains in the slow test).

    PYTHONPATH=. python -m pytest -x -q tests/preprocessing/test_sample_corpus.py [-m slow]
"""

from __future__ import annotations

import filecmp
import gzip
import json
import os
import sysconfig

import pytest

from megatron_emo.preprocessing import SAMPLE_CORPUS_DIR, sample_corpus_files
from megatron_emo.preprocessing.corpus_builder import DOMAINS, build_sample_corpus


def test_committed_corpus_has_five_domains_of_300_documents():
    files = sample_corpus_files()
    assert [os.path.basename(f) for f in files] == [f"{d}.jsonl.gz" for d in sorted(DOMAINS)]
    assert sum(os.path.getsize(f) for f in files) < 4e6
    ids = []
    for path in files:
        with gzip.open(path, "rt", encoding="utf-8") as f:
            records = [json.loads(line) for line in f]
        domain = os.path.basename(path).removesuffix(".jsonl.gz")
        assert len(records) >= 300, (path, len(records))
        for record in records:
            assert set(record) == {"text", "domain", "source", "id"}
            assert record["domain"] == domain and record["text"].strip() and record["source"]
            ids.append(record["id"])
        lengths = sorted(len(r["text"]) for r in records)
        median = lengths[len(lengths) // 2]
        assert lengths[0] < median / 2 and lengths[-1] > 2 * median  # varied lengths
    assert len(ids) == len(set(ids))
    assert len(DOMAINS) >= 5


def test_generated_domains_rebuild_byte_identical(tmp_path):
    build_sample_corpus(str(tmp_path), ["math", "narrative"])
    for domain in ("math", "narrative"):
        assert filecmp.cmp(tmp_path / f"{domain}.jsonl.gz",
                           os.path.join(SAMPLE_CORPUS_DIR, f"{domain}.jsonl.gz"), shallow=False)


@pytest.mark.slow
@pytest.mark.skipif(not sysconfig.get_paths()["stdlib"].endswith("3.12.1/lib/python3.12")
                    or not os.path.isdir("/usr/share/doc"),
                    reason="code/manual/legal come from the CPython 3.12.1 stdlib and Debian docs")
def test_full_rebuild_byte_identical(tmp_path):
    build_sample_corpus(str(tmp_path))
    for domain in DOMAINS:
        assert filecmp.cmp(tmp_path / f"{domain}.jsonl.gz",
                           os.path.join(SAMPLE_CORPUS_DIR, f"{domain}.jsonl.gz"), shallow=False)
