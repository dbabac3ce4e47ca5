"""The source object: :class:`TextBatches`, made by :func:`stream_batches`."""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from meanablate.data.batching import batch_records
from meanablate.data.shards import check_shard
from meanablate.data.sources import Record, read_hf_dataset, read_jsonl, read_text

__all__ = ["Format", "TextBatches", "stream_batches"]

Format = Literal["jsonl", "text", "hf"]


def _detect_format(path: str) -> Format:
    if os.path.isdir(path):
        return "hf"
    if path.endswith((".jsonl", ".ndjson", ".jsonl.txt")):
        return "jsonl"
    return "text"


@dataclass(frozen=True)
class TextBatches:
    """A re-iterable, picklable, shardable stream of token batches from a file.

    Iterating it reads the file from the start each time (lazily). :meth:`shard` gives a
    disjoint part; see :func:`stream_batches` for the options.
    """

    path: str
    tokenizer: Any
    format: Format
    batch_size: int = 32
    text_field: str = "text"
    fields: tuple[str, ...] = ()
    max_length: int | None = None
    pad_token_id: int | None = None
    padding_side: Literal["right", "left"] | None = None
    split: str | None = None
    field_pad: dict[str, float] = field(default_factory=dict)
    ids_key: str = "input_ids"
    shard_index: int = 0
    num_shards: int = 1

    def __post_init__(self) -> None:
        if self.format not in ("jsonl", "text", "hf"):
            raise ValueError(f"format must be 'jsonl', 'text' or 'hf', got {self.format!r}")
        if not os.path.exists(self.path):
            raise FileNotFoundError(f"no such file or directory: {self.path}")
        if self.format == "text" and self.fields:
            raise ValueError("a plain text file has no fields; use JSONL for extra fields")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        check_shard(self.shard_index, self.num_shards)

    def records(self) -> Iterator[Record]:
        """The examples of this shard, untokenized."""
        shard = (self.shard_index, self.num_shards)
        if self.format == "jsonl":
            return read_jsonl(
                self.path, text_field=self.text_field, fields=self.fields, shard=shard
            )
        if self.format == "hf":
            return read_hf_dataset(
                self.path,
                text_field=self.text_field,
                fields=self.fields,
                split=self.split,
                shard=shard,
            )
        return read_text(self.path, shard=shard)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return batch_records(
            self.records(),
            self.tokenizer,
            batch_size=self.batch_size,
            max_length=self.max_length,
            pad_token_id=self.pad_token_id,
            padding_side=self.padding_side,
            field_pad=self.field_pad,
            ids_key=self.ids_key,
        )

    def shard(self, index: int, count: int) -> TextBatches:
        """Part ``index`` of ``count``: disjoint, together every example exactly once."""
        check_shard(index, count)
        if self.num_shards != 1:
            raise ValueError("this source is already a shard; shard the whole source instead")
        return replace(self, shard_index=index, num_shards=count)


def stream_batches(
    path: str | Path,
    tokenizer: Any,
    *,
    batch_size: int = 32,
    format: Format | None = None,
    text_field: str = "text",
    fields: Sequence[str] = (),
    max_length: int | None = None,
    pad_token_id: int | None = None,
    padding_side: Literal["right", "left"] | None = None,
    split: str | None = None,
    field_pad: Mapping[str, float] | None = None,
    ids_key: str = "input_ids",
) -> TextBatches:
    """Stream padded token batches from ``path`` without loading it.

    ``format``: ``"jsonl"`` (``.jsonl``/``.ndjson`` files), ``"hf"`` (directories) or
    ``"text"`` (anything else) when not given. ``fields``: extra JSONL keys or dataset
    columns carried into each batch (e.g. ``("target", "wrong")`` for ``logit_diff``).
    ``max_length`` truncates; ``pad_token_id`` / ``padding_side`` default to the HF
    tokenizer's (else 0 and right). ``ids_key``: the batch key of the token ids
    (default ``"input_ids"``). The result is re-iterable and has ``.shard(i, k)``.

    >>> import tempfile, os
    >>> p = os.path.join(tempfile.mkdtemp(), "prompts.txt")
    >>> _ = open(p, "w").write("a b\\nc\\n")
    >>> batches = stream_batches(p, lambda t: [len(w) for w in t.split()])
    >>> [b["attention_mask"].tolist() for b in batches]
    [[[1, 1], [1, 0]]]
    """
    p = str(path)
    return TextBatches(
        path=p,
        tokenizer=tokenizer,
        format=format or _detect_format(p),
        batch_size=batch_size,
        text_field=text_field,
        fields=tuple(fields),
        max_length=max_length,
        pad_token_id=pad_token_id,
        padding_side=padding_side,
        split=split,
        field_pad=dict(field_pad or {}),
        ids_key=ids_key,
    )
