"""Prompts with answers -> padded batches: the one reader behind the CLI's ``--prompts`` and
the Python API (:func:`prompt_batches`, :func:`read_prompts`).

A prompt is a text with, optionally, single-token answers for the task metrics:

- ``target``: the right next token after the prompt (``logit_diff``, ``loss``, ``prob``,
  ``accuracy``); ``wrong``: the wrong one (``logit_diff``);
- ``corrupt``: a corrupted prompt of the same token count (a counterfactual source:
  :func:`corrupt_source` turns it into the ``source=`` batch of ``method="resample"``).

Each batch is ``{"input_ids": [batch, pos], "attention_mask": [batch, pos], ...}`` (long);
``target`` / ``wrong`` are ``[batch, pos]`` filled with ``-100`` except at the prompt's last
token (what the metrics read), ``corrupt`` is ``[batch, pos]`` token ids padded like
``input_ids``.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from meanablate.data.sources import Record, read_jsonl, read_text

__all__ = ["ANSWER_FIELDS", "corrupt_source", "prompt_batches", "read_prompts"]

ANSWER_FIELDS = ("target", "wrong", "corrupt")


def _answer_id(tokenizer: Any, value: Any, name: str, where: str) -> int:
    vocab = len(tokenizer)
    if isinstance(value, int) and not isinstance(value, bool):
        if not 0 <= value < vocab:
            raise ValueError(f"{where}: {name} id {value} outside the vocabulary [0, {vocab})")
        return value
    if not isinstance(value, str):
        raise ValueError(f"{where}: {name} must be a string or a token id, got {value!r}")
    ids = tokenizer(value, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        raise ValueError(
            f"{where}: {name} {value!r} is {len(ids)} tokens {ids}, not one "
            "(answers must be single tokens; GPT-2 style tokenizers want a leading space)"
        )
    return int(ids[0])


def _records_of_file(path: Path) -> tuple[Iterator[Record], tuple[str, ...]]:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        first = next((line for line in path.open(encoding="utf-8") if line.strip()), None)
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not a UTF-8 text file") from None
    if first is None:
        raise ValueError(f"{path}: no prompts (the file is empty)")
    if path.suffix in (".jsonl", ".ndjson", ".json") or first.lstrip().startswith("{"):
        try:
            head = json.loads(first)
        except json.JSONDecodeError:
            head = {}
        fields = tuple(f for f in ANSWER_FIELDS if isinstance(head, dict) and f in head)
        if "wrong" in fields and "target" not in fields:
            fields = tuple(f for f in fields if f != "wrong")
        return read_jsonl(path, fields=fields), fields
    return read_text(path), ()


def _records_of_items(items: Sequence[Any], text_field: str) -> tuple[list[Record], tuple]:
    """Records of a list of strings or of dicts (``{"text": ..., "target": ...}``)."""
    if not items:
        raise ValueError("prompts: got an empty list; pass at least one prompt")
    head = items[0]
    fields = tuple(f for f in ANSWER_FIELDS if isinstance(head, Mapping) and f in head)
    records = []
    for i, item in enumerate(items):
        where = f"prompts[{i}]"
        if isinstance(item, str):
            if fields:
                raise ValueError(f"{where}: a string, but prompts[0] has fields {list(fields)}")
            records.append(Record(item, {}, lambda w=where: w))
            continue
        if not isinstance(item, Mapping):
            raise TypeError(
                f"{where}: a prompt is a string or a dict with {text_field!r}, got "
                f"{type(item).__name__}"
            )
        text = item.get(text_field)
        if not isinstance(text, str):
            raise ValueError(
                f"{where}: field {text_field!r} must be a string (keys: {sorted(item)})"
            )
        missing = [f for f in fields if f not in item]
        if missing:
            raise ValueError(f"{where}: missing field(s) {missing}, which prompts[0] has")
        records.append(Record(text, {f: item[f] for f in fields}, lambda w=where: w))
    return records, fields


def _records_of_dataset(ds: Any, text_field: str) -> tuple[Iterator[Record], tuple[str, ...]]:
    columns = list(ds.column_names)
    if text_field not in columns:
        raise ValueError(f"dataset: no column {text_field!r}; columns are {columns}")
    fields = tuple(f for f in ANSWER_FIELDS if f in columns)

    def rows() -> Iterator[Record]:
        for i, row in enumerate(ds):
            where = f"dataset row {i}"
            yield Record(row[text_field], {f: row[f] for f in fields}, lambda w=where: w)

    return rows(), fields


def _pad_id(tokenizer: Any) -> int:
    pad_id = getattr(tokenizer, "pad_token_id", None)
    if pad_id is None:
        pad_id = getattr(tokenizer, "eos_token_id", None)
    return 0 if pad_id is None else int(pad_id)


def _collate(
    records: Iterable[Record],
    fields: tuple[str, ...],
    tokenizer: Any,
    batch_size: int,
    max_length: int | None,
    mask_token_id: int | None = None,
) -> list[dict[str, Tensor]]:
    rows: list[tuple[list[int], dict[str, Any], int]] = []
    for record in records:
        ids = list(tokenizer(record.text)["input_ids"])
        if not ids:
            raise ValueError(f"{record.where}: the prompt has no tokens")
        if max_length is not None and len(ids) > max_length:
            raise ValueError(
                f"{record.where}: the prompt is {len(ids)} tokens, longer than the "
                f"model's {max_length}"
            )
        answers: dict[str, Any] = {}
        for f in fields:
            if f == "corrupt":
                value = record.fields[f]
                if not isinstance(value, str):
                    raise ValueError(f"{record.where}: corrupt must be a string, got {value!r}")
                bad = list(tokenizer(value)["input_ids"])
                if len(bad) != len(ids):
                    raise ValueError(
                        f"{record.where}: corrupt prompt is {len(bad)} tokens, the prompt "
                        f"{len(ids)}; a counterfactual needs the same token count"
                    )
                answers[f] = bad
            else:
                answers[f] = _answer_id(tokenizer, record.fields[f], f, record.where)
        at = len(ids) - 1  # a causal LM predicts the answer after the last token
        if mask_token_id is not None:
            n_masks = ids.count(mask_token_id)
            if n_masks != 1:
                convert = getattr(tokenizer, "convert_ids_to_tokens", None)
                mask = convert(mask_token_id) if convert else f"token {mask_token_id}"
                raise ValueError(
                    f"{record.where}: a masked LM is scored at its mask token: the "
                    f"prompt needs exactly one {mask}, it has {n_masks}"
                )
            at = ids.index(mask_token_id)
        rows.append((ids, answers, at))
    if not rows:
        raise ValueError("no prompts")
    pad_id = _pad_id(tokenizer)
    batches = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        length = max(len(ids) for ids, _, _ in chunk)
        ids_t = torch.full((len(chunk), length), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), length), dtype=torch.long)
        batch: dict[str, Tensor] = {"input_ids": ids_t, "attention_mask": mask}
        for f in fields:
            fill = pad_id if f == "corrupt" else -100
            batch[f] = torch.full((len(chunk), length), fill, dtype=torch.long)
        if mask_token_id is not None:
            batch["metric_mask"] = torch.zeros((len(chunk), length), dtype=torch.bool)
        for i, (ids, answers, at) in enumerate(chunk):
            ids_t[i, : len(ids)] = torch.tensor(ids)
            mask[i, : len(ids)] = 1
            if mask_token_id is not None:
                batch["metric_mask"][i, at] = True
            for f, a in answers.items():
                if f == "corrupt":
                    batch[f][i, : len(a)] = torch.tensor(a)
                else:
                    batch[f][i, at] = a
        batches.append(batch)
    return batches


def prompt_batches(
    prompts: str | Path | Sequence[str] | Sequence[Mapping[str, Any]] | Any,
    tokenizer: Any,
    *,
    batch_size: int = 32,
    n_examples: int | None = None,
    max_length: int | None = None,
    text_field: str = "text",
    mask_token_id: int | None = None,
) -> list[dict[str, Tensor]]:
    """Padded batches ``{"input_ids": [b, pos], "attention_mask": [b, pos], ...}``.

    ``prompts``: a list of strings; a list of dicts with ``text`` and optionally ``target``,
    ``wrong``, ``corrupt`` (the fields of the first prompt decide, as in the CLI); a path to
    a JSONL file (the same) or a plain text file (one prompt a line); or a ``datasets``
    ``Dataset`` with those columns. ``tokenizer``: a Hugging Face tokenizer (or anything
    called as ``tokenizer(text)["input_ids"]`` with ``len(tokenizer)`` the vocabulary).
    Answers are single tokens (a string or a token id); ``target`` / ``wrong`` are
    ``[b, pos]`` long, ``-100`` except at each prompt's last token. ``n_examples`` keeps
    the first prompts only. A bad prompt raises ``ValueError`` naming where it is.

    A masked LM (``mask_token_id``: e.g. ``tokenizer.mask_token_id``) is scored at its mask
    instead of the last token: each prompt needs exactly one mask token; answers sit at its
    position and ``metric_mask [b, pos]`` (bool) marks it, so that ``kl`` compares the
    predictions for the masked token only.

    >>> class Chars:  # a toy tokenizer: one token per character
    ...     pad_token_id = 0
    ...     def __len__(self): return 128
    ...     def __call__(self, text, add_special_tokens=True):
    ...         return {"input_ids": [ord(c) for c in text]}
    >>> b = prompt_batches([{"text": "ab", "target": "c", "wrong": "d"},
    ...                     {"text": "abc", "target": "d", "wrong": "e"}], Chars())
    >>> b[0]["input_ids"].tolist(), b[0]["target"].tolist()
    ([[97, 98, 0], [97, 98, 99]], [[-100, 99, -100], [-100, -100, 100]])
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    records: Iterable[Record]
    if isinstance(prompts, (str, Path)):
        records, fields = _records_of_file(Path(prompts))
    elif isinstance(prompts, Sequence) and not isinstance(prompts, (bytes, bytearray)):
        records, fields = _records_of_items(prompts, text_field)
    elif hasattr(prompts, "column_names") and hasattr(prompts, "__iter__"):
        records, fields = _records_of_dataset(prompts, text_field)  # a datasets.Dataset
    else:
        raise TypeError(
            "prompts must be a list of strings or dicts, a path to a JSONL / text file, or a "
            f"datasets.Dataset; got {type(prompts).__name__}"
        )
    if n_examples is not None:
        records = itertools.islice(records, n_examples)
    return _collate(records, fields, tokenizer, batch_size, max_length, mask_token_id)


def read_prompts(
    path: str | Path,
    tokenizer: Any,
    batch_size: int = 32,
    n_examples: int | None = None,
    max_length: int | None = None,
    *,
    mask_token_id: int | None = None,
) -> list[dict[str, Tensor]]:
    """The batches of a prompts file (JSONL or plain text): :func:`prompt_batches` on a path."""
    return prompt_batches(
        Path(path),
        tokenizer,
        batch_size=batch_size,
        n_examples=n_examples,
        max_length=max_length,
        mask_token_id=mask_token_id,
    )


def corrupt_source(batch: Mapping[str, Any]) -> dict[str, Tensor]:
    """The corrupted prompts of a batch as a batch of their own (``source=`` of a resample).

    >>> b = {"input_ids": torch.tensor([[1, 2]]), "attention_mask": torch.ones(1, 2),
    ...      "corrupt": torch.tensor([[1, 3]])}
    >>> corrupt_source(b)["input_ids"].tolist()
    [[1, 3]]
    """
    if "corrupt" not in batch:
        raise KeyError(f"the batch has no 'corrupt' field (keys: {sorted(batch)})")
    out = {"input_ids": batch["corrupt"]}
    if "attention_mask" in batch:
        out["attention_mask"] = batch["attention_mask"]
    return out
