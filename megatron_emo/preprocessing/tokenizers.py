"""Builds tokenizers as ``megatron.training`` does for ``--tokenizer-type/--tokenizer-model``.

The preprocessor must append the same EOD id that training later looks for, so it builds its
tokenizer with Megatron's own ``megatron.core.tokenizers.utils.build_tokenizer`` from a namespace
holding Megatron's ``TokenizerConfig`` defaults.
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

__all__ = [
    "SUPPORTED_TOKENIZER_TYPES",
    "build_tokenizer",
    "build_tokenizer_from_args",
    "tokenizer_args",
    "tokenizer_eod_id",
]

# The tokenizer types that read a --tokenizer-model file or directory. Megatron supports more
# (GPT2BPETokenizer with --vocab-file/--merge-file, NullTokenizer); they are passed through.
SUPPORTED_TOKENIZER_TYPES = (
    "SentencePieceTokenizer",
    "GPTSentencePieceTokenizer",
    "Llama2Tokenizer",
    "HuggingFaceTokenizer",
    "TikTokenizer",
    "GPT2BPETokenizer",
    "NullTokenizer",
)


def _tokenizer_config_defaults() -> dict[str, Any]:
    """Returns megatron.training's ``TokenizerConfig`` defaults (the flags' argparse defaults)."""
    try:
        from megatron.training.config.training_config import TokenizerConfig
    except ImportError:  # pragma: no cover - megatron.training is part of the pinned wheel
        return {
            "vocab_size": None, "vocab_file": None, "merge_file": None, "metadata_path": None,
            "special_tokens": None, "tiktoken_pattern": None, "tiktoken_num_special_tokens": 1000,
            "tokenizer_sentencepiece_legacy": False,
            "tokenizer_sentencepiece_ignore_extra_whitespaces": True,
            "tokenizer_hf_no_use_fast": False, "tokenizer_hf_no_include_special_tokens": False,
            "trust_remote_code": False, "null_tokenizer_eod_id": None,
            "null_tokenizer_pad_id": -1, "chat_template": None,
        }
    return {f.name: f.default for f in dataclasses.fields(TokenizerConfig)
            if f.default is not dataclasses.MISSING}


def tokenizer_args(tokenizer_type: str, tokenizer_model: str | None, **overrides: Any
                   ) -> argparse.Namespace:
    """Returns the namespace ``build_tokenizer`` reads, as ``megatron.training`` would parse it.

    Args:
        tokenizer_type: Megatron ``--tokenizer-type``, e.g. ``SentencePieceTokenizer``.
        tokenizer_model: Megatron ``--tokenizer-model`` (a ``.model`` file or an HF directory).
        **overrides: other ``TokenizerConfig`` fields (``vocab_file``, ``merge_file``, ...).

    Returns:
        A namespace with every ``TokenizerConfig`` field; vocab padding is off (preprocessing
        never needs the padded size).
    """
    values = _tokenizer_config_defaults()
    values.update(tokenizer_type=tokenizer_type, tokenizer_model=tokenizer_model)
    values.update(overrides)
    values["pad_vocab_size"] = False
    return argparse.Namespace(**values)


def build_tokenizer(tokenizer_type: str, tokenizer_model: str | None, **overrides: Any):
    """Builds a Megatron tokenizer the way ``megatron.training`` does for the same flags.

    Args:
        tokenizer_type: Megatron ``--tokenizer-type``.
        tokenizer_model: Megatron ``--tokenizer-model``.
        **overrides: other ``TokenizerConfig`` fields.

    Returns:
        A ``megatron.core.tokenizers`` tokenizer with ``tokenize``, ``eod``, ``pad`` and
        ``vocab_size``.

    Raises:
        ValueError: if the type is unknown to Megatron or the model path is missing.
    """
    return build_tokenizer_from_args(tokenizer_args(tokenizer_type, tokenizer_model, **overrides))


def build_tokenizer_from_args(args: argparse.Namespace):
    """Builds a tokenizer from a full :func:`tokenizer_args` namespace.

    Unlike :func:`build_tokenizer` this does not import ``megatron.training`` (worker start-up).
    """
    from megatron.core.tokenizers.utils.build_tokenizer import build_tokenizer as mcore_build

    return mcore_build(args)


def tokenizer_eod_id(tokenizer) -> int | None:
    """Returns the tokenizer's EOD id, or ``None`` when it has none.

    Megatron's sentencepiece wrapper reports ``eos_id()`` as ``eod``, which is ``-1`` for models
    trained without an EOS piece; that counts as "no EOD".
    """
    try:
        eod = tokenizer.eod
    except (AttributeError, NotImplementedError, IndexError, KeyError):
        return None
    if eod is None or int(eod) < 0:
        return None
    return int(eod)
