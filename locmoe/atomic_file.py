"""Atomic file writes: a reader (or a crash) never sees a partial file."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temporary path in ``path``'s folder for a writer that takes a file name (``save_file``); when
    the block ends without error the file is fsynced and renamed over ``path`` (atomic on POSIX), on
    any error it is removed and ``path`` is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(handle, 0o666 & ~_umask())  # mkstemp makes 0600 files; give the usual permissions
        os.close(handle)
        yield Path(temp_name)
        handle = os.open(temp_name, os.O_RDONLY)
        try:
            os.fsync(handle)
        finally:
            os.close(handle)
        os.replace(temp_name, path)
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through :func:`atomic_path`: a reader (or a crash) never sees a partial
    file; on any error ``path`` is untouched."""
    with atomic_path(path) as temp:
        temp.write_bytes(data)
