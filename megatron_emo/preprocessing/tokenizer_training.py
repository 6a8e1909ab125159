"""Trains a sentencepiece tokenizer on JSONL(.gz) for Megatron's ``SentencePieceTokenizer``.

Special ids are fixed so that Megatron reports ``eod = eos_id() = 2`` and ``pad = pad_id() = 3``
(``unk = 0``, ``bos = 1``). Text is streamed through ``sentence_iterator``; nothing is staged on
disk. CLI: ``python tools/train_tokenizer.py --input data/*.jsonl.gz --vocab-size 8192
--output-prefix P``.
"""

from __future__ import annotations

import gzip
import io
import json
import os
from collections.abc import Iterator, Sequence
from typing import Literal

__all__ = ["SPECIAL_IDS", "iter_training_sentences", "train_sentencepiece"]

# Megatron's SentencePieceTokenizer (non-legacy) reads eod from eos_id() and pad from pad_id().
SPECIAL_IDS = {"unk_id": 0, "bos_id": 1, "eos_id": 2, "pad_id": 3}
SPECIAL_PIECES = {"unk_piece": "<unk>", "bos_piece": "<s>", "eos_piece": "</s>",
                  "pad_piece": "<pad>"}


def iter_training_sentences(paths: Sequence[str], *, json_key: str = "text",
                            max_sentences: int = 1_000_000,
                            max_sentence_bytes: int = 4096) -> Iterator[str]:
    """Yields training "sentences": paragraphs of each record's text, in file order.

    Paragraphs (split on blank lines, newlines kept) are cut to ``max_sentence_bytes`` so that
    sentencepiece does not drop them. Bad lines (invalid JSON, missing or non-string key) are
    ignored here; ``preprocess_jsonl`` reports them.

    Args:
        paths: JSONL or JSONL.gz files.
        json_key: record key holding the text.
        max_sentences: stop after this many sentences.
        max_sentence_bytes: cut longer paragraphs at this many UTF-8 bytes.
    """
    count = 0
    for path in paths:
        opener = gzip.open if path.endswith(".gz") else open
        with opener(path, "rt", encoding="utf-8", errors="replace") as f:
            for line in f:
                try:
                    text = json.loads(line).get(json_key)
                except (ValueError, AttributeError):
                    continue
                if not isinstance(text, str):
                    continue
                for paragraph in text.split("\n\n"):
                    paragraph = paragraph.strip("\n")
                    if not paragraph.strip():
                        continue
                    data = paragraph.encode("utf-8")
                    if len(data) > max_sentence_bytes:
                        paragraph = data[:max_sentence_bytes].decode("utf-8", errors="ignore")
                    yield paragraph
                    count += 1
                    if count >= max_sentences:
                        return


def train_sentencepiece(
    inputs: Sequence[str],
    *,
    output_prefix: str,
    vocab_size: int,
    model_type: Literal["bpe", "unigram"] = "bpe",
    json_key: str = "text",
    max_sentences: int = 1_000_000,
    character_coverage: float = 0.9995,
    byte_fallback: bool = True,
    num_threads: int = 1,
) -> str:
    r"""Trains ``{output_prefix}.model`` and ``.vocab``; same input and flags give the same bytes.

    Whitespace is kept as is (identity normalization, no whitespace collapsing) so code keeps its
    indentation, and ``"\n"`` is a user-defined piece. With ``byte_fallback`` no text maps to
    ``<unk>``.

    Args:
        inputs: JSONL(.gz) files or globs.
        output_prefix: path prefix of the model files.
        vocab_size: number of pieces, special pieces included.
        model_type: sentencepiece algorithm.
        json_key: record key holding the text.
        max_sentences: cap on training paragraphs (memory/time bound).
        character_coverage: sentencepiece ``character_coverage``.
        byte_fallback: add the 256 byte pieces (needs ``vocab_size`` > 260 + characters).
        num_threads: trainer threads (1 keeps the result reproducible across machines).

    Returns:
        The path of the ``.model`` file.

    Raises:
        ValueError: on a bad ``vocab_size``/``model_type`` or when the inputs hold no text.
    """
    import sentencepiece as spm

    from megatron_emo.preprocessing.preprocess import expand_inputs

    if model_type not in ("bpe", "unigram"):
        raise ValueError(f"model_type ({model_type!r}) must be 'bpe' or 'unigram'")
    min_vocab = len(SPECIAL_IDS) + 1 + (256 if byte_fallback else 0)
    if vocab_size <= min_vocab:
        raise ValueError(f"vocab_size ({vocab_size}) must be > {min_vocab} (special pieces"
                         + (" + 256 byte pieces)" if byte_fallback else ")"))
    paths = expand_inputs(inputs)
    sentences = iter_training_sentences(paths, json_key=json_key, max_sentences=max_sentences)
    first = next(sentences, None)
    if first is None:
        raise ValueError(f"no {json_key!r} text found in {paths}")

    def _all_sentences() -> Iterator[str]:
        yield first
        yield from sentences

    os.makedirs(os.path.dirname(os.path.abspath(output_prefix)), exist_ok=True)
    # The trainer stores model_prefix inside the model file; training in memory (no prefix) keeps
    # the bytes independent of the output path. .model/.vocab are then written here.
    model_bytes = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=_all_sentences(),
        model_writer=model_bytes,
        vocab_size=vocab_size,
        model_type=model_type,
        character_coverage=character_coverage,
        byte_fallback=byte_fallback,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        split_digits=True,
        user_defined_symbols=["\n"],
        max_sentence_length=1 << 16,
        input_sentence_size=max_sentences,
        shuffle_input_sentence=False,
        num_threads=num_threads,
        hard_vocab_limit=False,
        minloglevel=2,
        **SPECIAL_IDS,
        **SPECIAL_PIECES,
    )
    model_path = output_prefix + ".model"
    with open(model_path + ".partial", "wb") as f:
        f.write(model_bytes.getvalue())
    os.replace(model_path + ".partial", model_path)
    processor = spm.SentencePieceProcessor(model_file=model_path)
    with open(output_prefix + ".vocab", "w", encoding="utf-8") as f:
        for i in range(processor.get_piece_size()):
            f.write(f"{processor.id_to_piece(i)}\t{processor.get_score(i):g}\n")
    return model_path
