"""The :class:`Executor` protocol, :class:`LocalExecutor`, and what executors share.

An executor that subclasses :class:`Executor` inherits ``map`` (its ``imap``, as a list);
:func:`progress_bar` and :func:`total_of` drive the tqdm bar shown while items run.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any, Protocol, TypeVar, runtime_checkable

__all__ = ["Executor", "LocalExecutor", "progress_bar", "total_of"]

T = TypeVar("T")
R = TypeVar("R")


@runtime_checkable
class Executor(Protocol):
    """Maps ``fn(model, item)`` over items, returning results in the items' order.

    ``in_process``: whether ``fn`` runs in this process (then callers may take a direct
    path); ``num_workers``: how many items run at once.
    """

    in_process: bool
    num_workers: int

    def imap(
        self,
        fn: Callable[[Any, T], R],
        items: Iterable[T],
        *,
        model: Any = None,
        progress: bool = False,
        desc: str = "shards",
        total: int | None = None,
    ) -> Iterator[R]: ...

    def map(
        self,
        fn: Callable[[Any, T], R],
        items: Iterable[T],
        *,
        model: Any = None,
        progress: bool = False,
        desc: str = "shards",
        total: int | None = None,
    ) -> list[R]:
        """The results of :meth:`imap`, as a list."""
        return list(self.imap(fn, items, model=model, progress=progress, desc=desc, total=total))


def progress_bar(progress: bool, desc: str, total: int | None) -> Any:
    """A tqdm bar counting shards, or ``None`` without ``progress``."""
    if not progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="shard")


def total_of(items: Iterable[Any], total: int | None) -> int | None:
    """``total`` if given, else ``len(items)`` where the items have one."""
    if total is not None:
        return total
    try:
        return len(items)  # type: ignore[arg-type]
    except TypeError:
        return None


class LocalExecutor(Executor):
    """Runs everything in this process, one item after another (the default)."""

    in_process = True
    num_workers = 1

    def imap(
        self,
        fn: Callable[[Any, T], R],
        items: Iterable[T],
        *,
        model: Any = None,
        progress: bool = False,
        desc: str = "shards",
        total: int | None = None,
    ) -> Iterator[R]:
        bar = progress_bar(progress, desc, total_of(items, total))
        try:
            for item in items:
                yield fn(model, item)
                if bar is not None:
                    bar.update(1)
        finally:
            if bar is not None:
                bar.close()

    def __repr__(self) -> str:
        return "LocalExecutor()"
