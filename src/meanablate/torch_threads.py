"""How many CPU threads torch uses: chosen like the CLI does, and given back afterwards.

On a CPU, a small model's ops are too short to split across threads: the threads mostly
wait on each other (a sweep over 8 heads took 7.65 s on 2 threads and 0.27 s on 1 on a
busy 2-core machine). :func:`choose_threads` picks 1 for models under
:data:`~meanablate.config.BIG_MODEL` parameters and otherwise the cores other processes
leave free. :func:`sweep`, :func:`attribute` and :func:`discover` use it on their own while
torch's setting is untouched, and restore the caller's setting when they return; once you
call :func:`set_threads` (or ``torch.set_num_threads``) yourself, your choice holds.
("Untouched" is judged against the count torch had when this module was first imported; a
count you set with ``torch.set_num_threads`` before that is not seen as yours: use
:func:`set_threads`, or ``OMP_NUM_THREADS``, which torch reads at start.)
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Callable, Iterator
from typing import Any, Literal, TypeVar

import torch
from torch import nn

from meanablate.config import BIG_MODEL

__all__ = ["auto_threads", "choose_threads", "set_threads", "threads"]

_F = TypeVar("_F", bound=Callable[..., Any])
_TORCH_DEFAULT = torch.get_num_threads()  # what torch chose, before anyone changed it
_explicit: int | None = None  # the count set_threads was last given


def _module(model: Any) -> nn.Module | None:
    if model is None:
        return None
    from meanablate._unwrap import unwrap

    try:
        return unwrap(model)
    except TypeError:
        return None


def _on_cpu(model: Any) -> bool:
    model = _module(model)
    if model is None:
        return True
    for p in model.parameters():
        return p.device.type == "cpu"
    return True


def choose_threads(model: nn.Module | None = None) -> int:
    """The CLI's choice: 1 for a small model (or none given), else the free cores.

    >>> from torch import nn
    >>> choose_threads(nn.Linear(4, 4))
    1
    """
    model = _module(model)
    if model is None or sum(p.numel() for p in model.parameters()) < BIG_MODEL:
        return 1
    try:
        busy = os.getloadavg()[0]
    except (AttributeError, OSError):  # not on this platform
        return _TORCH_DEFAULT
    free = int((os.cpu_count() or 1) - busy + 0.5)
    return max(1, min(_TORCH_DEFAULT, free))


def set_threads(n: int | Literal["auto"] = "auto", model: nn.Module | None = None) -> int:
    """Set torch's CPU threads to ``n`` (``"auto"``: :func:`choose_threads` for ``model``);
    returns the previous count. From then on the API leaves the setting to you.

    >>> import meanablate as ma
    >>> before = ma.set_threads(1)
    >>> _ = ma.set_threads(before)
    """
    global _explicit
    if n == "auto":
        n = choose_threads(model)
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"set_threads: n must be a positive int or 'auto', got {n!r}")
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    _explicit = n
    return previous


@contextlib.contextmanager
def threads(model: nn.Module | None = None, n: int | Literal["auto"] = "auto") -> Iterator[int]:
    """Run a block with ``n`` threads (``"auto"``: chosen for ``model``), then restore the
    caller's count, even on an error. Yields the count used.

    >>> import torch, meanablate as ma
    >>> before = torch.get_num_threads()
    >>> with ma.threads(n=1) as used:
    ...     used
    1
    >>> torch.get_num_threads() == before
    True
    """
    if n == "auto":
        n = choose_threads(model)
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"threads: n must be a positive int or 'auto', got {n!r}")
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield n
    finally:
        torch.set_num_threads(previous)


def _untouched() -> bool:
    """Whether nobody chose a thread count: torch's own, and no set_threads since."""
    return _explicit is None and torch.get_num_threads() == _TORCH_DEFAULT


def auto_threads(fn: _F) -> _F:
    """Run ``fn(model, ...)`` with :func:`choose_threads` threads when the setting is
    untouched (see the module docstring), restoring it afterwards."""

    @functools.wraps(fn)
    def wrapper(model: Any, *args: Any, **kwargs: Any) -> Any:
        if not _untouched() or not _on_cpu(model):
            return fn(model, *args, **kwargs)
        with threads(model):
            return fn(model, *args, **kwargs)

    return wrapper  # type: ignore[return-value]
