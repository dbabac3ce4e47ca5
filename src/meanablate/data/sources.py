"""Reading examples (:class:`Record`) lazily: JSONL, plain text, Hugging Face datasets."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from meanablate.data.shards import ShardLines, check_shard

__all__ = ["Record", "read_hf_dataset", "read_jsonl", "read_text"]


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


def read_text(path: str | Path, *, shard: tuple[int, int] = (0, 1)) -> Iterator[Record]:
    """Records of a plain text file, one prompt per line (blank lines skipped), lazily."""
    p = str(path)
    for where, text in ShardLines(p, *shard):
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
    for where, line in ShardLines(p, *shard):
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
    check_shard(*shard)
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
