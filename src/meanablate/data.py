"""Token batches streamed from files larger than memory: JSONL, plain text, HF datasets.

:func:`stream_batches` reads a file lazily and yields padded dict batches::

    {"input_ids": [batch, pos] long, "attention_mask": [batch, pos] long, **fields}

``meanablate.run_model`` hands ``input_ids`` to a model whose ``forward`` takes ``tokens``
(the built-in organisms); ``ids_key=`` names the key otherwise.

ready for :func:`meanablate.compute_means` (padding is excluded from the means). Sources:

- a ``.jsonl`` file: one JSON object per line with a text field (``text_field``) and,
  optionally, the fields the metrics need (``fields=("target", "wrong")``);
- a plain text file: one prompt per line;
- a directory written by ``datasets.Dataset.save_to_disk``: memory-mapped by
  ``datasets.load_from_disk`` and read in slices, never whole.

Blank lines are skipped. Only one batch is held at a time, so peak memory does not grow with
the file. ``source.shard(i, k)`` is the ``i``-th of ``k`` disjoint parts (a byte range of
the file, whole lines only; a contiguous slice of the dataset), so that each Ray worker
reads only its own part; the ``k`` shards together hold every line exactly once.

The tokenizer is either a callable ``text -> token ids`` or a Hugging Face tokenizer
(called on the whole batch of texts). Sources pickle small (path, options, tokenizer), which
is what a :class:`meanablate.executors.RayExecutor` sends to its workers.
"""

from __future__ import annotations

import itertools
import json
import math
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

__all__ = [
    "DEFAULT_FIELD_PAD",
    "Record",
    "TextBatches",
    "batch_records",
    "read_hf_dataset",
    "read_jsonl",
    "read_text",
    "shard_iterable",
    "stream_batches",
]

# Padding of per-position fields, by the metrics' conventions (others pad with 0).
DEFAULT_FIELD_PAD: dict[str, float] = {
    "target": -100,
    "wrong": -100,
    "labels": -100,
    "target_value": math.nan,
    "metric_mask": 0,
}

Format = Literal["jsonl", "text", "hf"]


@dataclass(frozen=True)
class Record:
    """One example: its text, extra fields, and where it came from (for error messages)."""

    text: str
    fields: dict[str, Any]
    locate: Callable[[], str] = field(default=lambda: "a text", repr=False, compare=False)

    @property
    def where(self) -> str:
        """``"path, line N"`` (line numbers of later shards are counted only when asked)."""
        return self.locate()


# -- reading lines of a byte range --------------------------------------------------------


def _check_shard(index: int, count: int) -> None:
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
    _check_shard(index, count)
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


class _Lines:
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


def read_text(path: str | Path, *, shard: tuple[int, int] = (0, 1)) -> Iterator[Record]:
    """Records of a plain text file, one prompt per line (blank lines skipped), lazily."""
    p = str(path)
    for where, text in _Lines(p, *shard):
        if text.strip():
            yield Record(text, {}, where)


def read_jsonl(
    path: str | Path,
    *,
    text_field: str = "text",
    fields: Sequence[str] = (),
    shard: tuple[int, int] = (0, 1),
) -> Iterator[Record]:
    """Records of a JSONL file (one object a line; blank lines skipped), lazily.

    A line that is not a JSON object, lacks ``text_field`` (a string) or one of ``fields``
    raises ``ValueError`` naming the file and the line number.
    """
    p = str(path)
    for where, line in _Lines(p, *shard):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{where()}: invalid JSON ({exc.msg} at column {exc.colno})") from None
        if not isinstance(obj, dict):
            raise ValueError(f"{where()}: expected a JSON object, got {type(obj).__name__}")
        text = obj.get(text_field)
        if not isinstance(text, str):
            raise ValueError(
                f"{where()}: field {text_field!r} must be a string, got "
                + ("nothing" if text_field not in obj else type(text).__name__)
                + f" (keys: {sorted(obj)})"
            )
        missing = [f for f in fields if f not in obj]
        if missing:
            raise ValueError(f"{where()}: missing field(s) {missing} (keys: {sorted(obj)})")
        yield Record(text, {f: obj[f] for f in fields}, where)


def read_hf_dataset(
    path: str | Path,
    *,
    text_field: str = "text",
    fields: Sequence[str] = (),
    split: str | None = None,
    shard: tuple[int, int] = (0, 1),
    chunk_rows: int = 1024,
) -> Iterator[Record]:
    """Records of a ``save_to_disk`` directory, read ``chunk_rows`` rows at a time.

    ``datasets.load_from_disk`` memory-maps the Arrow files: nothing is loaded whole. A
    ``DatasetDict`` directory needs ``split``.
    """
    try:
        import datasets
    except ImportError:
        raise ImportError(
            "reading a Hugging Face dataset directory needs `pip install datasets`"
        ) from None
    _check_shard(*shard)
    ds = datasets.load_from_disk(str(path))
    if isinstance(ds, datasets.DatasetDict):
        if split is None:
            raise ValueError(f"{path} holds splits {sorted(ds)}; pass split=")
        ds = ds[split]
    elif split is not None:
        raise ValueError(f"{path} holds a single Dataset, not splits; drop split={split!r}")
    columns = [text_field, *fields]
    missing = [c for c in columns if c not in ds.column_names]
    if missing:
        raise ValueError(f"{path}: no column(s) {missing}; columns are {ds.column_names}")
    ds = ds.select_columns(columns)
    first = 0
    if shard[1] > 1:
        # datasets' contiguous shards: the first len % k shards hold one row more
        div, mod = divmod(len(ds), shard[1])
        first = div * shard[0] + min(shard[0], mod)
        ds = ds.shard(num_shards=shard[1], index=shard[0], contiguous=True)
    row = first
    for chunk in ds.iter(batch_size=chunk_rows):
        for j, text in enumerate(chunk[text_field]):
            where = f"{path}, row {row + j}"
            if not isinstance(text, str):
                raise ValueError(f"{where}: column {text_field!r} must be a string")
            yield Record(text, {f: chunk[f][j] for f in fields}, lambda _w=where: _w)
        row += len(chunk[text_field])


# -- tokenizing and padding --------------------------------------------------------------


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


# -- the source object -------------------------------------------------------------------


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
        _check_shard(self.shard_index, self.num_shards)

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
        _check_shard(index, count)
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


def shard_iterable(items: Iterable[Any], index: int, count: int) -> Iterator[Any]:
    """Every ``count``-th item from ``index`` on (round robin), lazily: shards of any iterable.

    Each shard still walks the whole iterable; for files, :meth:`TextBatches.shard` reads
    only its part.
    """
    _check_shard(index, count)
    return itertools.islice(items, index, None, count)
