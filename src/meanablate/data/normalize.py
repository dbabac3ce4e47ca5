"""One place that says what ``batches`` may be: :func:`as_batches`."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from torch import Tensor

__all__ = ["as_batches"]


def as_batches(batches: Any, *, name: str = "batches") -> Iterable[Tensor | Mapping[str, Any]]:
    """``batches`` as an iterable of batches: one batch (a tensor or a dict) becomes ``[it]``.

    Accepted: a tensor ``[batch, pos, ...]`` (one batch: it is not iterated by rows), a dict
    of tensors (one batch, e.g. a tokenizer's output), or an iterable of those (a list, a
    generator, a :class:`~meanablate.data.TextBatches` stream; left as it is, so streams stay
    lazy and shardable). Anything else raises ``TypeError`` naming ``name``.

    >>> import torch
    >>> len(as_batches(torch.zeros(4, 8, dtype=torch.long)))
    1
    >>> as_batches("the cat")
    Traceback (most recent call last):
    TypeError: batches must be a tensor, a dict of tensors, or an iterable of those; got str
    """
    if isinstance(batches, Tensor):
        if batches.ndim == 0:
            raise TypeError(f"{name}: a batch tensor needs a batch dimension, got a scalar")
        return [batches]
    if isinstance(batches, Mapping):
        return [batches]
    if isinstance(batches, (str, bytes, bytearray)) or not isinstance(batches, Iterable):
        raise TypeError(
            f"{name} must be a tensor, a dict of tensors, or an iterable of those; "
            f"got {type(batches).__name__}"
        )
    if isinstance(batches, (list, tuple)):
        for i, b in enumerate(batches):
            if not isinstance(b, (Tensor, Mapping)):
                raise TypeError(
                    f"{name}[{i}] must be a tensor or a dict of tensors, got {type(b).__name__}"
                    + (" (pass one batch, or a list of batches)" if isinstance(b, str) else "")
                )
    return batches
