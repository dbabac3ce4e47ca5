"""What a circuit is proven to be: the behaviour check, the removal pass, the certificate.

Every pruning algorithm judges a kept set ``S`` by one predicate, *reaches the target*:
``faithfulness(S) >= target`` with ``faithfulness(S) = (m(S) - m(empty)) / (m(full) -
m(empty))`` (``m(S)``: the metric with every unit outside ``S`` ablated). On top of the
algorithm's own search:

- :func:`removal_pass` drops any kept unit whose removal still reaches the target, until
  none can be dropped: the circuit is then **1-minimal**;
- :func:`exhaustive_search` checks every subset smaller than that circuit, size by size
  from the empty set up, and stops at the first size where one reaches the target (it then
  returns the best of that size). When it runs, the circuit has the smallest size of any
  subset that reaches the target: certificate **exhaustive**. It runs when the subsets
  to check, ``sum_{s < |circuit|} C(n_units, s)``, number at most ``max_exhaustive``
  (default 4096: every subset of up to 12 units; circuits of up to 3 among 28 units, or
  of 2 among 4095). No monotonicity is assumed (ablating more can help), so the search is
  pruned only by size: never past the circuit already found.

:func:`check_behaviour` refuses to discover anything when ``m(full) - m(empty)`` is 0 or
its bootstrap interval contains 0: faithfulness is then noise divided by noise.

>>> value = lambda ablated: float(len({"a", "b"} - set(ablated)))  # m counts a, b kept
>>> kept, _ = removal_pass(["a", "b", "c"], ["a", "b", "c"], value, 2.0, 0.0, 0.95)
>>> kept
['a', 'b']
>>> exhaustive_search(["a", "b", "c"], kept, value, 2.0, 0.0, 0.95, 4096)[1]
'exhaustive'
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from typing import Literal

from torch import Tensor

from meanablate.errors import NoBehaviourError
from meanablate.intervene import bootstrap_ci

__all__ = [
    "CERTIFICATES",
    "MAX_EXHAUSTIVE",
    "check_behaviour",
    "exhaustive_search",
    "faith",
    "n_smaller_subsets",
    "removal_pass",
]

Certificate = Literal["exhaustive", "1-minimal", "none"]
CERTIFICATES: tuple[str, ...] = ("exhaustive", "1-minimal", "none")
MAX_EXHAUSTIVE = 4096
# Faithfulness is compared to the target with this slack: float32 forwards of the same
# set along different code paths differ in the last bits.
TOL = 1e-9

Value = Callable[[Sequence[str]], float]


def faith(m_circuit: float, m_full: float, m_empty: float) -> float:
    """``(m_circuit - m_empty) / (m_full - m_empty)`` (the caller checked the denominator)."""
    return (m_circuit - m_empty) / (m_full - m_empty)


def _reaches(
    kept: Sequence[str],
    units: Sequence[str],
    value: Value,
    m_full: float,
    m_empty: float,
    target: float,
) -> tuple[bool, float]:
    keep = set(kept)
    m = value([u for u in units if u not in keep])
    return faith(m, m_full, m_empty) >= target - TOL, m


def removal_pass(
    units: Sequence[str],
    kept: Sequence[str],
    value: Value,
    m_full: float,
    m_empty: float,
    target: float,
    order: Sequence[str] | None = None,
) -> tuple[list[str], list[str]]:
    """``(kept, removed)``: drop kept units one at a time while the rest reaches ``target``.

    ``order``: the order to try them in (default: ``kept``'s; pass the weakest first).
    Passes repeat until one drops nothing (without monotonicity a drop can make an
    earlier-tried unit removable), so no single kept unit can be removed afterwards.
    ``value(ablated) -> m`` gives the metric of an ablated set.
    """
    current = list(kept)
    trial_order = [u for u in (order if order is not None else kept) if u in set(kept)]
    removed: list[str] = []
    changed = True
    while changed:
        changed = False
        for u in list(trial_order):
            if u not in current:
                continue
            smaller = [v for v in current if v != u]
            ok, _ = _reaches(smaller, units, value, m_full, m_empty, target)
            if ok:
                current = smaller
                removed.append(u)
                changed = True
    return [u for u in units if u in set(current)], removed


def n_smaller_subsets(n_units: int, size: int) -> int:
    """How many subsets of ``n_units`` units have fewer than ``size`` units."""
    return sum(math.comb(n_units, s) for s in range(size))


def exhaustive_search(
    units: Sequence[str],
    kept: Sequence[str],
    value: Value,
    m_full: float,
    m_empty: float,
    target: float,
    max_exhaustive: int = MAX_EXHAUSTIVE,
) -> tuple[list[str], Certificate, int]:
    """``(kept, certificate, n_checked)``: the smallest subset reaching ``target``.

    Checks subsets of ``units`` of size 0, 1, ... below ``len(kept)``; at the first size
    where any reaches the target, returns the one with the highest faithfulness (ties: the
    first in ``units`` order). ``kept`` must be 1-minimal already. When more than
    ``max_exhaustive`` subsets would need checking, nothing is checked and the certificate
    is ``"1-minimal"``.
    """
    need = n_smaller_subsets(len(units), len(kept))
    if need > max_exhaustive:
        return list(kept), "1-minimal", 0
    checked = 0
    for size in range(len(kept)):
        best: tuple[float, list[str]] | None = None
        for combo in itertools.combinations(units, size):
            checked += 1
            ok, m = _reaches(combo, units, value, m_full, m_empty, target)
            f = faith(m, m_full, m_empty)
            if ok and (best is None or f > best[0]):
                best = (f, list(combo))
        if best is not None:
            return best[1], "exhaustive", checked
    return list(kept), "exhaustive", checked


def check_behaviour(
    full: Tensor,
    empty: Tensor,
    *,
    force: bool = False,
    n_boot: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> tuple[float, tuple[float, float] | None]:
    """``(m(full) - m(empty), its bootstrap interval)``; ``ValueError`` if it is not told
    apart from 0, unless ``force`` (a zero difference always raises: nothing to scale by).

    ``full``, ``empty``: the metric per example ``[n_examples]`` (paired).
    """
    diff = (full.double() - empty.double()).cpu().numpy()
    delta = float(diff.mean())
    ci: tuple[float, float] | None = None
    if diff.size >= 2:
        # the percentile interval: BCa's acceleration is undefined for many tied diffs,
        # which tracr tasks (0/1 accuracy, exact logits) produce
        ci = bootstrap_ci(diff, n_boot=n_boot, level=level, seed=seed, method="percentile")
    if abs(delta) < 1e-12:
        raise NoBehaviourError(
            f"the full model and the empty circuit score the same (m(full) - m(empty) = "
            f"{delta:.3g}): there is no behaviour to explain, so faithfulness and relative "
            "thresholds are undefined. Is the metric right for the task, and is the model "
            "trained?"
        )
    if ci is not None and ci[0] <= 0 <= ci[1] and not force:
        raise NoBehaviourError(
            f"the full model's behaviour is not distinguishable from the empty circuit's: "
            f"m(full) - m(empty) = {delta:.4g}, {level:.0%} bootstrap interval "
            f"[{ci[0]:.4g}, {ci[1]:.4g}] contains 0 over {diff.size} examples. A circuit "
            "found here would explain noise. Use more examples or another metric, or pass "
            "force=True (CLI: --force-discovery) to discover anyway."
        )
    return delta, ci
