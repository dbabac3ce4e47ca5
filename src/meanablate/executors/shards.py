"""Dataset means on workers: shard sums (:func:`shard_means`) merged in order here."""

from __future__ import annotations

import functools
import itertools
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from meanablate.executors.base import Executor, total_of
from meanablate.hooks import to_device
from meanablate.stats import MeanAccumulator, Means, accumulate_batches

__all__ = ["merge_shards", "shard_means", "sharded_means"]


def shard_means(
    model: nn.Module,
    batches: Iterable[Tensor | Mapping[str, Any]],
    *,
    keys: Sequence[str],
    per_position: bool = False,
) -> tuple[MeanAccumulator, int]:
    """Float64 sums and token counts at ``keys`` over ``batches`` (runs on a worker).

    Returns the accumulator and the number of batches (0 for an empty shard).
    """
    acc = MeanAccumulator(per_position)
    return acc, accumulate_batches(acc, model, keys, batches)


def _shape_of(acc: MeanAccumulator, key: str) -> tuple[int, ...]:
    shape = tuple(acc.sums[key].shape)
    return shape[1:] if acc.per_position else shape


def merge_shards(
    results: Iterable[tuple[MeanAccumulator, int]],
    keys: Sequence[str],
    *,
    per_position: bool = False,
    into: MeanAccumulator | None = None,
) -> tuple[MeanAccumulator, int]:
    """Merge workers' ``(accumulator, n_batches)`` in order, checking sites and shapes.

    A shard with other sites, or another activation shape than the first non-empty shard,
    is a ``ValueError`` naming both shards.
    """
    acc = into if into is not None else MeanAccumulator(per_position)
    if acc.per_position != per_position:
        raise ValueError("the accumulator's per_position differs from compute_means's")
    want = set(keys)
    first: dict[str, tuple[int, tuple[int, ...]]] = {}
    n_batches = 0
    for i, (part, n) in enumerate(results):
        if not isinstance(part, MeanAccumulator):
            raise TypeError(f"shard {i} returned {type(part).__name__}, not a MeanAccumulator")
        if part.per_position != per_position:
            raise ValueError(
                f"shard {i}: per_position={part.per_position}, expected {per_position}"
            )
        got = set(part.sums)
        if n and got != want:
            raise ValueError(
                f"shard {i} returned sums for sites {sorted(got)}, expected {sorted(want)}: "
                "every worker must run the same model and sites"
            )
        for key in sorted(got):
            shape = _shape_of(part, key)
            j, seen = first.setdefault(key, (i, shape))
            if seen != shape:
                raise ValueError(
                    f"site {key}: shard {i} gave activation shape {shape} but shard {j} gave "
                    f"{seen}; every worker must run the same model, and the site's shape must "
                    "not depend on the data (e.g. on the sequence length)"
                )
        acc.merge(part)
        n_batches += n
    return acc, n_batches


def _chunks(batches: Iterable[Any], size: int) -> Iterator[list[Any]]:
    cpu = torch.device("cpu")
    it = iter(batches)
    while chunk := list(itertools.islice(it, size)):
        yield [to_device(b, cpu) if isinstance(b, (Tensor, Mapping)) else b for b in chunk]


def sharded_means(
    executor: Executor,
    model: nn.Module,
    keys: Sequence[str],
    batches: Iterable[Tensor | Mapping[str, Any]],
    *,
    per_position: bool = False,
    progress: bool = False,
    accumulator: MeanAccumulator | None = None,
) -> Means:
    """``compute_means`` through ``executor``: shard sums on workers, merged here.

    A source with ``.shard(i, k)`` (see :mod:`meanablate.data`) is split into
    ``executor.num_shards`` parts that the workers read themselves; any other iterable is
    read here and sent in chunks of ``executor.chunk_batches`` batches.
    """
    fn = functools.partial(shard_means, keys=tuple(keys), per_position=per_position)
    shard = getattr(batches, "shard", None)
    total: int | None
    if callable(shard) and getattr(batches, "num_shards", 1) == 1:
        k = int(getattr(executor, "num_shards", executor.num_workers))
        items: Iterable[Any] = [shard(i, k) for i in range(k)]
        total = k
    else:
        size = int(getattr(executor, "chunk_batches", 8))
        items = _chunks(batches, size)
        n = total_of(batches, None)
        total = None if n is None else -(-n // size)
    results = executor.imap(fn, items, model=model, progress=progress, desc="means", total=total)
    acc, n_batches = merge_shards(results, keys, per_position=per_position, into=accumulator)
    if n_batches == 0:
        raise ValueError("compute_means got no batches")
    meta = {
        "model_class": type(model).__name__,
        "activation_shapes": {k: list(_shape_of(acc, k)) for k in keys},
        "batches": n_batches,
    }
    return acc.result(meta)
