"""Disjoint parts of a source: byte ranges of a file (whole lines), round robin of any iterable.

Shard ``i`` of ``k`` of a file is a byte range; the ``k`` shards together hold every line
exactly once, and a line's number is counted only when an error message needs it.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Iterable, Iterator
from typing import Any

__all__ = ["ShardLines", "check_shard", "shard_iterable"]


def check_shard(index: int, count: int) -> None:
    """``ValueError`` unless ``(index, count)`` names one of ``count >= 1`` shards."""
    if not (isinstance(index, int) and isinstance(count, int)) or count < 1:
        raise ValueError(f"a shard is (index, count) with count >= 1, got ({index!r}, {count!r})")
    if not 0 <= index < count:
        raise ValueError(f"shard index {index} out of range for {count} shards")


def _line_number(path: str, offset: int) -> int:
    """1-based number of the line that starts at byte ``offset`` (counted only on errors)."""
    n = 1
    with open(path, "rb") as f:
        left = offset
        while left > 0:
            chunk = f.read(min(left, 1 << 20))
            if not chunk:
                break
            n += chunk.count(b"\n")
            left -= len(chunk)
    return n


def _iter_lines(path: str, index: int = 0, count: int = 1) -> Iterator[tuple[int, bytes]]:
    """``(byte offset, line)`` for the lines that start in shard ``index`` of ``count``.

    Shard ``i`` covers bytes ``[size*i//count, size*(i+1)//count)``; a line belongs to the
    shard in which its first byte lies, so the shards partition the lines.
    """
    check_shard(index, count)
    size = os.path.getsize(path)
    start, end = size * index // count, size * (index + 1) // count
    with open(path, "rb") as f:
        if start > 0:
            f.seek(start - 1)
            f.readline()  # the rest of the line holding byte start-1 belongs to a shard before
        pos = f.tell()
        while pos < end:
            line = f.readline()
            if not line:
                break
            yield pos, line
            pos += len(line)


class ShardLines:
    """Lines of one shard, each with a ``where()`` naming its line number lazily.

    Shard 0 counts lines as it goes; a later shard learns the number of its first line
    (by counting newlines before it) only when an error message needs it.
    """

    def __init__(self, path: str, index: int, count: int) -> None:
        self.path, self.index, self.count = path, index, count
        self._first: int | None = 1 if index == 0 else None
        self._first_offset = 0

    def _where(self, k: int) -> str:
        if self._first is None:
            self._first = _line_number(self.path, self._first_offset)
        return f"{self.path}, line {self._first + k}"

    def __iter__(self) -> Iterator[tuple[Callable[[], str], str]]:
        for k, (offset, raw) in enumerate(_iter_lines(self.path, self.index, self.count)):
            if k == 0:
                self._first_offset = offset

            def where(_k: int = k) -> str:
                return self._where(_k)

            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise ValueError(f"{where()}: not valid UTF-8 ({exc})") from None
            yield where, text.rstrip("\r\n")


def shard_iterable(items: Iterable[Any], index: int, count: int) -> Iterator[Any]:
    """Every ``count``-th item from ``index`` on (round robin), lazily: shards of any iterable.

    Each shard still walks the whole iterable; for files, :meth:`TextBatches.shard` reads
    only its part.
    """
    check_shard(index, count)
    return itertools.islice(items, index, None, count)
