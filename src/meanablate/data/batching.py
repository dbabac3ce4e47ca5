"""Tokenizing records and padding them into dict batches (:func:`batch_records`)."""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, Literal

import torch
from torch import Tensor

from meanablate.data.sources import Record

__all__ = ["DEFAULT_FIELD_PAD", "batch_records"]

# Padding of per-position fields, by the metrics' conventions (others pad with 0).
DEFAULT_FIELD_PAD: dict[str, float] = {
    "target": -100,
    "wrong": -100,
    "labels": -100,
    "target_value": math.nan,
    "metric_mask": 0,
}


def _is_hf_tokenizer(tokenizer: Any) -> bool:
    return hasattr(tokenizer, "pad_token_id") and callable(getattr(tokenizer, "batch_decode", None))


def _as_ids(out: Any, record: Record) -> list[int]:
    if isinstance(out, Mapping):
        out = out["input_ids"]
    if isinstance(out, Tensor):
        out = out.reshape(-1).tolist() if out.ndim <= 1 or out.shape[0] == 1 else None
    elif hasattr(out, "tolist"):  # numpy
        out = out.reshape(-1).tolist()
    if not isinstance(out, (list, tuple)) or not all(
        isinstance(i, int) and not isinstance(i, bool) for i in out
    ):
        raise TypeError(
            f"{record.where}: the tokenizer must return a list of token ids, got {out!r:.80}"
        )
    return list(out)


def _tokenize(tokenizer: Any, records: list[Record], max_length: int | None) -> list[list[int]]:
    texts = [r.text for r in records]
    if _is_hf_tokenizer(tokenizer):
        kwargs: dict[str, Any] = {}
        if max_length is not None:
            kwargs.update(truncation=True, max_length=max_length)
        ids = [list(x) for x in tokenizer(texts, **kwargs)["input_ids"]]
    else:
        ids = [_as_ids(tokenizer(t), r) for t, r in zip(texts, records)]
        if max_length is not None:
            ids = [x[:max_length] for x in ids]
    for x, r in zip(ids, records):
        if not x:
            raise ValueError(f"{r.where}: tokenized to no tokens ({r.text!r:.60})")
    return ids


def _pad_rows(rows: list[list[Any]], length: int, fill: Any, left: bool) -> list[list[Any]]:
    return [
        ([fill] * (length - len(r)) + list(r)) if left else (list(r) + [fill] * (length - len(r)))
        for r in rows
    ]


def _collate_field(
    name: str, values: list[Any], length: int, left: bool, pad: Mapping[str, float]
) -> Any:
    if all(isinstance(v, (int, float, bool)) for v in values):
        return torch.tensor(values)
    if all(isinstance(v, (list, tuple)) for v in values) and all(
        isinstance(x, (int, float, bool)) for v in values for x in v
    ):
        n = max([length, *(len(v) for v in values)])
        return torch.tensor(_pad_rows(values, n, pad.get(name, 0), left))
    return values  # strings, nested structures: left as a list


def batch_records(
    records: Iterable[Record],
    tokenizer: Any,
    *,
    batch_size: int = 32,
    max_length: int | None = None,
    pad_token_id: int | None = None,
    padding_side: Literal["right", "left"] | None = None,
    field_pad: Mapping[str, float] | None = None,
    ids_key: str = "input_ids",
) -> Iterator[dict[str, Any]]:
    """Tokenize ``records`` ``batch_size`` at a time into padded dict batches, lazily.

    Numeric fields become tensors: scalars ``[batch]``; lists (per-position values) are
    padded like the tokens to ``[batch, pos]`` with ``field_pad[name]`` (default
    :data:`DEFAULT_FIELD_PAD`: ``-100`` for targets, NaN for ``target_value``, else 0).
    The token ids go under ``ids_key`` (default ``"input_ids"``).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    hf = _is_hf_tokenizer(tokenizer)
    if pad_token_id is None:
        pad_token_id = getattr(tokenizer, "pad_token_id", None) if hf else None
        if pad_token_id is None:
            pad_token_id = getattr(tokenizer, "eos_token_id", None) if hf else None
        if pad_token_id is None:
            pad_token_id = 0  # masked out: its value never reaches the means
    side = padding_side or (getattr(tokenizer, "padding_side", "right") if hf else "right")
    if side not in ("right", "left"):
        raise ValueError(f"padding_side must be 'right' or 'left', got {side!r}")
    left = side == "left"
    pad = {**DEFAULT_FIELD_PAD, **(field_pad or {})}
    it = iter(records)
    while chunk := list(itertools.islice(it, batch_size)):
        ids = _tokenize(tokenizer, chunk, max_length)
        length = max(len(x) for x in ids)
        batch: dict[str, Any] = {
            ids_key: torch.tensor(_pad_rows(ids, length, pad_token_id, left), dtype=torch.long),
            "attention_mask": torch.tensor(
                _pad_rows([[1] * len(x) for x in ids], length, 0, left), dtype=torch.long
            ),
        }
        for name in chunk[0].fields:
            batch[name] = _collate_field(name, [r.fields[name] for r in chunk], length, left, pad)
        yield batch
