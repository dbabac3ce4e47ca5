"""Peak working memory of a piece of work: what it allocates above what was in use before.

``kind="tensors"`` (the default) counts tensor storage, as torch's allocator hands it
out. On CUDA this is ``torch.cuda.max_memory_allocated`` after a reset. On a CPU torch's
allocator keeps no statistics and ``tracemalloc`` does not see tensors, so a dispatch mode
adds up the storage every operation creates (not aliasing one of its inputs: views and
in-place results are free) and subtracts it when the storage dies; buffers a kernel
uses only inside itself are not seen. This is what the work needs. It costs a Python
call per operation, so time nothing under it.

``kind="rss"`` reads the process's resident set instead (CPU): free heap pages are returned
first (``malloc_trim``), the kernel's peak counter is reset (``/proc/self/clear_refs``;
where that is not allowed, a thread samples every few milliseconds), and the peak minus
the start is the work's. It includes what the C allocator keeps after frees: over many
units glibc's heap grows well past the tensors' peak (measured: 372 MiB against 44 MiB
for a 512-neuron sweep), and by how much depends on the allocator, not on the work.

    >>> with PeakMemory() as peak:
    ...     x = torch.ones(1_000_000)  # 4 MB
    ...     del x
    >>> peak.bytes
    4000000
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import threading
import weakref
from functools import partial
from types import TracebackType
from typing import Any, Literal

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

__all__ = ["PeakMemory", "available_bytes"]

_STATUS = "/proc/self/status"


def _rss() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        import psutil

        return int(psutil.Process().memory_info().rss)


def _hwm() -> int | None:
    try:
        with open(_STATUS) as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # 5: reset the peak resident set size to the current one
        return _hwm() is not None
    except OSError:
        return False


def _trim() -> None:
    # glibc keeps freed heap pages; give them back so the next peak is this work's own.
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def available_bytes(device: torch.device | str = "cpu") -> int | None:
    """Memory free for new work on ``device`` (``None``: unknown)."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        return None


class _StorageCounter(TorchDispatchMode):
    """Live bytes of the storages created while active, and their peak."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._refs: dict[int, Any] = {}

    @classmethod
    def _should_skip_dynamo(cls) -> bool:
        # torch would wrap __torch_dispatch__ to keep torch.compile out, importing
        # torch._dynamo on the first operation (seconds); nothing here is compiled.
        return False

    def _freed(self, key: int, nbytes: int, _ref: Any) -> None:
        if self._refs.pop(key, None) is not None:
            self.live -= nbytes

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        inputs = None
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor) or t.device.type == "meta":
                continue
            st = t.untyped_storage()
            key = st.data_ptr()
            if not key or key in self._refs:
                continue
            if inputs is None:  # views and in-place results share an input's storage
                inputs = {
                    x.untyped_storage().data_ptr()
                    for x in tree_leaves((args, kwargs))
                    if isinstance(x, torch.Tensor)
                }
            if key in inputs:
                continue
            n = st.nbytes()
            self._refs[key] = weakref.ref(st, partial(self._freed, key, n))
            self.live += n
            self.peak = max(self.peak, self.live)
        return out


class PeakMemory:
    """Context manager: ``.bytes`` is the peak memory allocated inside, above the start.

    ``device``: where the work allocates. ``kind``: ``"tensors"`` (tensor storage; on
    CUDA the caching allocator's statistics) or ``"rss"`` (the process's resident set on
    a CPU, allocator slack included).
    """

    def __init__(
        self, device: torch.device | str = "cpu", kind: Literal["tensors", "rss"] = "tensors"
    ) -> None:
        if kind not in ("tensors", "rss"):
            raise ValueError(f"kind must be 'tensors' or 'rss', got {kind!r}")
        self.device = torch.device(device)
        self.kind = kind
        self.bytes = 0
        self.live_bytes = 0  # still allocated at the end, above the start
        self._counter: _StorageCounter | None = None
        self._base = 0
        self._sampler: threading.Thread | None = None
        self._stop = threading.Event()
        self._max = 0

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
            return self
        if self.kind == "tensors":
            self._counter = _StorageCounter()
            self._counter.__enter__()
            return self
        _trim()
        self._base = _rss()
        if not _reset_hwm():
            self._max = self._base
            self._sampler = threading.Thread(target=self._sample, daemon=True)
            self._sampler.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.002):
            self._max = max(self._max, _rss())

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
            self.live_bytes = max(0, torch.cuda.memory_allocated(self.device) - self._base)
        elif self._counter is not None:
            self._counter.__exit__(exc_type, exc, tb)
            self.bytes, self.live_bytes = self._counter.peak, max(0, self._counter.live)
            return
        elif self._sampler is not None:
            self._stop.set()
            self._sampler.join()
            peak = max(self._max, _rss())
        else:
            peak = _hwm() or _rss()
        if self.device.type != "cuda":
            self.live_bytes = max(0, _rss() - self._base)
        self.bytes = max(0, int(peak) - self._base)
