"""Offline preprocessing: indexed datasets, tokenizer training and the sample corpus.

JSONL/token-array files to Megatron ``IndexedDataset``, tokenizer training, and the embedded
multi-domain sample corpus (``sample_corpus_files()``).

The training-time dataset that reads these files lives in ``megatron_emo/training/``.
"""

from __future__ import annotations

import glob
import os

__all__ = ["SAMPLE_CORPUS_DIR", "sample_corpus_files"]

SAMPLE_CORPUS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sample_corpus")


def sample_corpus_files() -> list[str]:
    """Returns the embedded sample corpus files (one ``{domain}.jsonl.gz`` per domain), sorted."""
    return sorted(glob.glob(os.path.join(SAMPLE_CORPUS_DIR, "*.jsonl.gz")))
