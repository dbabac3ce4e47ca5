"""Prompts files for ``--model DIR``: plain text (one prompt a line) or JSONL with ``text``
and optional ``target`` / ``wrong`` answers and ``corrupt`` (a counterfactual prompt of the
same token length, for ``--method resample``), read into padded batches
(:func:`read_prompts`)."""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from meanablate.cli.errors import one_line
from meanablate.config import InputError

__all__ = ["read_prompts"]


def _answer_id(tokenizer: Any, value: Any, name: str, where: str) -> int:
    vocab = len(tokenizer)
    if isinstance(value, int) and not isinstance(value, bool):
        if not 0 <= value < vocab:
            raise InputError(f"{where}: {name} id {value} outside the vocabulary [0, {vocab})")
        return value
    if not isinstance(value, str):
        raise InputError(f"{where}: {name} must be a string or a token id, got {value!r}")
    ids = tokenizer(value, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        raise InputError(
            f"{where}: {name} {value!r} is {len(ids)} tokens {ids}, not one "
            "(answers must be single tokens; GPT-2 style tokenizers want a leading space)"
        )
    return int(ids[0])


def _corrupt_ids(tokenizer: Any, record: Any, n_clean: int) -> list[int]:
    value = record.fields["corrupt"]
    if not isinstance(value, str):
        raise InputError(f"{record.where}: corrupt must be a string, got {type(value).__name__}")
    ids = list(tokenizer(value)["input_ids"])
    if len(ids) != n_clean:
        raise InputError(
            f"{record.where}: the corrupt prompt is {len(ids)} tokens, the clean prompt "
            f"{n_clean}: a counterfactual pair must align token by token (same length)"
        )
    return ids


def read_prompts(
    path: str,
    tokenizer: Any,
    batch_size: int,
    n_examples: int | None,
    max_length: int | None = None,
    *,
    mask_token_id: int | None = None,
) -> list[dict[str, Tensor]]:
    """Padded batches from a prompts file; a bad line raises naming the file and line.

    JSONL lines with ``target`` (and ``wrong``) get ``[batch, pos]`` fields scored at the
    prompt's last token; plain text prompts get none (``kl`` reads every real token).

    A masked LM (``mask_token_id`` given) is scored at its mask instead: answers sit at
    the mask token's position, and prompts with a mask get ``metric_mask [batch, pos]``
    marking it (so ``kl`` compares the predictions for the masked token only). Each
    prompt then needs exactly one mask token.
    """
    from meanablate.data import read_jsonl, read_text

    p = Path(path)
    if not p.is_file():
        raise InputError(f"--prompts {path}: no such file")
    try:
        first = next((line for line in p.open(encoding="utf-8") if line.strip()), None)
    except UnicodeDecodeError:
        raise InputError(f"{path}: not a UTF-8 text file") from None
    if first is None:
        raise InputError(f"{path}: no prompts (the file is empty)")
    is_jsonl = p.suffix in (".jsonl", ".ndjson", ".json") or first.lstrip().startswith("{")
    fields: tuple[str, ...] = ()
    if is_jsonl:
        try:
            head = json.loads(first)
        except json.JSONDecodeError:
            head = {}
        if isinstance(head, dict) and "target" in head:
            fields = ("target", "wrong") if "wrong" in head else ("target",)
        has_corrupt = isinstance(head, dict) and "corrupt" in head
        records: Any = read_jsonl(p, fields=fields + (("corrupt",) if has_corrupt else ()))
    else:
        records = read_text(p)
    if n_examples is not None:
        records = itertools.islice(records, n_examples)
    pad_id = tokenizer.pad_token_id
    if pad_id is None:
        pad_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    rows: list[tuple[list[int], dict[str, int], int]] = []
    corrupt_rows: list[list[int]] = []
    try:
        for record in records:
            ids = list(tokenizer(record.text)["input_ids"])
            if not ids:
                raise InputError(f"{record.where}: the prompt has no tokens")
            if max_length is not None and len(ids) > max_length:
                raise InputError(
                    f"{record.where}: the prompt is {len(ids)} tokens, longer than the "
                    f"model's {max_length}"
                )
            answers = {f: _answer_id(tokenizer, record.fields[f], f, record.where) for f in fields}
            at = len(ids) - 1  # a causal LM predicts the answer after the last token
            if mask_token_id is not None:
                n_masks = ids.count(mask_token_id)
                if n_masks != 1:
                    mask = tokenizer.convert_ids_to_tokens(mask_token_id)
                    raise InputError(
                        f"{record.where}: a masked LM is scored at its mask token: the "
                        f"prompt needs exactly one {mask}, it has {n_masks}"
                    )
                at = ids.index(mask_token_id)
            rows.append((ids, answers, at))
            if "corrupt" in record.fields:
                corrupt_rows.append(_corrupt_ids(tokenizer, record, len(ids)))
    except InputError:
        raise
    except ValueError as exc:  # from the readers: "path, line N: ..."
        raise InputError(one_line(exc)) from None
    if not rows:
        raise InputError(f"{path}: no prompts")
    batches = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        length = max(len(ids) for ids, _, _ in chunk)
        ids_t = torch.full((len(chunk), length), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), length), dtype=torch.long)
        batch: dict[str, Tensor] = {"input_ids": ids_t, "attention_mask": mask}
        for f in fields:
            batch[f] = torch.full((len(chunk), length), -100, dtype=torch.long)
        if mask_token_id is not None:
            batch["metric_mask"] = torch.zeros((len(chunk), length), dtype=torch.bool)
        if corrupt_rows:
            # Padded exactly like the clean prompts: position p means the same in both.
            batch["corrupt"] = torch.full((len(chunk), length), pad_id, dtype=torch.long)
            for i, cids in enumerate(corrupt_rows[start : start + batch_size]):
                batch["corrupt"][i, : len(cids)] = torch.tensor(cids)
        for i, (ids, answers, at) in enumerate(chunk):
            ids_t[i, : len(ids)] = torch.tensor(ids)
            mask[i, : len(ids)] = 1
            if mask_token_id is not None:
                batch["metric_mask"][i, at] = True
            for f, a in answers.items():
                batch[f][i, at] = a
        batches.append(batch)
    return batches
