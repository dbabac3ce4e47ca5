"""Atomic file writes: a temp file in the same folder, fsync, then :func:`os.replace`."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

__all__ = ["write_bytes_atomic", "write_json_atomic"]


def _json_default(obj: Any) -> Any:
    """Encode numpy / torch scalars and arrays (anything with ``tolist``) and paths."""
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    tolist = getattr(obj, "tolist", None)
    if callable(tolist):
        return tolist()
    raise TypeError(f"Object of type {type(obj).__name__} is not JSON serializable")


def _atomic_write(path: str | os.PathLike[str], write: Callable[[IO[bytes]], None]) -> Path:
    """Write through ``write(file)`` into a temp file next to ``path``, then rename over it."""
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    fd, tmp = tempfile.mkstemp(dir=parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        try:  # keep the old file's permissions; mkstemp's 0600 is too strict for results
            mode = path.stat().st_mode & 0o777
        except FileNotFoundError:
            mode = 0o644
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    if hasattr(os, "O_DIRECTORY"):  # make the rename itself durable (POSIX)
        try:
            dir_fd = os.open(parent, os.O_RDONLY | os.O_DIRECTORY)
        except OSError:
            return path
        try:
            os.fsync(dir_fd)
        except OSError:
            pass
        finally:
            os.close(dir_fd)
    return path


def write_json_atomic(path: str | os.PathLike[str], obj: Any, *, indent: int | None = 2) -> Path:
    """Write ``obj`` as JSON to ``path`` atomically: all of it, or (on any error) nothing.

    The JSON goes to a temporary file in the same folder, is flushed to disk, and then
    replaces ``path`` with :func:`os.replace`; if encoding fails midway (an object json cannot
    encode, an interrupt) the temporary file is removed and an existing ``path`` is left
    untouched. numpy / torch scalars and arrays are encoded via ``.tolist()``. Returns
    ``path``.
    """

    def write(file: IO[bytes]) -> None:
        text = _TextAdapter(file)
        json.dump(obj, text, indent=indent, default=_json_default, ensure_ascii=False)
        text.write("\n")

    return _atomic_write(path, write)


class _TextAdapter:
    """A minimal text sink over a binary file (json.dump writes its chunks as it goes)."""

    def __init__(self, file: IO[bytes]) -> None:
        self._file = file

    def write(self, chunk: str) -> int:
        return self._file.write(chunk.encode("utf-8"))


def write_bytes_atomic(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (see :func:`write_json_atomic`)."""
    return _atomic_write(path, lambda file: file.write(data))
