"""The corpora: the embedded Python docs and its integrity check, paths, the opt-in Linux docs, the split."""

from __future__ import annotations

import hashlib
import lzma
import os
import random

import pytest

from locmoe.data import corpus as corpus_module
from locmoe.data.corpus import (
    CORPORA_DIR,
    EMBEDDED,
    is_validation_block,
    load_corpus,
    load_embedded,
    load_path,
    split_blocks,
    split_text,
)

EMBEDDED_SHA256 = "4f69e6115088c2444e0059d0973967db9dbc27ae3405343e26fac074aa501701"
EMBEDDED_BYTES = 11_048_275


def test_embedded_corpus_matches_its_recorded_sha256():
    corpus = load_embedded()
    data = corpus.text.encode("utf-8")
    assert len(data) == EMBEDDED_BYTES
    assert hashlib.sha256(data).hexdigest() == EMBEDDED_SHA256 == corpus.sha256
    assert (CORPORA_DIR / "SHA256SUMS").read_text().split()[0] == EMBEDDED_SHA256
    assert corpus.text.startswith("=====================\nAbout these documents\n")


def test_licence_and_build_script_ship_beside_the_corpus():
    licence = (CORPORA_DIR / "LICENSE-PSF.txt").read_text()
    assert "PYTHON SOFTWARE FOUNDATION LICENSE VERSION 2" in licence
    script = (CORPORA_DIR.parent / "build_python_docs.sh").read_text()
    assert "apt-get download" in script and "dpkg-deb -x" in script and "sha256sum" in script


def _fake_corpora(tmp_path, text: bytes, listed_sha: str):
    (tmp_path / "python-3.11-docs.txt.xz").write_bytes(lzma.compress(text))
    (tmp_path / "SHA256SUMS").write_text(f"{listed_sha}  python-3.11-docs.txt\n")
    return tmp_path


def test_embedded_corpus_with_wrong_checksum_is_rejected(tmp_path, monkeypatch):
    text = b"some documentation\n" * 10
    monkeypatch.setattr(corpus_module, "CORPORA_DIR", _fake_corpora(tmp_path, text, "0" * 64))
    with pytest.raises(ValueError, match="corrupt"):
        load_corpus(EMBEDDED)
    # The same files with the right checksum load.
    _fake_corpora(tmp_path, text, hashlib.sha256(text).hexdigest())
    assert load_corpus(EMBEDDED).text == text.decode()


def test_truncated_embedded_archive_is_rejected(tmp_path, monkeypatch):
    text = bytes(random.Random(0).getrandbits(8) for _ in range(5000)).hex().encode()
    _fake_corpora(tmp_path, text, hashlib.sha256(text).hexdigest())
    archive = tmp_path / "python-3.11-docs.txt.xz"
    archive.write_bytes(archive.read_bytes()[:-40])
    monkeypatch.setattr(corpus_module, "CORPORA_DIR", tmp_path)
    with pytest.raises(ValueError, match="cannot be decompressed"):
        load_corpus(EMBEDDED)


def test_a_folder_corpus_is_its_text_files_in_path_order(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "z.txt").write_text("third\n")
    (tmp_path / "b" / "a.rst").write_text("second\n")
    (tmp_path / "a.txt").write_text("first\n")
    (tmp_path / ".hidden").write_text("never\n")
    (tmp_path / "image.bin").write_bytes(b"\x89PNG\0\0binary")
    corpus = load_corpus(str(tmp_path))
    assert corpus.text == "first\nsecond\nthird\n"
    assert corpus.sha256 == hashlib.sha256(corpus.text.encode()).hexdigest()
    assert load_path(tmp_path / "a.txt").text == "first\n"


def test_missing_or_empty_corpus_path_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="neither an existing file or folder"):
        load_corpus(str(tmp_path / "nowhere"))
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(ValueError, match="no text"):
        load_corpus(str(tmp_path / "empty.txt"))


def test_linux_docs_are_fetched_on_first_use_and_checked(tmp_path, monkeypatch):
    fetched = []
    monkeypatch.setattr(corpus_module, "fetch_linux_docs", fetched.append)  # no network in tests
    with pytest.raises(ValueError, match="fetch_linux_docs.sh"):  # the fetch wrote nothing: say how to
        load_corpus("linux-docs-networking", cache_dir=tmp_path)
    assert fetched == [tmp_path]
    with pytest.raises(ValueError, match="is not in the cache"):
        corpus_module.load_linux("linux-docs", tmp_path, fetch=False)
    folder = tmp_path / "corpora"
    folder.mkdir()
    text = b"Networking\n==========\n\nsockets and things\n"
    (folder / "linux-docs-networking.txt").write_bytes(text)
    (folder / "SHA256SUMS").write_text(f"{hashlib.sha256(text).hexdigest()}  linux-docs-networking.txt\n")
    assert load_corpus("linux-docs-networking", cache_dir=tmp_path).text == text.decode()
    (folder / "linux-docs-networking.txt").write_bytes(text[:-5])
    with pytest.raises(ValueError, match="corrupt"):
        load_corpus("linux-docs-networking", cache_dir=tmp_path)


def test_max_chars_keeps_a_prefix_and_rehashes(tmp_path):
    (tmp_path / "t.txt").write_text("abcdef\n" * 100)
    corpus = load_corpus(str(tmp_path / "t.txt"), max_chars=20)
    assert corpus.text == ("abcdef\n" * 100)[:20]
    assert corpus.sha256 == hashlib.sha256(corpus.text.encode()).hexdigest()


def _random_text(seed: int, lines: int) -> str:
    rng = random.Random(seed)
    return "".join("x" * rng.randrange(0, 120) + "\n" for _ in range(lines)) + "tail without newline"


@pytest.mark.parametrize("block_chars", [1, 50, 1000])
def test_blocks_end_at_line_ends_and_rebuild_the_text(block_chars):
    text = _random_text(block_chars, 400)
    blocks = split_blocks(text, block_chars)
    assert "".join(blocks) == text
    assert all(b.endswith("\n") for b in blocks[:-1])
    # Each block is the shortest run of whole lines reaching block_chars (the last takes the rest).
    assert all(len(b) >= block_chars for b in blocks[:-1])
    assert all("\n" not in b[block_chars - 1 : -1] for b in blocks[:-1])


def test_split_is_deterministic_disjoint_complete_and_evenly_spread():
    text = _random_text(7, 3000)
    blocks = split_blocks(text, 200)
    train, validation = split_text(text, 0.05, 200)
    assert (train, validation) == split_text(text, 0.05, 200)
    held_out = [i for i in range(len(blocks)) if is_validation_block(i, 0.05)]
    assert validation == [blocks[i] for i in held_out]
    assert train == [b for i, b in enumerate(blocks) if i not in set(held_out)]
    assert len(validation) == int(len(blocks) * 0.05)
    assert held_out[:3] == [19, 39, 59]


def test_a_tiny_corpus_still_gets_a_validation_block():
    train, validation = split_text("one\ntwo\n", 0.05, 2)
    assert train == ["one\n"] and validation == ["two\n"]
    with pytest.raises(ValueError, match="too small"):
        split_text("one line", 0.05, 100)


def _fake_debian(folder, networking: str) -> dict:
    """``apt-get`` and ``dpkg-deb`` stand-ins whose package holds ``Documentation/a.rst`` and, under
    ``networking/``, the file ``networking`` names (``""``: no networking folder); the PATH to use."""
    folder.mkdir()
    (folder / "apt-get").write_text('#!/bin/sh\ncase "$2" in linux-doc) touch linux-doc_1_all.deb ;; '
                                    '*) touch linux-doc-6.1_1_all.deb ;; esac\n')
    docs = '"$3/usr/share/doc/linux-doc-6.1/Documentation"'
    lines = ['#!/bin/sh', 'if [ "$1" = "-f" ]; then echo "linux-doc-6.1 (= 6.1.1)"; exit 0; fi',
             f'mkdir -p {docs}', f"printf 'Sockets\\n' > {docs}/a.rst",
             'echo copyright > "$3/usr/share/doc/linux-doc-6.1/copyright"']
    if networking:
        lines += [f"mkdir -p {docs}/networking", f"printf 'not gzip' > {docs}/networking/{networking}"]
    (folder / "dpkg-deb").write_text("\n".join(lines) + "\n")
    for tool in ("apt-get", "dpkg-deb"):
        (folder / tool).chmod(0o755)
    return {"PATH": f"{folder}:{os.environ['PATH']}"}


@pytest.mark.parametrize(("networking", "reason"), [
    ("", "no folder .*/networking"),                     # a package without the networking docs
    ("b.rst.gz", "could not read the sources under"),    # a damaged gzip
])
def test_a_failed_fetch_says_why_in_one_line_and_leaves_nothing(tmp_path, monkeypatch, networking, reason):
    for key, value in _fake_debian(tmp_path / "bin", networking).items():
        monkeypatch.setenv(key, value)
    with pytest.raises(corpus_module.CorpusUnavailable, match=reason) as failure:
        corpus_module.fetch_linux_docs(tmp_path / "cache")
    assert "\n" not in str(failure.value)
    assert list((tmp_path / "cache" / "corpora").iterdir()) == []  # no corpus, no sums, no .part


def test_a_fetch_writes_both_corpora_and_their_sums(tmp_path, monkeypatch):
    for key, value in _fake_debian(tmp_path / "bin", "c.rst").items():
        monkeypatch.setenv(key, value)
    corpus_module.fetch_linux_docs(tmp_path / "cache")
    assert corpus_module.load_corpus("linux-docs-networking", tmp_path / "cache").text == "not gzip"
    assert corpus_module.load_corpus("linux-docs", tmp_path / "cache").text == "Sockets\nnot gzip"
