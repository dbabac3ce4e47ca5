"""Resuming a forward pass from block ``L``: the layers before a unit are not re-run.

Ablating a unit inside block ``L`` cannot change blocks ``0..L-1``. During the clean run,
:func:`record_block_calls` records how the model calls each block (its positional and
keyword arguments, through forward pre-hooks that leave in ``finally``);
:func:`run_from` then calls blocks ``L..`` directly with those arguments — the stream
flowing from one block to the next — and finishes with the family's tail (final norm and
unembedding). Calling the blocks as modules fires every hook on them, ``ablate``'s
included. Nothing is replaced on the user's modules.

Only families that declare it safe (:meth:`Family.can_resume`: the model's forward is
exactly embed, blocks in order, tail) resume; any other model runs its full forward.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from meanablate.families import Family

__all__ = ["BlockCalls", "block_of", "record_block_calls", "run_from"]


def block_of(path: str, prefix: str, n_blocks: int) -> int | None:
    """Index of the block containing module ``path`` (``None``: outside the blocks)."""
    head = f"{prefix}." if prefix else ""
    if not path.startswith(head):
        return None
    first = path[len(head) :].split(".", 1)[0]
    if first.isdigit() and int(first) < n_blocks:
        return int(first)
    return None


@dataclass
class BlockCalls:
    """Each block's recorded call in one forward: ``calls[i] = (args, kwargs)`` (made
    repeatable by the family), or ``None`` where a block was not called exactly once."""

    calls: list[tuple[tuple, dict[str, Any]] | None]
    counts: list[int]

    def resumable_from(self, layer: int) -> bool:
        """Whether blocks ``layer..`` were each called once, with repeatable arguments."""
        tail = range(layer, len(self.calls))
        return all(self.counts[i] == 1 and self.calls[i] is not None for i in tail)


@contextmanager
def record_block_calls(family: Family) -> Iterator[BlockCalls | None]:
    """Record each block's call during the forward passes inside the block.

    Yields ``None`` when the family cannot resume (then nothing is registered).
    """
    from meanablate.hooks import attached

    found = family.blocks() if family.can_resume() else None
    if found is None:
        yield None
        return
    blocks = found[1]
    record = BlockCalls([None] * len(blocks), [0] * len(blocks))
    planned = []
    for i, block in enumerate(blocks):

        def pre(_m: nn.Module, args: tuple, kwargs: dict, i: int = i) -> None:
            record.counts[i] += 1
            record.calls[i] = family.resume_call(tuple(args), dict(kwargs))

        planned.append((block, "forward_pre_kwargs", pre))
    with attached(planned):  # atomic against Ctrl-C (see meanablate.hooks.attached)
        yield record


def run_from(family: Family, calls: BlockCalls, layer: int) -> Tensor:
    """The model's output tensor, running blocks ``layer..`` from the recorded calls.

    Block ``layer`` gets its recorded input; each later block the previous one's output
    in place of its recorded stream (its first positional argument).
    """
    found = family.blocks()
    assert found is not None
    blocks = found[1]
    hidden: Tensor | None = None
    for i in range(layer, len(blocks)):
        call = calls.calls[i]
        assert call is not None
        args, kwargs = call
        if hidden is not None:
            args = (hidden, *args[1:])
        hidden = family.block_output(blocks[i](*args, **kwargs))
    assert hidden is not None
    return family.tail(hidden)
