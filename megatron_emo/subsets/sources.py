"""Inputs of expert-subset selection: checkpoints (EMO HF or Megatron), example files, models.

A Megatron torch_dist checkpoint is first exported to HF with the streaming ``to_hf`` code; every
score and loss is computed with the HF model (the published routing, emo_spec.md 4.3).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

from megatron_emo.conversion.hf_io import dtype_from_name

__all__ = ["Examples", "examples_from_texts", "is_megatron_checkpoint", "load_examples",
           "load_hf_model", "load_tokenizer", "read_emo_config", "resolve_hf_dir",
           "subsample_indices"]


def is_megatron_checkpoint(path: str) -> bool:
    """True for a megatron.training checkpoint dir (tracker file) or a torch_dist iteration dir."""
    return os.path.isfile(os.path.join(path, "latest_checkpointed_iteration.txt")) or (
        os.path.isfile(os.path.join(path, "metadata.json"))
        and os.path.isfile(os.path.join(path, ".metadata"))
    )


def read_emo_config(hf_dir: str) -> dict:
    """``config.json`` of an EMO HF directory.

    Raises:
        ValueError: no ``config.json`` or ``model_type`` is not ``emo``.
    """
    path = os.path.join(hf_dir, "config.json")
    if not os.path.isfile(path):
        raise ValueError(f"{hf_dir} has no config.json: not a Hugging Face model directory")
    cfg = json.load(open(path))
    if cfg.get("model_type") != "emo":
        raise ValueError(f"{hf_dir} is not an EMO checkpoint: config.json model_type is "
                         f"{cfg.get('model_type')!r}, expected 'emo'")
    return cfg


def resolve_hf_dir(checkpoint: str, workdir: str, *, tokenizer: str | None = None,
                   log: Callable[[str], None] = print) -> str:
    """An EMO HF directory for ``checkpoint``, exporting a Megatron checkpoint if needed.

    Args:
        checkpoint: an EMO HF directory or a Megatron torch_dist checkpoint directory.
        workdir: where a Megatron checkpoint is exported to (``workdir/hf_export``).
        tokenizer: HF tokenizer directory or sentencepiece file copied into the export.
        log: progress messages.

    Returns:
        The HF directory.

    Raises:
        ValueError: ``checkpoint`` is neither kind, or not an EMO model.
    """
    if not os.path.isdir(checkpoint):
        raise ValueError(f"checkpoint {checkpoint} is not a directory")
    if os.path.isfile(os.path.join(checkpoint, "config.json")):
        read_emo_config(checkpoint)
        return checkpoint
    if is_megatron_checkpoint(checkpoint):
        from megatron_emo.conversion.to_hf import export_to_hf

        out = os.path.join(workdir, "hf_export")
        log(f"{checkpoint} is a Megatron torch_dist checkpoint: exporting it to HF in {out} "
            f"(streaming to_hf export)")
        export_to_hf(checkpoint, out, tokenizer=tokenizer, print_fn=log)
        return out
    raise ValueError(f"{checkpoint} is neither an EMO HF directory (config.json) nor a Megatron "
                     f"torch_dist checkpoint (latest_checkpointed_iteration.txt or metadata.json)")


def load_hf_model(hf_dir: str, dtype: torch.dtype | str = torch.float32,
                  device: str | torch.device = "cpu"):
    """``EmoForCausalLM`` from an HF directory (its own modeling files), in eval mode.

    Args:
        hf_dir: EMO HF directory.
        dtype: compute dtype (``float32`` by default: scores are compared across experts).
        device: e.g. ``cpu`` or ``cuda``; inputs are moved to the model's device.
    """
    from transformers import AutoModelForCausalLM

    read_emo_config(hf_dir)
    if isinstance(dtype, str):
        dtype = dtype_from_name(dtype)
    model = AutoModelForCausalLM.from_pretrained(hf_dir, trust_remote_code=True,
                                                 dtype=dtype)
    return model.to(device).eval()


@dataclass
class Examples:
    """Calibration examples as token-id lists, with the provenance written to selection.json."""

    sequences: list[list[int]]
    sha256: str
    path: str

    @property
    def num_tokens(self) -> int:
        """Total number of tokens over all sequences."""
        return sum(len(s) for s in self.sequences)


def _has_tokenizer(hf_dir: str) -> bool:
    return any(os.path.isfile(os.path.join(hf_dir, f))
               for f in ("tokenizer.json", "tokenizer.model", "vocab.json"))


def load_tokenizer(path: str):
    """An HF tokenizer from an HF directory or a sentencepiece ``.model`` file.

    A directory with ``tokenizer.json`` / ``tokenizer_config.json`` loads with ``AutoTokenizer``.
    A bare sentencepiece model (``tools/train_tokenizer.py``, copied by ``to-hf --tokenizer
    X.model`` as ``tokenizer.model``) loads as the slow ``LlamaTokenizer`` in legacy mode without
    BOS/EOS, which encodes exactly as ``SentencePieceProcessor.encode`` (Megatron's
    ``SentencePieceTokenizer``); the fast converter does not (it rewrites whitespace).

    Raises:
        ValueError: ``path`` holds no tokenizer.
    """
    from transformers import AutoTokenizer, LlamaTokenizer

    if os.path.isfile(path):
        if not path.endswith(".model"):
            raise ValueError(f"tokenizer file {path} is not a sentencepiece .model file")
        spm_file = path
    elif not os.path.isdir(path):
        raise ValueError(f"tokenizer {path} is neither a directory nor a sentencepiece .model")
    elif any(os.path.isfile(os.path.join(path, f))
             for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json")):
        return AutoTokenizer.from_pretrained(path)
    elif os.path.isfile(os.path.join(path, "tokenizer.model")):
        spm_file = os.path.join(path, "tokenizer.model")
    else:
        raise ValueError(f"{path} has no tokenizer files (tokenizer.json, tokenizer_config.json, "
                         f"tokenizer.model); export with --tokenizer or pass a tokenizer")
    return LlamaTokenizer(spm_file, legacy=True, add_bos_token=False, add_eos_token=False)


def subsample_indices(num_items: int, num_examples: int | None, seed: int) -> list[int]:
    """``num_examples`` of ``range(num_items)`` (ascending), chosen by a seeded permutation.

    ``torch.randperm`` with ``torch.Generator().manual_seed(seed)`` as the reference's selection
    scripts; None or a count >= ``num_items`` keeps everything.

    Raises:
        ValueError: ``num_examples`` below 1.
    """
    if num_examples is None or num_examples >= num_items:
        return list(range(num_items))
    if num_examples < 1:
        raise ValueError(f"num_examples must be at least 1, got {num_examples}")
    perm = torch.randperm(num_items, generator=torch.Generator().manual_seed(seed))
    return sorted(int(i) for i in perm[:num_examples])


def _checked_ids(ids: list[int], vocab_size: int, where: str, detail: str = "") -> list[int]:
    """Returns ``ids`` after refusing an empty sequence or ids outside ``[0, vocab_size)``."""
    if not ids:
        raise ValueError(f"{where} has no tokens{detail}")
    bad = [t for t in ids if not 0 <= t < vocab_size]
    if bad:
        raise ValueError(f"{where}: token ids {bad[:5]} outside the vocabulary [0, {vocab_size})")
    return ids


def examples_from_texts(texts: list[str], tokenizer, *, vocab_size: int, max_length: int,
                        source: str) -> Examples:
    """Tokenises calibration texts (no special tokens) into ``Examples``.

    Raises:
        ValueError: no texts, an empty tokenisation, ids outside the vocabulary.
    """
    if not texts:
        raise ValueError(f"{source} gives no calibration texts (need at least 1)")
    sequences = []
    for i, text in enumerate(texts):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        where = f"{source} text {i}"
        sequences.append(_checked_ids(ids, vocab_size, where, f": {text[:60]!r}")[:max_length])
    sha = hashlib.sha256("\x00".join(texts).encode("utf-8")).hexdigest()
    return Examples(sequences, sha, source)


def load_examples(path: str, hf_dir: str, *, max_length: int | None = None,
                  tokenizer: str | None = None) -> Examples:
    """Reads a JSONL file of ``{"text": ...}`` or ``{"tokens": [...]}`` records.

    ``text`` is tokenised with ``tokenizer`` (an HF directory or sentencepiece ``.model``) or
    else the tokenizer stored in ``hf_dir``. Sequences are truncated to ``max_length`` (default:
    the model's ``max_position_embeddings``).

    Raises:
        ValueError: empty file, a record with neither field, text without a tokenizer, token ids
            outside the vocabulary.
    """
    cfg = read_emo_config(hf_dir)
    max_length = max_length or cfg.get("max_position_embeddings", 4096)
    vocab = cfg["vocab_size"]
    raw = open(path, "rb").read()
    sha = hashlib.sha256(raw).hexdigest()
    tokenizer_path = tokenizer
    tokenizer = None
    sequences = []
    for lineno, line in enumerate(raw.decode("utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} line {lineno} is not valid JSON: {e}") from e
        if isinstance(rec, dict) and "tokens" in rec:
            ids = [int(t) for t in rec["tokens"]]
        elif isinstance(rec, dict) and "text" in rec:
            if tokenizer is None:
                if tokenizer_path is None and not _has_tokenizer(hf_dir):
                    raise ValueError(
                        f"{path} line {lineno} has 'text' but the checkpoint {hf_dir} has no "
                        f"tokenizer files (tokenizer.json / tokenizer.model); pass pre-tokenised "
                        f"'tokens' lists or export with --tokenizer")
                tokenizer = load_tokenizer(tokenizer_path or hf_dir)
            ids = tokenizer(rec["text"])["input_ids"]
        else:
            raise ValueError(f"{path} line {lineno} has neither 'text' nor 'tokens'")
        sequences.append(_checked_ids(ids, vocab, f"{path} line {lineno}")[:max_length])
    if not sequences:
        raise ValueError(f"examples file {path} has no records (need at least 1)")
    return Examples(sequences, sha, os.path.abspath(path))
