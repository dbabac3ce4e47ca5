"""``--prompts FILE`` for ``--model DIR``: :func:`meanablate.data.read_prompts` (the same reader
as the Python API), its errors turned into one-line :class:`InputError`."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from meanablate.cli.errors import one_line
from meanablate.config import InputError

__all__ = ["read_prompts"]


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

    A masked LM (``mask_token_id`` given) is scored at its mask: see
    :func:`meanablate.data.prompt_batches`.
    """
    from meanablate.data.prompts import read_prompts as read

    try:
        return read(
            path, tokenizer, batch_size, n_examples, max_length, mask_token_id=mask_token_id
        )
    except FileNotFoundError:
        raise InputError(f"--prompts {path}: no such file") from None
    except (ValueError, TypeError) as exc:
        raise InputError(one_line(exc)) from None
