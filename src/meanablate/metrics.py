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

Shapes are checked, never broadcast: ``clean_logits`` must have exactly the shape of
``logits``, and every batch field above must be ``[batch, pos]`` of the output (``[batch]``
for a ``[batch, vocab]`` output); otherwise a ``ValueError`` names the field, the shape
it got and the shape it wanted. (A ``[1, pos, vocab]`` clean output would otherwise be
compared with every example, and a ``[batch, 1]`` target with every position.)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "FIELDS",
    "METRICS",
    "Metric",
    "accuracy",
    "check_shapes",
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


# The batch fields a metric may read, each [batch, pos] of the output.
FIELDS = ("target", "wrong", "target_value", "metric_mask", "attention_mask")


def _need(batch: Mapping[str, Any], key: str, metric: str) -> Tensor:
    if not isinstance(batch, Mapping) or key not in batch:
        have = sorted(batch) if isinstance(batch, Mapping) else type(batch).__name__
        raise ValueError(f"metric {metric!r} needs batch[{key!r}] (have {have})")
    return batch[key]


def check_shapes(
    logits: Tensor, batch: Any, clean: Tensor | None = None, metric: str = "metric"
) -> None:
    """``ValueError`` unless ``clean`` and every batch field fit ``logits`` exactly.

    ``logits``: ``[batch, pos, vocab]`` or ``[batch, vocab]``; ``clean``: the same shape;
    ``target``, ``wrong``, ``target_value``, ``metric_mask``: ``[batch, pos]`` (``[batch]``
    for ``[batch, vocab]`` outputs); ``attention_mask``: ``[batch, pos]`` when the output
    has positions (a ``[batch, vocab]`` output reads no positions, so its input mask is
    not the output's). Nothing is broadcast.

    >>> t = {"target": torch.zeros(2, 1, dtype=torch.long)}
    >>> check_shapes(torch.zeros(2, 3, 5), t)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: metric: batch['target'] has shape (2, 1), wanted (2, 3) ...
    """
    if not isinstance(logits, Tensor) or logits.ndim not in (2, 3):
        got = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
        raise ValueError(
            f"{metric}: the output must be [batch, pos, vocab] or [batch, vocab], got {got}"
        )
    out = tuple(logits.shape)
    if clean is not None and tuple(clean.shape) != out:
        raise ValueError(
            f"{metric}: the clean output has shape {tuple(clean.shape)}, wanted {out} "
            f"(the shape of the ablated output)"
        )
    if not isinstance(batch, Mapping):
        return
    if logits.ndim == 3:
        want, what = out[:2], "[batch, pos]"
    else:
        want, what = out[:1], "[batch]"
    for key in FIELDS:
        if key not in batch or (key == "attention_mask" and logits.ndim != 3):
            continue
        value = batch[key]
        shape = tuple(value.shape) if isinstance(value, Tensor) else None
        ok = shape == want or (logits.ndim == 2 and shape == (*want, 1))
        if not ok:
            got = shape if shape is not None else type(value).__name__
            raise ValueError(
                f"{metric}: batch[{key!r}] has shape {got}, wanted {want} "
                f"({what} of the output {out})"
            )


def scored_mask(
    batch: Mapping[str, Any] | Tensor, logits: Tensor, metric: str = "metric"
) -> Tensor:
    """Bool ``[batch, pos]``: the positions a metric reads (fields checked by
    :func:`check_shapes`)."""
    check_shapes(logits, batch, None, metric)
    lg = _seq(logits)
    ones = torch.ones(lg.shape[:2], dtype=torch.bool, device=lg.device)
    if not isinstance(batch, Mapping):
        return ones
    if "metric_mask" in batch:
        mask = _seq_target(batch["metric_mask"]).bool()
    elif "target" in batch:
        mask = _seq_target(batch["target"]) != IGNORE
    elif "target_value" in batch:
        mask = ~torch.isnan(_seq_target(batch["target_value"]))
    elif "attention_mask" in batch and logits.ndim == 3:
        mask = batch["attention_mask"].bool()
    else:
        return ones
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
    check_shapes(logits, batch, clean, "metric 'l2'")
    diff = (_seq(logits) - _seq(clean)).double()
    mask = scored_mask(batch, logits, "metric 'l2'")
    diff = torch.where(mask[..., None], diff, torch.zeros_like(diff))
    return diff.pow(2).sum(dim=(1, 2)).sqrt()


def kl_div(logits: Tensor, batch: Any, clean: Tensor | None) -> Tensor:
    """KL(clean || ablated) of the output distributions, mean over scored positions."""
    if clean is None:
        raise ValueError("metric 'kl' compares with the clean output; pass clean_logits")
    check_shapes(logits, batch, clean, "metric 'kl'")
    lp = torch.log_softmax(_seq(logits).double(), -1)
    lq = torch.log_softmax(_seq(clean).double(), -1)
    kl = (lq.exp() * (lq - lp)).sum(-1)
    return _masked_mean(kl, scored_mask(batch, logits, "metric 'kl'"), "kl")


def logit_diff(logits: Tensor, batch: Any, clean: Tensor | None = None) -> Tensor:
    """``logit[target] - logit[wrong]``, mean over scored positions: ``[batch]``."""
    lg = _seq(logits)
    mask = scored_mask(batch, logits, "metric 'logit_diff'")
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
    mask = scored_mask(batch, logits, "metric 'loss'")
    t = _check_classes(_seq_target(_need(batch, "target", "loss")), mask, lg.shape[-1], "loss")
    nll = -torch.log_softmax(lg.double(), -1).gather(-1, t[..., None])[..., 0]
    return _masked_mean(nll, mask, "loss")


def prob(logits: Tensor, batch: Any, clean: Tensor | None = None) -> Tensor:
    """Probability of ``target``, mean over scored positions: ``[batch]``."""
    lg = _seq(logits)
    mask = scored_mask(batch, logits, "metric 'prob'")
    t = _check_classes(_seq_target(_need(batch, "target", "prob")), mask, lg.shape[-1], "prob")
    p = torch.softmax(lg.double(), -1).gather(-1, t[..., None])[..., 0]
    return _masked_mean(p, mask, "prob")


def accuracy(logits: Tensor, batch: Any, clean: Tensor | None = None) -> Tensor:
    """Fraction of scored positions whose argmax is ``target``: ``[batch]``."""
    lg = _seq(logits)
    mask = scored_mask(batch, logits, "metric 'accuracy'")
    t = _seq_target(_need(batch, "target", "accuracy"))
    _check_classes(t, mask, lg.shape[-1], "accuracy")
    return _masked_mean((lg.argmax(-1) == t).double(), mask, "accuracy")


def mse(logits: Tensor, batch: Any, clean: Tensor | None = None) -> Tensor:
    """Squared error of a one-output model against ``target_value``: ``[batch]``."""
    lg = _seq(logits)
    if lg.shape[-1] != 1:
        raise ValueError(f"metric 'mse' reads a model with one output, got {lg.shape[-1]}")
    check_shapes(logits, batch, None, "metric 'mse'")
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
    ``discrete``: the metric reads a decision (an argmax, a threshold) rather than a
    smooth function of the output; on an exact tie the last bit decides, so sweeps and
    pruning compute its ablated outputs exactly as the hooked forward does (see
    :mod:`meanablate.discovery.fastpath`). Set it on any custom argmax-based metric.

    Every call checks that ``clean`` and the batch's fields fit the output
    (:func:`check_shapes`), for custom functions too.
    """

    name: str
    fn: Callable[[Tensor, Any, Tensor | None], Tensor]
    compares: bool = False
    higher_is_better: bool = True
    discrete: bool = False

    def __call__(self, logits: Tensor, batch: Any, clean: Tensor | None = None) -> Tensor:
        check_shapes(logits, batch, clean, f"metric {self.name!r}")
        return self.fn(logits, batch, clean)

    def effect(self, logits: Tensor, batch: Any, clean: Tensor) -> Tensor:
        """Per-example effect of an ablation that turned ``clean`` into ``logits``."""
        if self.compares:
            return self(logits, batch, clean)
        return self(logits, batch, clean) - self(clean, batch, clean)

    def bind(self, batch: Any, clean: Tensor) -> Callable[[Tensor], Tensor]:
        """``effect`` with the clean side computed once, for sweeps over many ablations."""
        check_shapes(clean, batch, None, f"metric {self.name!r}")
        want = tuple(clean.shape)

        def same_shape(logits: Tensor) -> Tensor:
            if tuple(logits.shape) != want:
                raise ValueError(
                    f"metric {self.name!r}: the ablated output has shape "
                    f"{tuple(logits.shape)}, wanted {want} (the clean output's)"
                )
            return logits

        if self.fn is kl_div:
            bound = _kl_bound(batch, clean)
            return lambda logits: bound(same_shape(logits))
        if self.compares:
            return lambda logits: self.fn(same_shape(logits), batch, clean)
        base = self.fn(clean, batch, clean)
        return lambda logits: self.fn(same_shape(logits), batch, clean) - base


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
    "accuracy": Metric("accuracy", accuracy, discrete=True),
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
        # A plain function may read anything of the output (an argmax, say): treat it as
        # discrete, so sweeps give what the hooked forward gives, bit for bit.
        return Metric(getattr(metric, "__name__", "custom"), metric, discrete=True)
    raise TypeError(f"a metric is a name, a Metric or a callable, got {type(metric).__name__}")
