"""Atomic file writes: nothing half-written is ever left under a file's final name.

`atomic_write(path, write)` lets `write` fill a temporary file beside `path` (same directory, so
the same filesystem), fsyncs it and renames it onto `path` with `os.replace`; on any error the
temporary file is removed and `path` keeps its previous content (or stays absent).
"""

from __future__ import annotations

import os
import pathlib
import tempfile
from typing import Callable


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> pathlib.Path:
    """Call `write(tmp_path)` on a temp file beside `path`, fsync it, then rename onto `path`."""
    path = pathlib.Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600
        os.replace(tmp, path)
    except BaseException:
        pathlib.Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> pathlib.Path:
    """`atomic_write` of a UTF-8 text file."""
    return atomic_write(path, lambda tmp: pathlib.Path(tmp).write_text(text, encoding="utf-8"))
