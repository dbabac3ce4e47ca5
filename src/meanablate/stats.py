"""Streaming dataset means: float64 running sums with token counts that exclude padding.

A mean of per-batch means is wrong whenever batches differ in size or padding; here every
token counts once. Memory is O(sites): one float64 sum and one count per site (per
position with ``per_position=True``), whatever the size of the data.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from meanablate.data.normalize import as_batches
from meanablate.hooks import capture, model_device, run_model, to_device
from meanablate.sites import Site, as_sites, resolve_module

if TYPE_CHECKING:
    from meanablate.executors import Executor

__all__ = ["MeanAccumulator", "Means", "compute_means"]


@dataclass
class MeanAccumulator:
    """Running float64 sums and counts per site key; exact to merge in any order.

    ``sums[key]`` has the activation's shape without batch (and without position unless
    ``per_position``); ``counts[key]`` is a float64 tensor: a scalar, or ``[pos]``.

    >>> import torch, meanablate as ma
    >>> acc = ma.MeanAccumulator()
    >>> acc.add("x", torch.tensor([[[1.0], [3.0]]]), None)           # [batch, pos, d]
    >>> acc.result()["x"]
    tensor([2.], dtype=torch.float64)
    """

    per_position: bool = False
    sums: dict[str, Tensor] = field(default_factory=dict)
    counts: dict[str, Tensor] = field(default_factory=dict)

    def add(self, key: str, act: Tensor, mask: Tensor | None) -> None:
        """Add ``act [batch, pos, ...]`` or ``[batch, ...]``, weighted by ``mask [batch, pos]``."""
        x = act.detach().to(torch.float64)
        # Dim 1 is the token position for [batch, pos, ...] activations (and for
        # [batch, pos] ones when the mask says so); [batch, n] has none.
        has_pos = x.ndim >= 3 or (mask is not None and tuple(mask.shape) == tuple(x.shape))
        if self.per_position and not has_pos:
            raise ValueError(
                f"per-position means need [batch, pos, ...] activations; site "
                f"{key} gave shape {tuple(act.shape)}"
            )
        if has_pos and mask is not None:
            if tuple(mask.shape) != tuple(x.shape[:2]):
                raise ValueError(
                    f"site {key}: attention_mask has shape {tuple(mask.shape)} "
                    f"but the activation is {tuple(act.shape)} [batch, pos, ...]"
                )
            w = mask.to(device=x.device, dtype=torch.float64)
        else:
            w = torch.ones(
                x.shape[:2] if has_pos else x.shape[:1], dtype=torch.float64, device=x.device
            )
        wx = w.reshape(w.shape + (1,) * (x.ndim - w.ndim))
        if self.per_position:
            s, c = (x * wx).sum(0), w.sum(0)
        else:
            s, c = (x * wx).sum(dim=tuple(range(w.ndim))), w.sum()
        self._accumulate(key, s.cpu(), c.cpu())

    def _accumulate(self, key: str, s: Tensor, c: Tensor) -> None:
        if key not in self.sums:
            self.sums[key], self.counts[key] = s.clone(), c.clone()
            return
        old_s, old_c = self.sums[key], self.counts[key]
        if self.per_position and s.shape[0] != old_s.shape[0]:
            # Sequences of another length: grow to the longer one (absent positions count 0).
            n = max(s.shape[0], old_s.shape[0])
            old_s, old_c = _pad0(old_s, n), _pad0(old_c, n)
            s, c = _pad0(s, n), _pad0(c, n)
        if s.shape != old_s.shape:
            raise ValueError(
                f"site {key}: activation shape changed between batches "
                f"({tuple(old_s.shape)} vs {tuple(s.shape)})"
            )
        self.sums[key], self.counts[key] = old_s + s, old_c + c

    def merge(self, other: MeanAccumulator) -> MeanAccumulator:
        """Add another accumulator's sums and counts (e.g. from a worker)."""
        if other.per_position != self.per_position:
            raise ValueError("cannot merge per-position sums with global sums")
        for key in other.sums:
            self._accumulate(key, other.sums[key], other.counts[key])
        return self

    def result(self, metadata: Mapping[str, Any] | None = None) -> Means:
        """The :class:`Means` (sum / count) of everything added."""
        means = {}
        for key, s in self.sums.items():
            c = self.counts[key]
            if torch.any(c == 0) and not self.per_position:
                raise ValueError(f"site {key}: no tokens were counted (all padding?)")
            means[key] = s / c.clamp_min(1).reshape(c.shape + (1,) * (s.ndim - c.ndim))
        return Means(means, dict(self.counts), self.per_position, dict(metadata or {}))


def _pad0(t: Tensor, n: int) -> Tensor:
    if t.shape[0] == n:
        return t
    pad = torch.zeros((n - t.shape[0], *t.shape[1:]), dtype=t.dtype)
    return torch.cat([t, pad])


@dataclass
class Means:
    """Dataset means per site key (float64), with the token counts behind them.

    ``tensors[key]`` has the activation's shape without batch — ``[d]``, ``[head, d_head]``
    — or, with ``per_position``, ``[pos, ...]``. ``counts[key]`` is the number of tokens
    (per position) that went into it. Made by :func:`compute_means`; ``save`` / ``load``
    (safetensors), :meth:`to_dataframe` (one row per site).

    >>> import torch, meanablate as ma
    >>> m = ma.compute_means(torch.nn.Sequential(torch.nn.Linear(3, 2)), ["0"], torch.ones(4, 3))
    >>> m["0"].shape, m.keys()                                    # [d_out], sites
    (torch.Size([2]), ['0'])
    """

    tensors: dict[str, Tensor]
    counts: dict[str, Tensor]
    per_position: bool = False
    metadata: dict[str, Any] = field(default_factory=dict)

    def __repr__(self) -> str:
        from meanablate.results.views import text

        return text(self)

    def _repr_html_(self) -> str:
        from meanablate.results.views import html

        return html(self)

    def to_dataframe(self) -> Any:
        """A pandas DataFrame (the ``pandas`` extra): one row per site (shape, tokens, mean abs)."""
        from meanablate.results.views import frame

        return frame(self)

    def __getitem__(self, key: str | Site) -> Tensor:
        k = key.key if isinstance(key, Site) else key
        if k not in self.tensors:
            raise KeyError(
                f"no mean for site {k!r}; means were computed for {', '.join(sorted(self.tensors))}"
            )
        return self.tensors[k]

    def __contains__(self, key: object) -> bool:
        return (key.key if isinstance(key, Site) else key) in self.tensors

    def keys(self) -> list[str]:
        return sorted(self.tensors)

    def save(self, path: str | Path) -> None:
        """Write safetensors with metadata (model class, sites, shapes, token counts)."""
        from safetensors.torch import save_file

        tensors = {f"mean::{k}": v.contiguous() for k, v in self.tensors.items()}
        tensors.update({f"count::{k}": v.reshape(-1).contiguous() for k, v in self.counts.items()})
        meta = {
            "format": "meanablate.Means",
            "per_position": json.dumps(self.per_position),
            "sites": json.dumps(self.keys()),
            "shapes": json.dumps({k: list(v.shape) for k, v in self.tensors.items()}),
            "tokens": json.dumps({k: float(v.max()) for k, v in self.counts.items()}),
            "metadata": json.dumps(self.metadata),
        }
        save_file(tensors, str(path), metadata=meta)

    @classmethod
    def load(
        cls,
        path: str | Path,
        model: nn.Module | None = None,
        batch: Tensor | Mapping[str, Any] | None = None,
    ) -> Means:
        """Read means saved by :meth:`save`; with ``model`` (and a ``batch``), check them."""
        from safetensors import safe_open
        from safetensors.torch import load_file

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        if meta.get("format") != "meanablate.Means":
            raise ValueError(f"{path} is not a meanablate means file")
        raw = load_file(str(path))
        per_position = json.loads(meta["per_position"])
        tensors = {k[len("mean::") :]: v for k, v in raw.items() if k.startswith("mean::")}
        counts = {}
        for k, v in raw.items():
            if k.startswith("count::"):
                counts[k[len("count::") :]] = v if per_position else v.reshape(())
        means = cls(tensors, counts, per_position, json.loads(meta.get("metadata", "{}")))
        if model is not None:
            means.check_model(model, batch)
        return means

    def check_model(
        self, model: nn.Module, batch: Tensor | Mapping[str, Any] | None = None
    ) -> None:
        """``ValueError`` if these means do not belong to ``model``.

        Checks the model class and that every site exists; with ``batch`` (one example is
        enough) it also runs the model once and checks each mean's shape against the real
        activation: ``[...]`` (or ``[pos, ...]`` per position) after ``[batch, pos]``.
        """
        made_for = self.metadata.get("model_class")
        if made_for and made_for != type(model).__name__:
            raise ValueError(f"means were computed on a {made_for}, not a {type(model).__name__}")
        for key in self.tensors:
            resolve_module(model, key.removesuffix("@input"))
        if batch is None:
            return
        keys = sorted(self.tensors)
        with torch.inference_mode(), capture(model, keys) as store:
            run_model(model, to_device(batch, model_device(model)))
        for key in keys:
            act = tuple(store[key].shape)
            mean = tuple(self.tensors[key].shape)
            lead = 1 if self.per_position else 0
            want = act[2:] if len(act) >= 3 else act[1:]
            if mean[lead:] != want:
                raise ValueError(
                    f"site {key}: stored mean has shape {mean}, but the model's "
                    f"activation is {act} (wanted {want} after batch and position)"
                )


def accumulate_batches(
    acc: MeanAccumulator,
    model: nn.Module,
    keys: Sequence[str],
    batches: Iterable[Tensor | Mapping[str, Any]],
) -> int:
    """Run ``model`` on ``batches``, adding the activations at ``keys`` to ``acc``.

    Returns the number of batches (0 for none).
    """
    device = model_device(model)
    n_batches = 0
    with torch.inference_mode(), capture(model, list(keys)) as store:
        for batch in batches:
            batch = to_device(batch, device)
            mask = batch.get("attention_mask") if isinstance(batch, Mapping) else None
            store.clear()
            run_model(model, batch)
            for key in keys:
                if key not in store:
                    raise ValueError(f"site {key} did not run during the forward pass")
                acc.add(key, store[key], mask)
            n_batches += 1
    return n_batches


def compute_means(
    model: nn.Module,
    sites: Site | str | Iterable[Site | str],
    batches: Iterable[Tensor | Mapping[str, Any]],
    *,
    per_position: bool = False,
    progress: bool = False,
    accumulator: MeanAccumulator | None = None,
    executor: Executor | None = None,
) -> Means:
    """Stream over ``batches`` and return the exact dataset mean at each site.

    ``batches``: any iterable of tensors ``[batch, pos]`` or dicts (tokenizer outputs;
    ``attention_mask [batch, pos]`` marks real tokens, and padding is excluded). The model
    runs under ``torch.inference_mode()``. Means cover the whole activation at each site
    (selectors are ignored), shape ``[...]`` or ``[pos, ...]`` with ``per_position``.
    ``executor``: where to run (default: here); a ``meanablate.executors.RayExecutor``
    sends shards of the data to workers and merges their float64 sums.

    >>> from torch import nn
    >>> m = nn.Sequential(nn.Linear(3, 4), nn.ReLU())
    >>> compute_means(m, ["1"], [torch.ones(2, 3)])["1"].shape
    torch.Size([4])
    """
    batches = as_batches(batches)
    keys = sorted({s.key for s in as_sites(sites)})
    if not keys:
        raise ValueError("compute_means needs at least one site")
    for key in keys:
        resolve_module(model, key.removesuffix("@input"))
    if executor is not None and not executor.in_process:
        from meanablate.executors import sharded_means

        return sharded_means(
            executor,
            model,
            keys,
            batches,
            per_position=per_position,
            progress=progress,
            accumulator=accumulator,
        )
    acc = accumulator if accumulator is not None else MeanAccumulator(per_position)
    iterator = batches
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(batches, desc="means", unit="batch")
    n_batches = accumulate_batches(acc, model, keys, iterator)
    if n_batches == 0:
        raise ValueError("compute_means got no batches")
    meta = {
        "model_class": type(model).__name__,
        "activation_shapes": {k: list(acc.sums[k].shape[1 if per_position else 0 :]) for k in keys},
        "batches": n_batches,
    }
    return acc.result(meta)
