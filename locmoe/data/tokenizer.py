"""Byte-level BPE tokenizer (HF ``tokenizers``), trained on the corpus at first use and cached.

Byte-level: the text's UTF-8 bytes are mapped to 256 base symbols before merging (GPT-2's scheme),
so any string encodes without unknown tokens and ``decode(encode(text)) == text`` exactly. Nothing
is downloaded: the tokenizer is trained locally on the training split and stored as
``<cache>/tokenizers/<key>/tokenizer.json``, the key hashing the corpus sha256, the vocabulary size
and the split settings. No special tokens (ours): documents are concatenated as plain text.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from locmoe.atomic_file import write_atomic

FORMAT_VERSION = 1  # bump when the training recipe changes, so old cache entries are not reused
MIN_PAIR_FREQUENCY = 2  # a pair seen once is not worth a merge (HF's usual setting)


class BPETokenizer:
    """Thin wrapper: ``encode(str) -> list[int]``, ``decode(ids) -> str``, ``vocab_size``."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer

    @property
    def vocab_size(self) -> int:
        """Number of ids actually in use (at most the requested size; smaller on tiny corpora)."""
        return self.tokenizer.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text).ids

    def encode_blocks(self, blocks: Sequence[str]) -> np.ndarray:
        """Encode each block (in parallel) and concatenate: ``(N,)`` int32."""
        encodings = self.tokenizer.encode_batch(list(blocks))
        pieces = [np.asarray(e.ids, dtype=np.int32) for e in encodings]
        return np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int32)

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids))

    def to_json(self) -> str:
        return self.tokenizer.to_str()

    @property
    def fingerprint(self) -> str:
        """sha256 of the serialised tokenizer (keys caches of encoded text)."""
        return hashlib.sha256(self.to_json().encode("utf-8")).hexdigest()

    @classmethod
    def from_file(cls, path: str | Path) -> BPETokenizer:
        return cls(Tokenizer.from_file(str(path)))

    @classmethod
    def from_json(cls, text: str) -> BPETokenizer:
        return cls(Tokenizer.from_str(text))


def train_tokenizer(blocks: Sequence[str], vocab_size: int) -> BPETokenizer:
    """Train a byte-level BPE with ``vocab_size`` ids (256 byte symbols + merges) on ``blocks``."""
    if vocab_size < 256:
        raise ValueError(f"vocab_size={vocab_size} is invalid; allowed: an integer >= 256 (the byte alphabet)")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=MIN_PAIR_FREQUENCY,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
        show_progress=False,
    )
    tokenizer.train_from_iterator(blocks, trainer=trainer, length=len(blocks))
    return BPETokenizer(tokenizer)


def tokenizer_key(corpus_sha256: str, vocab_size: int, split: str) -> str:
    """Cache key: corpus hash, vocabulary size, the split it was trained on, and the recipe version."""
    material = f"v{FORMAT_VERSION}:{corpus_sha256}:{vocab_size}:{split}"
    return f"bpe{vocab_size}-{hashlib.sha256(material.encode()).hexdigest()[:16]}"


def load_or_train(
    blocks: Sequence[str], corpus_sha256: str, vocab_size: int, split: str, cache_dir: Path
) -> BPETokenizer:
    """The cached tokenizer for this corpus/vocabulary/split, trained on ``blocks`` and cached if absent."""
    path = cache_dir / "tokenizers" / tokenizer_key(corpus_sha256, vocab_size, split) / "tokenizer.json"
    if path.is_file():
        try:
            return BPETokenizer.from_file(path)
        except Exception:  # a damaged cache entry is rebuilt, never trusted
            path.unlink(missing_ok=True)
    tokenizer = train_tokenizer(blocks, vocab_size)
    write_atomic(path, tokenizer.to_json().encode("utf-8"))
    return tokenizer
