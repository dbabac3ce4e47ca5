"""Where ablated values come from: a mean, zero, or a counterfactual (corrupted) input.

One concept for nodes and edges. A counterfactual source pairs every clean example with
a corrupted one: a batch carries ``corrupt [batch, pos]`` token ids aligned with
``tokens`` (and, when padded, ``corrupt_attention_mask`` equal to ``attention_mask``:
the two inputs must pad alike, or position ``p`` would mean different things).

Directions (as in the patching literature, e.g. Heimersheim & Nanda 2024):
``noising`` runs the clean input with corrupted values patched in (what is necessary);
``denoising`` runs the corrupted input with clean values patched in (what is sufficient).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from meanablate.discovery.graph import Graph

__all__ = [
    "Source",
    "as_source",
    "base_batch",
    "check_corrupt",
    "resample_batch",
    "source_values",
]

SourceKind = Literal["mean", "zero", "counterfactual"]
Direction = Literal["noising", "denoising"]


@dataclass(frozen=True)
class Source:
    """``kind``: ``mean`` (per position with ``per_position``), ``zero`` or
    ``counterfactual`` (the batch's ``corrupt`` tokens); ``direction`` (counterfactual
    only): ``noising`` or ``denoising``.

    >>> Source("counterfactual", direction="denoising").kind
    'counterfactual'
    """

    kind: SourceKind = "mean"
    per_position: bool = False
    direction: Direction = "noising"

    def __post_init__(self) -> None:
        if self.kind not in ("mean", "zero", "counterfactual"):
            raise ValueError(
                f"source kind must be 'mean', 'zero' or 'counterfactual', got {self.kind!r}"
            )
        if self.direction not in ("noising", "denoising"):
            raise ValueError(f"direction must be 'noising' or 'denoising', got {self.direction!r}")
        if self.direction == "denoising" and self.kind != "counterfactual":
            raise ValueError(
                "denoising needs a counterfactual source (clean values into the corrupted run)"
            )
        if self.per_position and self.kind != "mean":
            raise ValueError("per_position applies to mean sources only")


def as_source(source: Source | str) -> Source:
    """``"mean"``, ``"mean-positional"``, ``"zero"``, ``"counterfactual"`` (alias
    ``"resample"``, ``"patching"``) or a :class:`Source`."""
    if isinstance(source, Source):
        return source
    table = {
        "mean": Source("mean"),
        "mean-positional": Source("mean", per_position=True),
        "zero": Source("zero"),
        "counterfactual": Source("counterfactual"),
        "resample": Source("counterfactual"),
        "patching": Source("counterfactual"),
    }
    if source not in table:
        raise ValueError(f"unknown source {source!r}; choose one of {', '.join(table)} or a Source")
    return table[source]


def check_corrupt(batch: Mapping[str, Any]) -> tuple[Tensor, Tensor | None]:
    """The batch's corrupted tokens and mask, checked against the clean ones."""
    if not isinstance(batch, Mapping) or "corrupt" not in batch:
        have = sorted(batch) if isinstance(batch, Mapping) else type(batch).__name__
        raise ValueError(
            "a counterfactual source needs batch['corrupt']: corrupted token ids "
            f"[batch, pos] aligned with batch['tokens'] (have {have})"
        )
    key = "tokens" if "tokens" in batch else "input_ids"
    tokens = batch.get(key)
    if tokens is None:
        raise ValueError(f"a batch needs 'tokens' (or 'input_ids'), have {sorted(batch)}")
    corrupt = batch["corrupt"]
    if not isinstance(corrupt, Tensor) or corrupt.shape != tokens.shape:
        shape = tuple(corrupt.shape) if isinstance(corrupt, Tensor) else type(corrupt).__name__
        raise ValueError(
            f"batch['corrupt'] has shape {shape}, batch[{key!r}] has {tuple(tokens.shape)}: "
            "each clean example needs a corrupted one of the same length (pad both alike)"
        )
    mask = batch.get("attention_mask")
    cmask = batch.get("corrupt_attention_mask", mask)
    if (mask is None) != (cmask is None) or (
        mask is not None
        and (mask.shape != cmask.shape or not torch.equal(mask.bool(), cmask.bool()))
    ):
        raise ValueError(
            f"batch['corrupt_attention_mask'] ({_describe_mask(cmask)}) differs from "
            f"batch['attention_mask'] ({_describe_mask(mask)}): the clean and corrupted "
            "inputs must pad the same positions (align them, e.g. pad both to the same "
            "length on the same side)"
        )
    return corrupt, cmask


def _describe_mask(mask: Any) -> str:
    """A mask's shape and real tokens per example, for error messages."""
    if mask is None:
        return "absent"
    if not isinstance(mask, Tensor):
        return type(mask).__name__
    lengths = mask.bool().sum(-1).tolist() if mask.ndim >= 1 else mask.tolist()
    return f"shape {tuple(mask.shape)}, real tokens per example {lengths}"


def resample_batch(batch: Any, method: str) -> dict[str, Any] | None:
    """For node ablation with ``method="resample"``: the batch's corrupted input, run as
    the source of the patched activations (``None`` for other methods).

    >>> b = {"tokens": torch.tensor([[1, 2]]), "corrupt": torch.tensor([[2, 1]])}
    >>> resample_batch(b, "resample")["tokens"].tolist()
    [[2, 1]]
    """
    if method != "resample":
        return None
    corrupt, cmask = check_corrupt(batch)
    out = {k: v for k, v in batch.items() if k not in ("corrupt", "corrupt_attention_mask")}
    out["tokens" if "tokens" in batch else "input_ids"] = corrupt
    if cmask is not None:
        out["attention_mask"] = cmask
    return out


def base_batch(batch: Mapping[str, Any], source: Source) -> dict[str, Any]:
    """The batch the patched run reads: the clean one, or (denoising) the corrupted one
    with the task's fields unchanged."""
    b = dict(batch)
    if source.kind == "counterfactual" and source.direction == "denoising":
        corrupt, cmask = check_corrupt(batch)
        b["tokens"], b["corrupt"] = corrupt, batch["tokens"]
        if cmask is not None:
            b["attention_mask"] = cmask
    return b


def other_tokens(batch: Mapping[str, Any], source: Source) -> tuple[Tensor, Tensor | None]:
    """Tokens whose run supplies the patched values (the counterpart of ``base_batch``)."""
    corrupt, cmask = check_corrupt(batch)
    if source.direction == "denoising":
        return batch["tokens"], batch.get("attention_mask")
    return corrupt, cmask


def source_means(
    family: Any, graph: Graph, batches: Sequence[Mapping[str, Any]], per_position: bool
) -> Tensor:
    """Mean output of every source node over real tokens: ``[n_src, d_model]`` or
    ``[n_src, pos, d_model]``; float64 running sums over tokens (padding excluded by
    selection), not a mean of batch means."""
    total: Tensor | None = None
    count: Tensor | None = None
    with torch.inference_mode():
        for batch in batches:
            tokens, mask = batch["tokens"], batch.get("attention_mask")
            outs = family.run(graph, tokens, mask, keep_outs=True).outs.double()
            w = torch.ones(tokens.shape, dtype=torch.float64, device=outs.device)
            if mask is not None:
                w = mask.to(torch.float64)
            if per_position:
                s, c = torch.einsum("nbpd,bp->npd", outs, w), w.sum(0)
                if total is not None and s.shape[1] != total.shape[1]:
                    p = max(s.shape[1], total.shape[1])
                    s, total = _pad(s, p, 1), _pad(total, p, 1)
                    c, count = _pad(c, p, 0), _pad(count, p, 0)  # type: ignore[arg-type]
            else:
                s, c = torch.einsum("nbpd,bp->nd", outs, w), w.sum()
            total = s if total is None else total + s
            count = c if count is None else count + c
    if total is None:
        raise ValueError("mean sources need at least one batch")
    assert count is not None
    if per_position:
        return total / count.clamp(min=1)[None, :, None]
    if float(count) == 0:
        raise ValueError("mean sources need at least one real (unpadded) token")
    return total / count


def _pad(t: Tensor, n: int, dim: int) -> Tensor:
    if t.shape[dim] == n:
        return t
    shape = list(t.shape)
    shape[dim] = n - t.shape[dim]
    return torch.cat([t, t.new_zeros(shape)], dim=dim)


class SourceValues:
    """Per batch, what an ablated edge (or node) carries: ``[n_src, b|1, p|1, d_model]``."""

    def __init__(self, family: Any, graph: Graph, batches: Sequence[Any], source: Source):
        self.family, self.graph, self.source = family, graph, source
        self.means: Tensor | None = None
        if source.kind == "mean":
            self.means = source_means(family, graph, batches, source.per_position)
        if source.kind == "counterfactual":
            for b in batches:
                check_corrupt(b)

    def __call__(self, batch: Mapping[str, Any], dtype: torch.dtype) -> Tensor:
        tokens = batch["tokens"]
        n_src, p = len(self.graph.srcs), tokens.shape[1]
        d = self.family.cfg.d_model
        if self.source.kind == "zero":
            return torch.zeros(n_src, 1, 1, d, dtype=dtype, device=tokens.device)
        if self.source.kind == "mean":
            assert self.means is not None
            m = self.means.to(device=tokens.device, dtype=dtype)
            if self.source.per_position:
                if m.shape[1] < p:
                    raise ValueError(
                        f"per-position means cover {m.shape[1]} positions, the input has {p}"
                    )
                return m[:, None, :p]
            return m[:, None, None]
        src_tokens, src_mask = other_tokens(batch, self.source)
        with torch.no_grad():
            outs = self.family.run(self.graph, src_tokens, src_mask, keep_outs=True).outs
        return outs.to(dtype).clone()


def source_values(
    family: Any, graph: Graph, batches: Sequence[Any], source: Source
) -> SourceValues:
    """Prepare ``source`` over ``batches`` (means are computed once, here)."""
    return SourceValues(family, graph, batches, source)
