"""Scoring a circuit: faithfulness, completeness, minimality, with bootstrap intervals.

With ``m(S)`` the task metric when every unit outside ``S`` is mean-ablated:

- faithfulness ``(m(circuit) - m(empty)) / (m(full) - m(empty))``: 1 when the circuit
  alone does what the full model does, 0 when it does no better than nothing;
- completeness ``(m(full) - m(full minus circuit)) / (m(full) - m(empty))``: how much
  ablating the circuit from the full model hurts (1: as much as ablating everything);
- minimality, per kept unit ``v``: ``(m(circuit) - m(circuit minus v)) / (m(full) - m(empty))``,
  what that unit contributes (near 0: the unit is not needed).

For comparing metrics (``kl``, ``l2``) ``m`` is the distance to the clean output, so
``m(full) = 0`` and the same formulas apply.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from meanablate._display import Shown
from meanablate._unwrap import unwrap
from meanablate._validate import check_source
from meanablate.data.normalize import as_batches
from meanablate.discovery.source import resample_batch
from meanablate.hooks import model_device, output_tensor, run_model, to_device
from meanablate.intervene import Method, ablate
from meanablate.metrics import METRICS, Metric, get_metric
from meanablate.stats import Means

__all__ = [
    "CircuitScores",
    "clean_outputs",
    "faithfulness",
    "metric_per_example",
    "score_circuit",
    "score_notes",
]

# Pruning evaluates many ablated sets against the same clean outputs; they are kept
# when they take at most this many bytes (more would trade a forward for a lot of RAM).
CLEAN_CACHE_BYTES = 1 << 30


def needs_clean(metric: Metric) -> bool:
    """Whether ``metric`` reads the clean output (built-in task metrics never do)."""
    return metric.compares or metric not in METRICS.values()


def clean_outputs(model: nn.Module, batches: Sequence[Any]) -> list[Tensor] | None:
    """The clean outputs of ``batches`` (on the model's device), or ``None`` if together
    they would take more than ``CLEAN_CACHE_BYTES``."""
    model = unwrap(model)
    device = model_device(model)
    outs: list[Tensor] = []
    total = 0
    with torch.inference_mode():
        for raw in batches:
            out = output_tensor(run_model(model, to_device(raw, device)))
            total += out.numel() * out.element_size()
            if total > CLEAN_CACHE_BYTES:
                return None
            outs.append(out)
    return outs


def metric_per_example(
    model: nn.Module,
    batches: Sequence[Any],
    ablated: Sequence[str],
    means: Means | None,
    metric: str | Metric,
    *,
    method: Method = "mean",
    clean: Sequence[Tensor] | None = None,
) -> Tensor:
    """The metric on every example ``[n_examples]`` with ``ablated`` units ablated together.

    ``clean``: the clean outputs of ``batches`` (from :func:`clean_outputs`), to save
    the clean forward that comparing metrics need for every call.
    """
    model = unwrap(model)
    m = get_metric(metric)
    if clean is not None and len(clean) != len(batches):
        raise ValueError(f"clean has {len(clean)} outputs for {len(batches)} batches")
    device = model_device(model)
    # Built-in task metrics never read the clean output: skip that forward for them
    # (pruning calls this once per candidate set). Custom callables may read it.
    want_clean = bool(ablated) and needs_clean(m)
    values = []
    with torch.inference_mode():
        for i, raw in enumerate(batches):
            batch = to_device(raw, device)
            ref = clean[i] if clean is not None else None
            if ablated:
                if ref is None and want_clean:
                    ref = output_tensor(run_model(model, batch))
                source = resample_batch(batch, method)
                with ablate(model, list(ablated), means, method=method, source=source):
                    out = output_tensor(run_model(model, batch))
            else:
                out = ref if ref is not None else output_tensor(run_model(model, batch))
            values.append(m(out, batch, ref if ref is not None else out).double().cpu())
    return torch.cat(values)


def faithfulness(m_circuit: float, m_full: float, m_empty: float) -> float:
    """``(m(circuit) - m(empty)) / (m(full) - m(empty))``; error if full equals empty."""
    denom = m_full - m_empty
    if abs(denom) < 1e-12:
        raise ValueError(
            "the full model and the empty circuit score the same on this metric; "
            "faithfulness is undefined (is the metric right for the task?)"
        )
    return (m_circuit - m_empty) / denom


def _ratio_ci(
    num: np.ndarray, den: np.ndarray, n_boot: int, level: float, seed: int
) -> tuple[float, float]:
    """Paired percentile interval of ``mean(num) / mean(den)`` over examples.

    Kept by hand rather than ``scipy.stats.bootstrap`` (which :func:`bootstrap_ci` uses):
    a resample whose denominator is 0 has no ratio and must be left out, which scipy's
    statistic cannot do (it would return inf/NaN bounds), and BCa's jackknife is
    undefined as soon as one leave-one-out denominator is 0.
    """
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, num.size, size=(n_boot, num.size))
    d = den[idx].mean(1)
    ok = np.abs(d) > 1e-12
    ratios = num[idx].mean(1)[ok] / d[ok]
    alpha = (1 - level) / 2
    return float(np.quantile(ratios, alpha)), float(np.quantile(ratios, 1 - alpha))


@dataclass(frozen=True, repr=False)
class CircuitScores(Shown):
    """Faithfulness (with a bootstrap interval), completeness and minimality of a circuit."""

    metric_full: float
    metric_circuit: float
    metric_empty: float
    metric_without_circuit: float
    faithfulness: float
    faithfulness_ci: tuple[float, float]
    completeness: float
    minimality: Mapping[str, float]
    notes: tuple[str, ...] = ()


def score_notes(
    faithfulness: float, completeness: float | None, minimality: Mapping[str, float] | None
) -> list[str]:
    """Plain-words notes for scores outside [0, 1] (they are not errors: ablation can help).

    >>> score_notes(1.2, 0.5, {"a": -0.1})[0][:24]
    'faithfulness 1.2 > 1: th'
    """
    eps = 1e-9
    out = []
    if faithfulness > 1 + eps:
        out.append(
            f"faithfulness {faithfulness:.3g} > 1: the circuit alone scores better than the "
            "full model (ablating the other units helps this metric)"
        )
    elif faithfulness < -eps:
        out.append(
            f"faithfulness {faithfulness:.3g} < 0: the circuit alone scores worse than "
            "ablating every unit"
        )
    if completeness is not None and completeness > 1 + eps:
        out.append(
            f"completeness {completeness:.3g} > 1: ablating only the circuit hurts more than "
            "ablating every unit (the other units partly undo the damage)"
        )
    elif completeness is not None and completeness < -eps:
        out.append(
            f"completeness {completeness:.3g} < 0: ablating the circuit from the full model "
            "improves the metric"
        )
    neg = sorted(u for u, v in (minimality or {}).items() if v < -eps)
    big = sorted(u for u, v in (minimality or {}).items() if v > 1 + eps)
    if neg:
        out.append(
            f"minimality < 0 for {', '.join(neg[:5])}{' ...' if len(neg) > 5 else ''}: "
            "removing that unit from the circuit improves it"
        )
    if big:
        out.append(
            f"minimality > 1 for {', '.join(big[:5])}: removing that unit from the circuit "
            "costs more than the whole behaviour (the rest then does worse than nothing)"
        )
    return out


def score_circuit(
    model: nn.Module,
    batches: Sequence[Any],
    circuit: Sequence[str],
    units: Sequence[str],
    means: Means | None,
    metric: str | Metric,
    *,
    method: Method = "mean",
    n_boot: int = 1000,
    level: float = 0.95,
    seed: int = 0,
    with_minimality: bool = True,
) -> CircuitScores:
    """Score ``circuit`` (a subset of ``units``) on ``batches``; see the module docstring.

    ``batches``: one batch or an iterable of them (at least 2 examples in all, for the
    interval). Returns :class:`CircuitScores`: the metric with nothing / everything outside
    the circuit / everything / the circuit ablated, faithfulness with a bootstrap interval
    (``n_boot`` resamples), completeness and per-unit minimality.

    >>> import torch, meanablate as ma
    >>> from meanablate.organisms.transformer import HookedTransformer, TransformerConfig
    >>> _ = torch.manual_seed(0)
    >>> model = HookedTransformer(TransformerConfig(n_layers=2, d_model=16, n_heads=2,
    ...     d_head=8, d_mlp=32, d_vocab=10, n_ctx=8)).eval()
    >>> tokens = torch.randint(0, 10, (6, 8))                     # [batch, pos]
    >>> units = ma.transformer_units(model)                       # 2 layers x (2 heads + MLP)
    >>> means = ma.compute_means(model, sorted({ma.parse_site(u).key for u in units}), tokens)
    >>> cs = ma.score_circuit(model, tokens, units[:3], units, means, "kl", n_boot=50)
    >>> sorted(cs.minimality) == sorted(units[:3]), len(cs.faithfulness_ci)
    (True, 2)
    """
    batches = list(as_batches(batches))
    model = unwrap(model)
    check_source(means, method, where="score_circuit")
    unknown = set(circuit) - set(units)
    if unknown:
        raise ValueError(f"circuit units not among the units: {sorted(unknown)}")
    from meanablate.discovery.subsets import SetMetric  # it builds on this module

    in_circuit = set(circuit)
    rest = [u for u in units if u not in in_circuit]
    set_metric = SetMetric(model, batches, units, means, metric, method=method)

    def per_ex(ablated: Sequence[str]) -> np.ndarray:
        return set_metric(list(ablated)).numpy()

    full, empty = per_ex([]), per_ex(list(units))
    circ, without = per_ex(rest), per_ex(list(circuit))
    mf, me = float(full.mean()), float(empty.mean())
    faith = faithfulness(float(circ.mean()), mf, me)
    if full.size < 2:
        raise ValueError(
            f"a confidence interval needs at least 2 examples, got {full.size}; "
            "score the circuit on more examples"
        )
    ci = _ratio_ci(circ - empty, full - empty, n_boot, level, seed)
    denom = mf - me
    completeness = (mf - float(without.mean())) / denom
    minimality: dict[str, float] = {}
    if with_minimality:
        for v in circuit:
            m_minus = float(per_ex([*rest, v]).mean())
            minimality[v] = (float(circ.mean()) - m_minus) / denom
    notes = tuple(score_notes(faith, completeness, minimality))
    return CircuitScores(
        mf,
        float(circ.mean()),
        me,
        float(without.mean()),
        faith,
        ci,
        completeness,
        minimality,
        notes,
    )
