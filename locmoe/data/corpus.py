"""Corpora: the embedded Python docs, the opt-in Linux docs, or any text file or folder.

The embedded default, ``python-docs``, is the reST sources of the Python 3.11 documentation
(Debian ``python3.11-doc``, PSF licence; see ``corpora/LICENSE-PSF.txt`` and
``build_python_docs.sh``), stored xz-compressed beside this file and checked against the sha256 in
``corpora/SHA256SUMS`` on every load. ``linux-docs`` (all of the kernel's ``Documentation/``) and
``linux-docs-networking`` (its ``networking/`` subset, a domain corpus) are GPL-2 and never shipped:
``fetch_linux_docs.sh`` puts them in the cache, with their own ``SHA256SUMS``, on their first use.

The train/validation split (:func:`split_text`) is ours: the text is cut at line ends into blocks
of about ``block_chars`` characters, and a fixed, evenly spread fraction of the blocks is held out,
so validation covers every part of the corpus without depending on any random state.
"""

from __future__ import annotations

import hashlib
import lzma
import math
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

CORPORA_DIR = Path(__file__).resolve().parent / "corpora"
EMBEDDED = "python-docs"
EMBEDDED_FILE = "python-3.11-docs.txt"
LINUX = ("linux-docs", "linux-docs-networking")
FETCH_SCRIPT = Path(__file__).resolve().parent / "fetch_linux_docs.sh"
FETCH_TIMEOUT_S = 900  # the package is about 40 MB


@dataclass(frozen=True)
class Corpus:
    """A loaded corpus: its name, its text and the sha256 of the text's UTF-8 bytes."""

    name: str
    text: str
    sha256: str

    @property
    def num_chars(self) -> int:
        return len(self.text)


def default_cache_dir() -> Path:
    """``$LOCMOE_CACHE_DIR``, else ``$XDG_CACHE_HOME/locmoe``, else ``~/.cache/locmoe``."""
    if os.environ.get("LOCMOE_CACHE_DIR"):
        return Path(os.environ["LOCMOE_CACHE_DIR"])
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]) / "locmoe"
    return Path.home() / ".cache" / "locmoe"


def resolve_cache_dir(cache_dir: str | Path | None) -> Path:
    return Path(cache_dir) if cache_dir else default_cache_dir()


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def read_sha256sums(path: Path) -> dict[str, str]:
    """Parse a ``sha256sum`` listing: file name -> hex digest."""
    sums = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        digest, _, name = line.strip().partition(" ")
        if digest and name:
            sums[name.strip().lstrip("*")] = digest.lower()
    return sums


def _checked(name: str, data: bytes, expected: str | None, where: Path) -> str:
    digest = sha256_hex(data)
    if expected is None:
        raise ValueError(f"corpus {name!r}: no sha256 for it in {where}")
    if digest != expected:
        raise ValueError(
            f"corpus {name!r} is corrupt: sha256 {digest[:16]}... != {expected[:16]}... listed in {where}"
        )
    return digest


def load_embedded() -> Corpus:
    """The embedded Python 3.11 docs, decompressed and checked against ``corpora/SHA256SUMS``."""
    sums_path = CORPORA_DIR / "SHA256SUMS"
    compressed = CORPORA_DIR / f"{EMBEDDED_FILE}.xz"
    if not compressed.is_file() or not sums_path.is_file():
        raise ValueError(f"the embedded corpus is missing from {CORPORA_DIR}; reinstall locmoe")
    try:
        data = lzma.decompress(compressed.read_bytes())
    except lzma.LZMAError as error:
        raise ValueError(f"the embedded corpus {compressed} cannot be decompressed: {error}") from None
    digest = _checked(EMBEDDED, data, read_sha256sums(sums_path).get(EMBEDDED_FILE), sums_path)
    return Corpus(EMBEDDED, data.decode("utf-8"), digest)


class CorpusUnavailable(ValueError):
    """An opt-in corpus is not in the cache and cannot be fetched; the message is one line saying why."""


def fetch_linux_docs(cache_dir: str | Path | None = None) -> None:
    """Fetch both Linux corpora into ``cache_dir`` with ``fetch_linux_docs.sh`` (Debian ``linux-doc``,
    GPL-2; needs ``apt-get`` and a Debian archive). ``CorpusUnavailable`` when that fails: nothing
    half-written stays behind (the script builds and checks every file in a work folder, then moves
    them into the cache, the checksums last)."""
    folder = resolve_cache_dir(cache_dir)
    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        raise CorpusUnavailable(
            "the Linux docs corpus cannot be fetched here: it comes from Debian's linux-doc package and needs "
            "apt-get and dpkg-deb, which this machine lacks"
        )
    print(f"fetching the Linux docs corpus (Debian linux-doc, GPL-2) into {folder / 'corpora'} ...", file=sys.stderr)
    try:
        done = subprocess.run(["sh", str(FETCH_SCRIPT), str(folder)], capture_output=True, text=True, check=False,
                              timeout=FETCH_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise CorpusUnavailable(f"the Linux docs corpus (Debian linux-doc) was not fetched within {FETCH_TIMEOUT_S} s; "
                                "check the network and the apt sources") from None
    if done.returncode != 0:
        reasons = [line.strip() for line in (done.stderr + done.stdout).splitlines() if line.strip()]
        errors = [line for line in reasons if line.startswith(("E:", "fetch_linux_docs.sh:"))] or reasons
        reason = errors[-1] if errors else f"exit status {done.returncode}"
        hint = " (apt-get update may help)" if "Unable to locate package" in reason else ""
        raise CorpusUnavailable(f"the Linux docs corpus (Debian linux-doc) cannot be fetched: {reason}{hint}")


def load_linux(name: str, cache_dir: str | Path | None = None, fetch: bool = True) -> Corpus:
    """``linux-docs`` or ``linux-docs-networking`` from the cache; when it is not there and ``fetch``,
    fetch it first (:func:`fetch_linux_docs`), else ``CorpusUnavailable``."""
    folder = resolve_cache_dir(cache_dir) / "corpora"
    path = folder / f"{name}.txt"
    sums = folder / "SHA256SUMS"
    if fetch and not (path.is_file() and sums.is_file()):
        fetch_linux_docs(folder.parent)
    if not path.is_file():
        raise CorpusUnavailable(
            f"corpus {name!r} is not in the cache {folder}; fetch it (GPL-2, Debian linux-doc) with: "
            f"sh {FETCH_SCRIPT} {folder.parent}"
        )
    data = path.read_bytes()
    digest = _checked(name, data, read_sha256sums(sums).get(path.name) if sums.is_file() else None, sums)
    return Corpus(name, data.decode("utf-8", errors="replace"), digest)


def _text_files(folder: Path) -> list[Path]:
    """Regular files under ``folder`` (hidden entries skipped), in C-locale order of their path."""
    files = []
    for root, dirs, names in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        files += [Path(root) / n for n in names if not n.startswith(".")]
    return sorted((f for f in files if f.is_file()), key=lambda f: f.relative_to(folder).as_posix().encode())


def load_path(path: str | Path) -> Corpus:
    """A plain-text file, or every text file under a folder concatenated in path order.

    Bytes that are not UTF-8 are replaced; files containing NUL bytes are taken for binary and skipped.
    """
    path = Path(path)
    if path.is_file():
        files = [path]
    elif path.is_dir():
        files = _text_files(path)
    else:
        names = ", ".join((EMBEDDED, *LINUX))
        raise ValueError(f"corpus {str(path)!r} is neither an existing file or folder nor one of: {names}")
    chunks = [data for data in (f.read_bytes() for f in files) if b"\0" not in data]
    text = b"".join(chunks).decode("utf-8", errors="replace")
    if not text.strip():
        raise ValueError(f"corpus path {str(path)!r} holds no text")
    return Corpus(str(path), text, sha256_hex(text.encode("utf-8")))


def load_corpus(corpus: str, cache_dir: str | Path | None = None, max_chars: int = 0) -> Corpus:
    """Load ``corpus`` (a name or a path); ``max_chars`` > 0 keeps the first that many characters.

    The integrity check covers the whole corpus; the returned ``sha256`` is that of the text
    actually returned (it keys the tokenizer cache).
    """
    if corpus == EMBEDDED:
        loaded = load_embedded()
    elif corpus in LINUX:
        loaded = load_linux(corpus, cache_dir)
    else:
        loaded = load_path(corpus)
    if max_chars and max_chars < len(loaded.text):
        text = loaded.text[:max_chars]
        return Corpus(f"{loaded.name}[:{max_chars}]", text, sha256_hex(text.encode("utf-8")))
    return loaded


def split_blocks(text: str, block_chars: int) -> list[str]:
    """Cut ``text`` into consecutive blocks that end at the first line end at or after every
    ``block_chars`` characters (the last block takes the rest). ``"".join`` restores the text."""
    blocks = []
    start = 0
    while start < len(text):
        cut = text.find("\n", start + block_chars - 1)
        end = len(text) if cut < 0 else cut + 1
        blocks.append(text[start:end])
        start = end
    return blocks


def is_validation_block(index: int, fraction: float) -> bool:
    """Block ``index`` is held out iff ``floor((i + 1)·f) > floor(i·f)``: exactly ``floor(N·f)`` of
    the first ``N`` blocks, evenly spread (for f = 0.05: blocks 19, 39, 59, ...)."""
    return math.floor((index + 1) * fraction) > math.floor(index * fraction)


def split_text(text: str, validation_fraction: float, block_chars: int) -> tuple[list[str], list[str]]:
    """Deterministic split into ``(train_blocks, validation_blocks)``.

    A corpus too small to yield one validation block holds out its last block instead, so both
    splits are non-empty whenever the text has at least two blocks.
    """
    blocks = split_blocks(text, block_chars)
    if len(blocks) < 2:
        raise ValueError(
            f"the corpus ({len(text)} characters) is too small to split into train and validation "
            f"blocks of {block_chars} characters; lower split_block_chars or use more text"
        )
    held_out = [is_validation_block(i, validation_fraction) for i in range(len(blocks))]
    if not any(held_out):
        held_out[-1] = True
    train = [b for b, v in zip(blocks, held_out, strict=True) if not v]
    validation = [b for b, v in zip(blocks, held_out, strict=True) if v]
    return train, validation
