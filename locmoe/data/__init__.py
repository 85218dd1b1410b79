"""Data: the embedded corpus and opt-in corpora, the byte-level BPE tokenizer, fixed-order batches."""

from locmoe.data.corpus import Corpus, load_corpus, split_text
from locmoe.data.dataset import PreparedData, prepare_data
from locmoe.data.loader import BatchLoader, validation_batches
from locmoe.data.tokenizer import BPETokenizer, train_tokenizer

__all__ = [
    "BPETokenizer",
    "BatchLoader",
    "Corpus",
    "PreparedData",
    "load_corpus",
    "prepare_data",
    "split_text",
    "train_tokenizer",
    "validation_batches",
]
