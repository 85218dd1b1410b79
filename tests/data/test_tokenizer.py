"""The byte-level BPE tokenizer: exact round trip, vocabulary size, determinism, the on-disk cache."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tiny_runs import TINY_DATA, cache_dir  # noqa: F401  (session fixture)

from locmoe.config import DataConfig
from locmoe.data import tokenizer as tokenizer_module
from locmoe.data.corpus import load_corpus, split_text
from locmoe.data.dataset import prepare_data
from locmoe.data.tokenizer import load_or_train, tokenizer_key, train_tokenizer


@pytest.fixture(scope="module")
def blocks() -> list[str]:
    text = load_corpus("python-docs", max_chars=60_000).text
    return split_text(text, 0.05, 2048)[0]


@pytest.fixture(scope="module")
def tokenizer(blocks):
    return train_tokenizer(blocks, 400)


SAMPLES = [
    "",
    "def f(x):\n    return x ** 2  # square\n",
    "   leading spaces, trailing tabs\t\t\n\n\n",
    "Ünïcödé, 中文, emoji 🙂🚀, RTL עברית, combining e\u0301",
    "\x00\x01 control \x7f bytes and \r\n line ends",
    ".. note::\n\n   :func:`os.path.join` — reST markup",
]


@pytest.mark.parametrize("text", SAMPLES)
def test_decode_encode_round_trips_exactly(tokenizer, text):
    assert tokenizer.decode(tokenizer.encode(text)) == text


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.text(max_size=200))
def test_round_trip_on_arbitrary_unicode(tokenizer, text):
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_vocabulary_has_the_requested_size_and_compresses(tokenizer, blocks):
    assert tokenizer.vocab_size == 400
    ids = tokenizer.encode_blocks(blocks)
    assert ids.dtype == np.int32 and ids.min() >= 0 and ids.max() < 400
    text = "".join(blocks)
    assert len(ids) < 0.6 * len(text.encode())  # merges learned: well under one token per byte
    with pytest.raises(ValueError, match="vocab_size"):
        train_tokenizer(blocks, 100)


def test_training_is_deterministic(tokenizer, blocks):
    assert train_tokenizer(blocks, 400).to_json() == tokenizer.to_json()


def test_cached_tokenizer_is_reused_and_keyed_by_corpus_and_vocab(blocks, tmp_path, monkeypatch):
    first = load_or_train(blocks, "sha-a", 300, "split", tmp_path)
    path = tmp_path / "tokenizers" / tokenizer_key("sha-a", 300, "split") / "tokenizer.json"
    assert path.is_file()

    def no_training(*args, **kwargs):
        raise AssertionError("trained again instead of using the cache")

    monkeypatch.setattr(tokenizer_module, "train_tokenizer", no_training)
    assert load_or_train(blocks, "sha-a", 300, "split", tmp_path).to_json() == first.to_json()
    assert len({tokenizer_key("sha-a", 300, "s"), tokenizer_key("sha-b", 300, "s"), tokenizer_key("sha-a", 301, "s"),
                tokenizer_key("sha-a", 300, "t")}) == 4


def test_damaged_cache_entry_is_rebuilt(blocks, tmp_path):
    first = load_or_train(blocks, "sha", 300, "split", tmp_path)
    path = tmp_path / "tokenizers" / tokenizer_key("sha", 300, "split") / "tokenizer.json"
    path.write_text(path.read_text()[:100])
    assert load_or_train(blocks, "sha", 300, "split", tmp_path).to_json() == first.to_json()


def test_prepared_token_streams_decode_to_the_split_text(cache_dir):  # noqa: F811
    config = DataConfig(cache_dir=str(cache_dir), **TINY_DATA)
    data = prepare_data(config)
    train_blocks, validation_blocks = split_text(
        load_corpus("python-docs", max_chars=config.max_chars).text, config.validation_fraction,
        config.split_block_chars,
    )
    assert data.tokenizer.decode(data.train_ids.tolist()) == "".join(train_blocks)
    assert data.tokenizer.decode(data.validation_ids.tolist()) == "".join(validation_blocks)
    again = prepare_data(config)  # from the cache
    assert np.array_equal(again.train_ids, data.train_ids) and np.array_equal(again.validation_ids, data.validation_ids)
