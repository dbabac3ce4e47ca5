"""Resuming a forward pass from block ``L``: the layers before a unit are not re-run.

Ablating a unit inside block ``L`` cannot change blocks ``0..L-1``. During the clean run,
:func:`record_block_calls` records how the model calls each block (its positional and
keyword arguments, through forward pre-hooks that leave in ``finally``);
:func:`run_from` then calls blocks ``L..`` directly with those arguments — the stream
flowing from one block to the next — and finishes with the family's tail (final norm and
unembedding). Calling the blocks as modules fires every hook on them, ``ablate``'s
included. Nothing is replaced on the user's modules.

Where a unit writes linearly (:func:`linear_site`, continuous metrics only), less
runs: :func:`run_linear` skips the rest of the unit's block up to its write.

Only families that declare it safe (:meth:`Family.can_resume`: the model's forward is
exactly embed, blocks in order, tail) resume; any other model runs its full forward.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from meanablate.families import Family, LinearWrite
from meanablate.sites import Site

__all__ = [
    "BlockCalls",
    "ablated_heads",
    "ablated_neurons",
    "block_of",
    "linear_site",
    "record_block_calls",
    "resume_layer",
    "run_from",
    "run_linear",
    "write_delta",
]


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
            record.calls[i] = family.resume_call(tuple(args), dict(kwargs), block=i)

        planned.append((block, "forward_pre_kwargs", pre))
    with attached(planned):  # atomic against Ctrl-C (see meanablate.hooks.attached)
        yield record


def run_from(
    family: Family,
    calls: BlockCalls,
    layer: int,
    hidden: Tensor | None = None,
    positions: Tensor | None = None,
) -> Tensor:
    """The model's output tensor, running blocks ``layer..`` from the recorded calls.

    Block ``layer`` gets its recorded input (or ``hidden``); each later block the previous
    one's output in place of its recorded stream (its first positional argument).

    ``positions`` (1-D indices; continuous metrics only): the output at those positions
    only, ``[batch, len(positions), ...]``. The last block runs there only
    (:meth:`Family.block_at`: queries, the MLP half; keys and values from every position)
    unless it is block ``layer`` run from its recorded input (``hidden`` is ``None``:
    it may carry the ablation's hooks, so it runs whole); the tail runs at the positions
    only. Equal to the full output cut there up to float rounding.
    """
    found = family.blocks()
    assert found is not None
    blocks = found[1]
    last = len(blocks) - 1
    cut = False
    for i in range(layer, len(blocks)):
        call = calls.calls[i]
        assert call is not None
        args, kwargs = call
        if hidden is not None:
            args = (hidden, *args[1:])
        if positions is not None and i == last and (i > layer or hidden is not None):
            out = family.block_at(i, args, kwargs, positions)
            if out is not None:
                hidden, cut = out, True
                continue
        hidden = family.block_output(blocks[i](*args, **kwargs))
    assert hidden is not None
    if positions is not None and not cut:
        hidden = hidden[:, positions]
    return family.tail(hidden)


def linear_site(family: Family, site: Site) -> LinearWrite | None:
    """How a neurons-only or heads-only ``site`` writes linearly into the stream, when
    the run can resume there (``None``: run the unit's block itself).

    ``"post"`` writes resume from the next block's recorded input, so a later block must
    exist; ``"mid"``/``"norm"`` writes resume from the stream the family names
    (:meth:`Family.stream_key`, recorded in the clean run). Check
    ``calls.resumable_from(write.layer + 1)`` once the calls are recorded."""
    if site.positions is not None or (site.neurons is None) == (site.heads is None):
        return None
    write = family.linear_write(site)
    found = family.blocks()
    if write is None or found is None:
        return None
    if write.weight.ndim != (2 if site.neurons is not None else 3):
        return None
    if site.heads is not None and site.n_heads != write.weight.shape[0]:
        return None  # a head view other than the projection's: run the block
    if write.enters == "post":
        if write.layer + 1 >= len(found[1]):  # the last block's output is not recorded
            return None
    elif site.heads is not None:
        if type(family).finish_heads is Family.finish_heads:
            return None
    elif family.stream_key(write) is None:
        return None
    return write


def resume_layer(write: LinearWrite) -> int:
    """The first block whose recorded call :func:`run_linear` reads: the unit's own (a
    head finishing its block from the block's input) or the next."""
    return write.layer if write.weight.ndim == 3 and write.enters != "post" else write.layer + 1


def write_delta(site: Site, write: LinearWrite, act: Tensor, fill: Tensor) -> Tensor:
    """``(fill - act) @ W`` over ``site``'s units: ``[batch, pos, d_model]``.

    Neurons: ``act [batch, pos, d_mlp]``, ``W [d_mlp, d_model]``. Heads: ``act`` the flat
    ``[batch, pos, n_heads * d_head]`` projection input, ``W [n_heads, d_head, d_model]``;
    ``fill`` as :func:`~meanablate.intervene._fill_for` gives it (scalar, or ending in
    ``[n_heads, d_head]`` for heads)."""
    w = write.weight.to(act.dtype)
    if site.neurons is not None:
        idx = list(site.neurons)
        f = fill if fill.ndim == 0 else fill[..., idx]
        return (f - act[..., idx]) @ w[idx]
    heads = list(site.heads or ())
    n, d = w.shape[0], w.shape[1]
    view = act.reshape(*act.shape[:-1], n, d)[..., heads, :]
    f = fill if fill.ndim == 0 else fill[..., heads, :]
    diff = (f - view).reshape(*act.shape[:-1], len(heads) * d)
    return diff @ w[heads].reshape(len(heads) * d, w.shape[-1])


def ablated_heads(site: Site, act: Tensor, fill: Tensor) -> Tensor:
    """The flat head activation ``act`` ``[batch, pos, n_heads * d_head]`` with
    ``site``'s heads set to ``fill`` (as :func:`~meanablate.intervene._fill_for` gives it)."""
    n = site.n_heads
    assert n is not None
    view = act.reshape(*act.shape[:-1], n, act.shape[-1] // n).clone()
    heads = list(site.heads or ())
    view[..., heads, :] = fill if fill.ndim == 0 else fill[..., heads, :]
    return view.reshape(act.shape)


def ablated_neurons(site: Site, act: Tensor, fill: Tensor) -> Tensor:
    """``act`` ``[batch, pos, d_mlp]`` with ``site``'s neurons set to ``fill``."""
    idx = list(site.neurons or ())
    out = act.clone()
    out[..., idx] = fill if fill.ndim == 0 else fill[..., idx]
    return out


def run_linear(
    family: Family,
    calls: BlockCalls,
    site: Site,
    write: LinearWrite,
    act: Tensor,
    fill: Tensor,
    stream: Tensor | None = None,
    positions: Tensor | None = None,
) -> Tensor:
    """The output with ``site``'s units set to ``fill``, resumed where they write
    (at ``positions`` only, when given: see :func:`run_from`).

    The units reach the stream only through ``write.weight``, so nothing before it in
    block ``L`` (the attention, for a neuron or a head) needs to re-run:

    - ``"post"`` (GPT-2/Llama/NeoX neurons, NeoX's parallel heads): blocks ``L+1..`` run
      from the next block's recorded input plus ``(fill - act) @ W``
      (:func:`write_delta`): equal to the hooked forward up to float rounding.
    - heads entering ``"mid"``/``"norm"``: the output projection re-runs on the ablated
      activation, then the rest of block ``L`` as the block computes it
      (:meth:`Family.finish_heads`: residual add, the MLP half) from its recorded input.
    - neurons entering ``"norm"`` (post-LN encoders): the output dense re-runs on the
      ablated activation and the layer norm on its sum with ``stream``, the clean run's
      value at :meth:`Family.stream_key` (:meth:`Family.finish_block`).

    The last two take the hooked forward's own steps on its own inputs (the same bits on
    CPU). Still, only continuous metrics route here: a discrete one reruns block ``L``
    through the hook, the one definition of exact.
    """
    if write.weight.ndim == 3 and write.enters != "post":
        # Heads: the projection re-runs on the ablated input (a d_model x d_model product,
        # cheap next to the attention it replaces), so the rest of the block sees the
        # hooked forward's own sums rather than clean + delta.
        z = ablated_heads(site, act, fill)
        call = calls.calls[write.layer]
        assert call is not None
        hidden = family.finish_heads(write, z, call[0][0])
        return run_from(family, calls, write.layer + 1, hidden=hidden, positions=positions)
    if write.enters == "post":
        delta = write_delta(site, write, act, fill)
        call = calls.calls[write.layer + 1]
        assert call is not None
        hidden = call[0][0] + delta
        return run_from(family, calls, write.layer + 1, hidden=hidden, positions=positions)
    assert stream is not None
    hidden = family.finish_block(write, ablated_neurons(site, act, fill), stream)
    return run_from(family, calls, write.layer + 1, hidden=hidden, positions=positions)
