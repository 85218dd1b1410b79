"""Corpus -> split -> tokenizer -> token ids of each split, with the ids cached beside the tokenizer.

This is the one entry point the trainer uses: :func:`prepare_data` turns a ``DataConfig`` into the
tokenizer and two ``int32`` token streams. Encoding the full default corpus takes a few seconds, so
the streams are cached as ``.npy`` under ``<cache>/tokens/<key>/`` (key: tokenizer fingerprint and
the split), written atomically; a damaged cache entry is rebuilt.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from locmoe.atomic_file import write_atomic
from locmoe.config import DataConfig
from locmoe.data.corpus import load_corpus, resolve_cache_dir, split_text
from locmoe.data.tokenizer import BPETokenizer, load_or_train


@dataclass(frozen=True)
class PreparedData:
    """A corpus ready to train on."""

    corpus_name: str
    corpus_sha256: str
    num_chars: int
    tokenizer: BPETokenizer
    train_ids: np.ndarray
    validation_ids: np.ndarray


def _split_label(config: DataConfig) -> str:
    return f"val{config.validation_fraction!r}-block{config.split_block_chars}"


def _load_ids(path: Path) -> np.ndarray | None:
    try:
        ids = np.load(path, allow_pickle=False)
    except (OSError, ValueError):
        return None
    return ids if ids.dtype == np.int32 and ids.ndim == 1 else None


def _save_ids(path: Path, ids: np.ndarray) -> None:
    buffer = io.BytesIO()
    np.save(buffer, ids, allow_pickle=False)
    write_atomic(path, buffer.getvalue())


def prepare_data(config: DataConfig, tokenizer: BPETokenizer | None = None) -> PreparedData:
    """Load and check the corpus, split it, get the (cached) tokenizer and the (cached) token ids.

    ``tokenizer``: use this one instead of the corpus's own (e.g. the tokenizer of a model trained on
    another corpus, to continue it on this one: its embeddings index that vocabulary)."""
    return _prepare(config, tokenizer, ("train", "validation"))


def prepare_validation(config: DataConfig, tokenizer: BPETokenizer) -> PreparedData:
    """:func:`prepare_data` for scoring a model: only the validation split is tokenised (``train_ids``
    is empty), with the model's ``tokenizer``; the ids share :func:`prepare_data`'s cache."""
    return _prepare(config, tokenizer, ("validation",))


def _prepare(config: DataConfig, tokenizer: BPETokenizer | None, splits: tuple[str, ...]) -> PreparedData:
    cache_dir = resolve_cache_dir(config.cache_dir)
    corpus = load_corpus(config.corpus, cache_dir, config.max_chars)
    train_blocks, validation_blocks = split_text(corpus.text, config.validation_fraction, config.split_block_chars)
    split = _split_label(config)
    if tokenizer is None:
        tokenizer = load_or_train(train_blocks, corpus.sha256, config.vocab_size, split, cache_dir)
    elif tokenizer.vocab_size != config.vocab_size:
        raise ValueError(
            f"data.vocab_size={config.vocab_size} but the given tokenizer has {tokenizer.vocab_size} ids; "
            f"allowed: {tokenizer.vocab_size}"
        )
    key = hashlib.sha256(f"{tokenizer.fingerprint}:{corpus.sha256}:{split}".encode()).hexdigest()[:16]
    folder = cache_dir / "tokens" / key
    streams = {"train": np.zeros(0, dtype=np.int32)}
    for name, blocks in (("train", train_blocks), ("validation", validation_blocks)):
        if name not in splits:
            continue
        ids = _load_ids(folder / f"{name}.npy")
        if ids is None:
            ids = tokenizer.encode_blocks(blocks)
            _save_ids(folder / f"{name}.npy", ids)
        streams[name] = ids
    return PreparedData(
        corpus.name, corpus.sha256, corpus.num_chars, tokenizer, streams["train"], streams["validation"]
    )
