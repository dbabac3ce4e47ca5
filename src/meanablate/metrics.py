"""Metrics on model outputs, batched, per example: l2, kl, logit_diff, loss, prob, ...

Every metric maps ``(logits, batch, clean_logits)`` to one value per example ``[batch]``.
``logits`` is ``[batch, pos, vocab]`` (or ``[batch, vocab]``); ``batch`` is the dict the
model ran on, carrying the task's fields:

- ``target`` ``[batch, pos]`` (or ``[batch]``): the correct class at scored positions,
  ``-100`` elsewhere (the PyTorch ignore-index convention);
- ``wrong`` ``[batch, pos]``: the competing class, for ``logit_diff``;
- ``target_value`` ``[batch, pos]``: a number per scored position (NaN elsewhere), for
  ``mse`` on a model with one output;
- ``metric_mask`` ``[batch, pos]``: positions that ``kl`` / ``l2`` read (default: every
  real token by ``attention_mask``, or every position).

Comparing metrics (``l2``, ``kl``) need ``clean_logits``; the effect of an ablation is
their value. Task metrics (``loss``, ``logit_diff``, ``prob``, ``accuracy``, ``mse``) are
absolute; the effect of an ablation is ``metric(ablated) - metric(clean)``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "METRICS",
    "Metric",
    "accuracy",
    "get_metric",
    "kl_div",
    "l2",
    "logit_diff",
    "loss",
    "mse",
    "prob",
    "scored_mask",
]

IGNORE = -100


def _seq(logits: Tensor) -> Tensor:
    # Treat [batch, vocab] as one position so every metric sees [batch, pos, vocab].
    return logits.unsqueeze(1) if logits.ndim == 2 else logits


def _seq_target(t: Tensor) -> Tensor:
    return t.unsqueeze(1) if t.ndim == 1 else t


def _need(batch: Mapping[str, Any], key: str, metric: str) -> Tensor:
    if not isinstance(batch, Mapping) or key not in batch:
        have = sorted(batch) if isinstance(batch, Mapping) else type(batch).__name__
        raise ValueError(f"metric {metric!r} needs batch[{key!r}] (have {have})")
    return batch[key]


def scored_mask(batch: Mapping[str, Any] | Tensor, logits: Tensor) -> Tensor:
    """Bool ``[batch, pos]``: the positions a metric reads."""
    lg = _seq(logits)
    ones = torch.ones(lg.shape[:2], dtype=torch.bool, device=lg.device)
    if not isinstance(batch, Mapping):
        return ones
    if "metric_mask" in batch:
        key, mask = "metric_mask", _seq_target(batch["metric_mask"]).bool()
    elif "target" in batch:
        key, mask = "target", _seq_target(batch["target"]) != IGNORE
    elif "target_value" in batch:
        key, mask = "target_value", ~torch.isnan(_seq_target(batch["target_value"]))
    elif "attention_mask" in batch and logits.ndim == 3:
        key, mask = "attention_mask", batch["attention_mask"].bool()
    else:
        return ones
    if tuple(mask.shape) != tuple(lg.shape[:2]):
        # A field of another shape would be gathered or broadcast silently (a [batch]
        # target against [batch, pos, vocab] logits would score position 0 only).
        raise ValueError(
            f"batch[{key!r}] has shape {tuple(batch[key].shape)}, which does not fit the "
            f"output's [batch, pos] {tuple(lg.shape[:2])}"
        )
    return mask


def _masked_mean(values: Tensor, mask: Tensor, metric: str) -> Tensor:
    if values.shape != mask.shape:
        raise ValueError(
            f"metric {metric!r}: scored positions {tuple(mask.shape)} do not fit "
            f"the output's [batch, pos] {tuple(values.shape)}"
        )
    return _mean_at(values, mask, _scored_counts(mask, metric))


def _scored_counts(mask: Tensor, metric: str) -> Tensor:
    """Scored positions per example ``[batch]``; an example with none is an error."""
    counts = mask.sum(1)
    if torch.any(counts == 0):
        raise ValueError(f"metric {metric!r}: an example has no scored position")
    return counts


def _mean_at(values: Tensor, mask: Tensor, counts: Tensor) -> Tensor:
    """Mean of ``values [batch, pos]`` over the positions in ``mask``: ``[batch]``."""
    return torch.where(mask, values, torch.zeros_like(values)).sum(1) / counts


def _check_classes(t: Tensor, mask: Tensor, vocab: int, metric: str) -> Tensor:
    if t.dtype.is_floating_point:
        raise TypeError(f"metric {metric!r}: class targets must be integers, got {t.dtype}")
    picked = t[mask]
    if picked.numel() and (int(picked.min()) < 0 or int(picked.max()) >= vocab):
        raise ValueError(
            f"metric {metric!r}: target classes must lie in [0, {vocab}) for an "
            f"output with {vocab} classes, got [{int(picked.min())}, "
            f"{int(picked.max())}]"
        )
    return t.clamp(0, vocab - 1)


def l2(logits: Tensor, batch: Any, clean: Tensor | None) -> Tensor:
    """The seed's L2 distance to the clean output, over the scored positions: ``[batch]``."""
    if clean is None:
        raise ValueError("metric 'l2' compares with the clean output; pass clean_logits")
    diff = (_seq(logits) - _seq(clean)).double()
    mask = scored_mask(batch, logits)
    diff = torch.where(mask[..., None], diff, torch.zeros_like(diff))
    return diff.pow(2).sum(dim=(1, 2)).sqrt()


def kl_div(logits: Tensor, batch: Any, clean: Tensor | None) -> Tensor:
    """KL(clean || ablated) of the output distributions, mean over scored positions."""
    if clean is None:
        raise ValueError("metric 'kl' compares with the clean output; pass clean_logits")
    lp = torch.log_softmax(_seq(logits).double(), -1)
    lq = torch.log_softmax(_seq(clean).double(), -1)
    kl = (lq.exp() * (lq - lp)).sum(-1)
    return _masked_mean(kl, scored_mask(batch, logits), "kl")


def logit_diff(logits: Tensor, batch: Any, clean: Tensor | None = None) -> Tensor:
    """``logit[target] - logit[wrong]``, mean over scored positions: ``[batch]``."""
    lg = _seq(logits)
    mask = scored_mask(batch, logits)
    t = _check_classes(
        _seq_target(_need(batch, "target", "logit_diff")), mask, lg.shape[-1], "logit_diff"
    )
    w = _check_classes(
        _seq_target(_need(batch, "wrong", "logit_diff")), mask, lg.shape[-1], "logit_diff"
    )
    # subtract in float64 like every other metric (a float32 difference is rounded)
    picked = lg.gather(-1, torch.stack([t, w], -1)).double()
    return _masked_mean(picked[..., 0] - picked[..., 1], mask, "logit_diff")


def loss(logits: Tensor, batch: Any, clean: Tensor | None = None) -> Tensor:
    """Cross-entropy of ``target``, mean over scored positions: ``[batch]``."""
    lg = _seq(logits)
    mask = scored_mask(batch, logits)
    t = _check_classes(_seq_target(_need(batch, "target", "loss")), mask, lg.shape[-1], "loss")
    nll = -torch.log_softmax(lg.double(), -1).gather(-1, t[..., None])[..., 0]
    return _masked_mean(nll, mask, "loss")


def prob(logits: Tensor, batch: Any, clean: Tensor | None = None) -> Tensor:
    """Probability of ``target``, mean over scored positions: ``[batch]``."""
    lg = _seq(logits)
    mask = scored_mask(batch, logits)
    t = _check_classes(_seq_target(_need(batch, "target", "prob")), mask, lg.shape[-1], "prob")
    p = torch.softmax(lg.double(), -1).gather(-1, t[..., None])[..., 0]
    return _masked_mean(p, mask, "prob")


def accuracy(logits: Tensor, batch: Any, clean: Tensor | None = None) -> Tensor:
    """Fraction of scored positions whose argmax is ``target``: ``[batch]``."""
    lg = _seq(logits)
    mask = scored_mask(batch, logits)
    t = _seq_target(_need(batch, "target", "accuracy"))
    _check_classes(t, mask, lg.shape[-1], "accuracy")
    return _masked_mean((lg.argmax(-1) == t).double(), mask, "accuracy")


def mse(logits: Tensor, batch: Any, clean: Tensor | None = None) -> Tensor:
    """Squared error of a one-output model against ``target_value``: ``[batch]``."""
    lg = _seq(logits)
    if lg.shape[-1] != 1:
        raise ValueError(f"metric 'mse' reads a model with one output, got {lg.shape[-1]}")
    tv = _seq_target(_need(batch, "target_value", "mse")).double()
    mask = ~torch.isnan(tv)
    err = (lg[..., 0].double() - torch.nan_to_num(tv)).pow(2)
    return _masked_mean(err, mask, "mse")


@dataclass(frozen=True)
class Metric:
    """A named metric: ``fn(logits, batch, clean) -> [batch]``.

    ``compares``: the metric measures distance to the clean output (its effect is its
    value); otherwise the effect is the change ``metric(ablated) - metric(clean)``.
    ``higher_is_better``: the direction of good task performance (for reports).
    """

    name: str
    fn: Callable[[Tensor, Any, Tensor | None], Tensor]
    compares: bool = False
    higher_is_better: bool = True

    def __call__(self, logits: Tensor, batch: Any, clean: Tensor | None = None) -> Tensor:
        return self.fn(logits, batch, clean)

    def effect(self, logits: Tensor, batch: Any, clean: Tensor) -> Tensor:
        """Per-example effect of an ablation that turned ``clean`` into ``logits``."""
        if self.compares:
            return self.fn(logits, batch, clean)
        return self.fn(logits, batch, clean) - self.fn(clean, batch, clean)

    def bind(self, batch: Any, clean: Tensor) -> Callable[[Tensor], Tensor]:
        """``effect`` with the clean side computed once, for sweeps over many ablations."""
        if self.fn is kl_div:
            return _kl_bound(batch, clean)
        if self.compares:
            return lambda logits: self.fn(logits, batch, clean)
        base = self.fn(clean, batch, clean)
        return lambda logits: self.fn(logits, batch, clean) - base


def _kl_bound(batch: Any, clean: Tensor) -> Callable[[Tensor], Tensor]:
    """``kl_div(logits, batch, clean)`` with the clean side prepared once (sweeps)."""
    zc = _seq(clean)
    lq = torch.log_softmax(zc.double(), -1)
    q64 = lq.exp()
    q_lq = (q64 * lq).sum(-1)
    mask = scored_mask(batch, clean)
    counts = _scored_counts(mask, "kl")  # once: a sweep calls kl_bound per unit
    q32 = q64.float() if zc.dtype == torch.float32 else None

    def reduce(kl: Tensor) -> Tensor:
        return _mean_at(kl.double(), mask, counts)

    def kl_lse(z: Tensor) -> Tensor:
        # sum q log q - q.z + logsumexp(z): three reductions over one float64 copy, no
        # [batch, pos, vocab] temporaries beyond it. Rounding can leave -1e-16: KL >= 0.
        z = z.double()
        return torch.logsumexp(z, -1).add_(q_lq).sub_(torch.linalg.vecdot(q64, z)).clamp_min_(0)

    def kl_bound(logits: Tensor) -> Tensor:
        z = _seq(logits)
        if q32 is None or z.dtype != torch.float32 or z.device.type != "cpu":
            return reduce(kl_lse(z))
        kl = _kl_float32(z, zc, q32)
        if not bool(torch.isfinite(kl).all()):  # a logit moved by > ~88: expm1 overflowed
            return reduce(kl_lse(z))
        return reduce(kl)

    return kl_bound


def _kl_float32(z: Tensor, zc: Tensor, q: Tensor) -> Tensor:
    """KL(q || softmax(z)) ``[batch, pos]`` for float32 CPU logits near the clean ``zc``.

    On a CPU a float64 pass over the logits is most of a sweep's per-unit cost beyond the
    forward. In float32, work with the logit change d = z - zc (exact: the two are close),
    centred so q.d = 0; then KL = log(sum q e^d) = log1p(q.(expm1(d) - d)) with every term
    >= 0 and no cancellation, so the error is a few float32 ulps of the KL plus
    ~eps * E_q|d|. Rows go in blocks of ~256 kB so each block's five passes stay in cache.
    """
    vocab = z.shape[-1]
    zf, zcf, qf = z.reshape(-1, vocab), zc.reshape(-1, vocab), q.reshape(-1, vocab)
    n = zf.shape[0]
    rows = max(1, (1 << 18) // (4 * vocab))
    d_buf = torch.empty(min(rows, n), vocab)
    e_buf = torch.empty_like(d_buf)
    out = torch.empty(n)
    for s in range(0, n, rows):
        r = min(rows, n - s)
        qs = qf[s : s + r]
        d = torch.sub(zf[s : s + r], zcf[s : s + r], out=d_buf[:r])
        d.sub_(torch.linalg.vecdot(qs, d)[:, None])
        e = torch.expm1(d, out=e_buf[:r]).sub_(d)
        out[s : s + r] = torch.linalg.vecdot(qs, e)
    return torch.log1p_(out).reshape(z.shape[:-1])


METRICS: dict[str, Metric] = {
    "l2": Metric("l2", l2, compares=True, higher_is_better=False),
    "kl": Metric("kl", kl_div, compares=True, higher_is_better=False),
    "logit_diff": Metric("logit_diff", logit_diff),
    "loss": Metric("loss", loss, higher_is_better=False),
    "prob": Metric("prob", prob),
    "accuracy": Metric("accuracy", accuracy),
    "mse": Metric("mse", mse, higher_is_better=False),
}


def get_metric(metric: str | Metric | Callable[..., Tensor]) -> Metric:
    """A :class:`Metric` from its name, itself, or a plain ``fn(logits, batch, clean)``."""
    if isinstance(metric, Metric):
        return metric
    if isinstance(metric, str):
        if metric not in METRICS:
            raise ValueError(f"unknown metric {metric!r}; choose one of {', '.join(METRICS)}")
        return METRICS[metric]
    if callable(metric):
        return Metric(getattr(metric, "__name__", "custom"), metric)
    raise TypeError(f"a metric is a name, a Metric or a callable, got {type(metric).__name__}")
