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
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import Tensor, nn

from meanablate._display import Shown
from meanablate._unwrap import unwrap
from meanablate.data.normalize import as_batches
from meanablate.errors import MissingSiteError
from meanablate.families import check_sites
from meanablate.hooks import capture, hooked, model_device, run_model, to_device
from meanablate.means_io import FORMAT, read_means_file, write_safetensors
from meanablate.sites import Site, as_sites, resolve_module

if TYPE_CHECKING:
    from meanablate.executors import Executor

__all__ = ["MEAN_KINDS", "MeanAccumulator", "Means", "compute_means", "is_pattern_key"]

# Attention patterns and scores are [batch, head, q, k]: two position axes after the head
# axis, unlike every other activation ([batch, pos, ...]).
PATTERN_SUFFIXES = ("attn.hook_pattern", "attn.hook_attn_scores")


def is_pattern_key(key: str) -> bool:
    """Whether site ``key`` holds attention patterns/scores ``[batch, head, q, k]``.

    Their means keep the head axis: ``[head, q, k]``, averaged over the batch only (the
    positions are axes of the activation itself), in both ``per_position`` modes; an
    entry counts the examples whose query *and* key positions are real tokens.
    """
    return key.endswith(PATTERN_SUFFIXES)


# per_position: a mean per position; plain: one mean over all positions; plain_except: one
# mean over all positions but ``keep_positions``, which keep their own (e.g. BOS).
MEAN_KINDS: tuple[str, ...] = ("per_position", "plain", "plain_except")
MeanKind = Literal["per_position", "plain", "plain_except"]


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
        if is_pattern_key(key):
            self._add_pattern(key, act, mask)
            return
        x = act.detach().to(torch.float64)
        # Dim 1 is the token position for [batch, pos, ...] activations (and for
        # [batch, pos] ones when the mask says so); [batch, n] has none.
        has_pos = x.ndim >= 3 or (mask is not None and tuple(mask.shape) == tuple(x.shape))
        if self.per_position and not has_pos:
            raise ValueError(
                f"per-position means need [batch, pos, ...] activations; site "
                f"{key} gave shape {tuple(act.shape)}"
            )
        lead = 2 if has_pos else 1
        # [batch * pos, ...] (OPT's fc1/fc2 flatten batch and position): which rows are
        # padding is not known here, and a mean over every row would take it in.
        flat = not has_pos and mask is not None and x.shape[:1] != mask.shape[:1]
        if flat and not bool(_as_keep(mask, key).all()):  # type: ignore[arg-type]
            raise ValueError(
                f"site {key}: the activation has shape {tuple(act.shape)}, which does "
                f"not start with the batch's [batch, pos] = {tuple(mask.shape)} (the "
                "module flattens batch and position), so the padding in "
                "attention_mask cannot be left out of its mean; use a site shaped "
                "[batch, pos, ...], or batches without padding"
            )
        if has_pos and mask is not None:
            if tuple(mask.shape) != tuple(x.shape[:2]):
                raise ValueError(
                    f"site {key}: attention_mask has shape {tuple(mask.shape)} "
                    f"but the activation is {tuple(act.shape)} [batch, pos, ...]"
                )
            keep = _as_keep(mask, key).to(x.device)
        else:
            keep = torch.ones(x.shape[:lead], dtype=torch.bool, device=x.device)
        # Padding is left out by *selection*: a NaN or inf that a model writes at a padded
        # position never enters a sum (multiplying by a 0 mask would give NaN x 0 = NaN).
        if self.per_position:
            picked = torch.where(keep.reshape(keep.shape + (1,) * (x.ndim - 2)), x, 0.0)
            s, c = picked.sum(0), keep.sum(0).to(torch.float64)
        else:
            s = x[keep].sum(0)
            c = keep.sum().to(torch.float64)
        self._accumulate(key, s.cpu(), c.cpu())

    def _add_pattern(self, key: str, act: Tensor, mask: Tensor | None) -> None:
        """Sum ``act [batch, head, q, k]`` over the batch where query and key are real."""
        if act.ndim != 4 or act.shape[2] != act.shape[3]:
            raise ValueError(
                f"site {key}: attention patterns are [batch, head, q, k] with q == k, got "
                f"shape {tuple(act.shape)}"
            )
        x = act.detach().to(torch.float64)
        b, _, n, _ = x.shape
        if mask is None:
            real = torch.ones(b, n, dtype=torch.bool, device=x.device)
        elif tuple(mask.shape) != (b, n):
            raise ValueError(
                f"site {key}: attention_mask has shape {tuple(mask.shape)}, wanted {(b, n)} "
                f"for the attention pattern {tuple(act.shape)} [batch, head, q, k]"
            )
        else:
            real = mask.to(device=x.device).bool()
        both = real[:, :, None] & real[:, None, :]  # [batch, q, k]
        # Selected, not multiplied: padding may hold NaN or inf, and NaN * 0 is NaN.
        s = torch.where(both[:, None], x, torch.zeros((), dtype=x.dtype, device=x.device))
        self._accumulate(key, s.sum(0).cpu(), both.sum(0).to(torch.float64).cpu())

    def _accumulate(self, key: str, s: Tensor, c: Tensor) -> None:
        if key not in self.sums:
            self.sums[key], self.counts[key] = s.clone(), c.clone()
            return
        old_s, old_c = self.sums[key], self.counts[key]
        if is_pattern_key(key) and s.shape != old_s.shape:
            raise ValueError(
                f"site {key}: attention pattern shape changed between batches "
                f"({tuple(old_s.shape)} vs {tuple(s.shape)}); its mean is [head, q, k], so "
                "every batch needs the same length (pad them)"
            )
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
            if is_pattern_key(key):
                # [q, k] counts: a pair that is never real (padding in every example)
                # gets 0, like an absent position of per-position means.
                means[key] = s / c.clamp_min(1)
                continue
            if torch.any(c == 0) and not self.per_position:
                raise ValueError(f"site {key}: no tokens were counted (all padding?)")
            means[key] = s / c.clamp_min(1).reshape(c.shape + (1,) * (s.ndim - c.ndim))
        return Means(means, dict(self.counts), self.per_position, dict(metadata or {}))


def _as_keep(mask: Tensor, key: str) -> Tensor:
    """An attention mask as booleans (1 = a real token); other values are an error."""
    if mask.dtype == torch.bool:
        return mask
    if not bool(torch.all((mask == 0) | (mask == 1))):
        raise ValueError(
            f"site {key}: attention_mask must hold only 0 (padding) and 1 (a real token), "
            f"got values {sorted(set(mask.unique().tolist()))[:6]}"
        )
    return mask != 0


def _pad0(t: Tensor, n: int) -> Tensor:
    if t.shape[0] == n:
        return t
    pad = torch.zeros((n - t.shape[0], *t.shape[1:]), dtype=t.dtype)
    return torch.cat([t, pad])


@dataclass(repr=False)
class Means(Shown):
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

    def __getitem__(self, key: str | Site) -> Tensor:
        k = key.key if isinstance(key, Site) else key
        if k not in self.tensors:
            raise MissingSiteError(
                k,
                f"no mean for site {k!r}; means were computed for "
                f"{', '.join(sorted(self.tensors)) or 'no sites'}",
            )
        return self.tensors[k]

    def __contains__(self, key: object) -> bool:
        return (key.key if isinstance(key, Site) else key) in self.tensors

    def keys(self) -> list[str]:
        return sorted(self.tensors)

    @property
    def kind(self) -> str:
        """The mean kind (see :data:`MEAN_KINDS`), as recorded when the means were made."""
        default = "per_position" if self.per_position else "plain"
        return str(self.metadata.get("mean_kind", default))

    def save(self, path: str | Path) -> None:
        """Write safetensors with metadata (model class, sites, shapes, token counts)."""
        tensors = {f"mean::{k}": v.contiguous() for k, v in self.tensors.items()}
        tensors.update({f"count::{k}": v.reshape(-1).contiguous() for k, v in self.counts.items()})
        meta = {
            "format": FORMAT,
            "per_position": json.dumps(self.per_position),
            "sites": json.dumps(self.keys()),
            "shapes": json.dumps(
                {k: list(v.shape) for k, v in self.tensors.items()}, sort_keys=True
            ),
            "tokens": json.dumps(
                {k: float(v.max()) for k, v in self.counts.items()}, sort_keys=True
            ),
            "metadata": json.dumps(self.metadata, sort_keys=True),
        }
        # Our own writer: the same means give the same bytes (see meanablate.means_io).
        write_safetensors(path, tensors, meta)

    @classmethod
    def load(
        cls,
        path: str | Path,
        model: nn.Module | None = None,
        batch: Tensor | Mapping[str, Any] | None = None,
    ) -> Means:
        """Read means saved by :meth:`save`; with ``model`` (and a ``batch``), check them.

        A file that is missing, truncated, corrupted, of another format (nothing is ever
        unpickled) or with bad metadata is a :class:`~meanablate.errors.MeansFileError`
        (a ``ValueError``) naming the file.
        """
        tensors, counts, per_position, metadata = read_means_file(path)
        means = cls(tensors, counts, per_position, metadata)
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
        model = unwrap(model)
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
            if is_pattern_key(key):
                lead, want = 0, act[1:]
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

    Each activation is added when its module runs: a model that later adds into it in
    place (Falcon's ``mlp_output += attention_output``) cannot change what is counted,
    and a module that runs several times in one forward (shared between layers, as in
    ALBERT) contributes every call — the mean that its ablation, which replaces every
    call, stands for. Returns the number of batches (0 for none).
    """
    device = model_device(model)
    n_batches = 0
    seen: set[str] = set()
    current: dict[str, Any] = {"mask": None, "lead": None}

    def adder(key: str) -> Any:
        def add(act: Tensor) -> None:
            seen.add(key)
            _check_lead(key, act, current["lead"], acc.per_position)
            acc.add(key, act, current["mask"])

        return add

    with torch.inference_mode(), hooked(model, {k: adder(k) for k in keys}):
        for batch in batches:
            batch = to_device(batch, device)
            current["mask"] = batch.get("attention_mask") if isinstance(batch, Mapping) else None
            current["lead"] = _batch_lead(batch)
            seen.clear()
            run_model(model, batch)
            for key in keys:
                if key not in seen:
                    raise ValueError(f"site {key} did not run during the forward pass")
            n_batches += 1
    return n_batches


def _batch_lead(batch: Any) -> tuple[int, int] | None:
    """``[batch, pos]`` of a batch's input; ``(batch, -1)`` for an input with no position
    axis (a float tensor of 4 or more dims: images); ``None``: not known."""
    if isinstance(batch, Mapping):
        for name in ("input_ids", "tokens", "input", "attention_mask", "inputs_embeds"):
            value = batch.get(name)
            if isinstance(value, Tensor) and value.ndim >= 2:
                return (int(value.shape[0]), int(value.shape[1]))
        return None
    if not isinstance(batch, Tensor) or batch.ndim < 2:
        return None
    if batch.ndim >= 4 and batch.is_floating_point():
        return (int(batch.shape[0]), -1)
    return (int(batch.shape[0]), int(batch.shape[1]))


def _check_lead(key: str, act: Tensor, lead: tuple[int, int] | None, per_position: bool) -> None:
    """A mean over ``[batch, pos]`` needs dim 1 to be the input's positions: a CNN's
    ``[batch, channel, h, w]`` would be averaged over its channels, a sequence-first
    ``[pos, batch, d]`` per batch row instead of per position."""
    if lead is None or act.ndim < 3 or is_pattern_key(key) or tuple(act.shape[:2]) == lead:
        return
    if not per_position and act.shape[0] != lead[0]:
        return  # [pos, batch, ...]: a mean over both axes is over every token all the same
    what = "has no position axis" if lead[1] == -1 else f"has [batch, pos] = {lead}"
    raise ValueError(
        f"site {key}: means average over dims 0 and 1 ([batch, pos, ...]), but the "
        f"activation has shape {tuple(act.shape)} while the input {what}, so dim 1 is "
        "not the position axis (a CNN's channels, or a sequence-first layout); use a site "
        "shaped [batch, pos, ...], or method='zero'"
    )


def compute_means(
    model: nn.Module,
    sites: Site | str | Iterable[Site | str],
    batches: Iterable[Tensor | Mapping[str, Any]],
    *,
    per_position: bool = False,
    progress: bool = False,
    accumulator: MeanAccumulator | None = None,
    executor: Executor | None = None,
    kind: MeanKind | None = None,
    keep_positions: Sequence[int] | None = None,
) -> Means:
    """Stream over ``batches`` and return the exact dataset mean at each site.

    ``batches``: any iterable of tensors ``[batch, pos]`` or dicts (tokenizer outputs;
    ``attention_mask [batch, pos]`` marks real tokens, and padding is excluded). The model
    runs under ``torch.inference_mode()``. Means cover the whole activation at each site
    (selectors are ignored), shape ``[...]`` or ``[pos, ...]`` with ``per_position``.
    ``executor``: where to run (default: here); a ``meanablate.executors.RayExecutor``
    sends shards of the data to workers and merges their float64 sums.

    ``kind`` (see :data:`MEAN_KINDS`; default ``"per_position"`` if ``per_position`` else
    ``"plain"``): ``"plain_except"`` gives one mean over every position except
    ``keep_positions`` (default ``[0]``, e.g. BOS), which keep their own per-position
    mean; its tensors are ``[pos, ...]`` like per-position ones (``per_position`` is then
    true on the result). The kind is recorded in ``Means.metadata["mean_kind"]``.

    >>> from torch import nn
    >>> m = nn.Sequential(nn.Linear(3, 4), nn.ReLU())
    >>> compute_means(m, ["1"], [torch.ones(2, 3)])["1"].shape
    torch.Size([4])
    """
    batches = as_batches(batches)
    model = unwrap(model)
    kind, keep = _mean_kind(kind, per_position, keep_positions)
    # plain_except is pooled from the per-position sums (see _as_kind)
    per_position = kind in ("per_position", "plain_except")
    parsed = as_sites(sites)
    keys = sorted({s.key for s in parsed})
    if not keys:
        raise ValueError("compute_means needs at least one site")
    for key in keys:
        resolve_module(model, key.removesuffix("@input"))
    check_sites(model, parsed)  # e.g. heads= on an activation without a head axis
    if executor is not None and not executor.in_process:
        from meanablate.executors import sharded_means

        means = sharded_means(
            executor,
            model,
            keys,
            batches,
            per_position=per_position,
            progress=progress,
            accumulator=accumulator,
        )
        return _as_kind(means, kind, keep)
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
        "activation_shapes": {
            k: list(acc.sums[k].shape[1 if per_position and not is_pattern_key(k) else 0 :])
            for k in keys
        },
        "batches": n_batches,
    }
    return _as_kind(acc.result(meta), kind, keep)


def _mean_kind(
    kind: str | None, per_position: bool, keep_positions: Sequence[int] | None
) -> tuple[str, list[int]]:
    if kind is None:
        kind = "per_position" if per_position else "plain"
    if kind not in MEAN_KINDS:
        raise ValueError(f"kind must be one of {', '.join(MEAN_KINDS)}; got {kind!r}")
    if per_position and kind != "per_position":
        raise ValueError(f"per_position=True contradicts kind={kind!r}; give one of them")
    if kind != "plain_except":
        if keep_positions is not None:
            raise ValueError(f"keep_positions is for kind='plain_except', not {kind!r}")
        return kind, []
    keep = [0] if keep_positions is None else list(keep_positions)
    if not all(isinstance(p, int) and not isinstance(p, bool) and p >= 0 for p in keep):
        raise ValueError(f"keep_positions must be position indices >= 0; got {keep_positions!r}")
    return kind, sorted(set(keep))


def _as_kind(means: Means, kind: str, keep: list[int]) -> Means:
    """Record ``kind``; for ``plain_except`` pool every position outside ``keep``."""
    means.metadata["mean_kind"] = kind
    if kind != "plain_except":
        return means
    means.metadata["keep_positions"] = keep
    for key, mean in means.tensors.items():
        if is_pattern_key(key):  # [head, q, k]: no pooled position axis
            continue
        counts = means.counts[key]
        n_pos = counts.shape[0]
        if keep and keep[-1] >= n_pos:
            raise ValueError(
                f"keep_positions {keep} reach past the {n_pos} positions of site {key}"
            )
        pooled = torch.ones(n_pos, dtype=torch.bool)
        pooled[keep] = False
        c = counts[pooled]
        if not bool(pooled.any()) or float(c.sum()) == 0:
            raise ValueError(f"site {key}: no tokens outside keep_positions {keep} to pool")
        w = c.reshape(c.shape + (1,) * (mean.ndim - 1))
        shared = (mean[pooled] * w).sum(0) / c.sum()
        means.tensors[key] = torch.where(
            pooled.reshape((n_pos,) + (1,) * (mean.ndim - 1)), shared, mean
        )
    return means
