"""Skipping the untouched layers of any model built as a list of blocks.

Most transformers keep their layers in one ``nn.ModuleList`` (``encoder.layer`` in BERT,
``transformer.h`` in GPT-2, ``model.layers`` in Llama). Ablating a unit inside block ``L``
cannot change blocks ``0..L-1``, so during a sweep those blocks may return the outputs
recorded in the clean run instead of recomputing them. The blocks' ``forward`` is
replaced on the instances only inside a ``with`` block and restored in ``finally``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from torch import nn

__all__ = ["block_of", "find_blocks", "record_block_outputs", "skip_blocks"]


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList] | None:
    """The model's longest ``ModuleList`` of layers (path and list), or ``None``."""
    best: tuple[str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) < 2:
            continue
        if best is None or len(module) > len(best[1]):
            best = (name, module)
    return best


def block_of(path: str, prefix: str, n_blocks: int) -> int | None:
    """Index of the block containing module ``path`` (``None``: outside the blocks)."""
    head = f"{prefix}." if prefix else ""
    if not path.startswith(head):
        return None
    first = path[len(head) :].split(".", 1)[0]
    if first.isdigit() and int(first) < n_blocks:
        return int(first)
    return None


@contextmanager
def record_block_outputs(blocks: nn.ModuleList) -> Iterator[list[Any]]:
    """Record each block's output (as returned) during one forward pass."""
    from meanablate.hooks import attached

    outputs: list[Any] = [None] * len(blocks)
    planned = []
    for i, block in enumerate(blocks):

        def hook(_m: nn.Module, _a: Any, out: Any, i: int = i) -> None:
            outputs[i] = out

        planned.append((block, "forward", hook))
    with attached(planned):  # atomic against Ctrl-C (see meanablate.hooks.attached)
        yield outputs


@contextmanager
def skip_blocks(blocks: nn.ModuleList, upto: int, outputs: list[Any]) -> Iterator[None]:
    """Blocks ``0..upto-1`` return their recorded clean outputs instead of running."""
    patched = []
    try:
        for i in range(upto):
            block = blocks[i]
            if "forward" in block.__dict__:
                raise RuntimeError(f"block {i} already has an instance-level forward")

            def cached(*_args: Any, _out: Any = outputs[i], **_kwargs: Any) -> Any:
                return _out

            block.forward = cached  # type: ignore[method-assign]
            patched.append(block)
        yield
    finally:
        for block in patched:
            del block.forward
