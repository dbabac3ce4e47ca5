"""The removal pass, the exhaustive check and relative thresholds, as properties.

- On random metric tables over unit subsets (no monotonicity), the removal pass returns a
  set that reaches the target from which no single unit can be removed, and the exhaustive
  check returns a set no smaller subset beats (checked by enumerating them here).
- On random small transformers with random comparing metrics, every algorithm's circuit
  is 1-minimal by the plain hooked forward (``metric_per_example``, not the fast path).
- ACDC with ``threshold=t`` and with ``abs_threshold=t * |m(full) - m(empty)|`` agree.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import HealthCheck, given, reject, settings
from hypothesis import strategies as st
from torch import nn

from meanablate.discovery import discover, faithfulness, transformer_units
from meanablate.discovery.evaluate import metric_per_example
from meanablate.discovery.minimal import (
    check_behaviour,
    exhaustive_search,
    n_smaller_subsets,
    removal_pass,
)
from meanablate.errors import NoBehaviourError
from meanablate.organisms import HookedTransformer, TransformerConfig
from meanablate.stats import Means, compute_means


@st.composite
def tables(draw):
    n = draw(st.integers(1, 6))
    units = [f"u{i}" for i in range(n)]
    values = draw(
        st.lists(
            st.floats(-3, 3, allow_nan=False, allow_subnormal=False),
            min_size=2**n,
            max_size=2**n,
        )
    )
    table = {}
    for i, combo in enumerate(s for r in range(n + 1) for s in itertools.combinations(units, r)):
        table[frozenset(combo)] = values[i]  # keyed by the ABLATED set
    table[frozenset()] = 0.0  # full
    table[frozenset(units)] = draw(st.sampled_from([-2.0, 1.5, 4.0]))  # empty, != full
    target = draw(st.sampled_from([0.5, 0.8, 0.95, 1.0]))
    return units, table, target


@given(tables())
@settings(max_examples=300, deadline=None)
def test_removal_pass_leaves_nothing_removable_and_exhaustive_is_smallest(case) -> None:
    units, table, target = case
    full, empty = table[frozenset()], table[frozenset(units)]

    def value(ablated):
        return table[frozenset(ablated)]

    def reaches(kept) -> bool:
        m = value([u for u in units if u not in set(kept)])
        return faithfulness(m, full, empty) >= target - 1e-9

    kept, removed = removal_pass(units, units, value, full, empty, target)
    assert reaches(kept) and sorted(kept + removed) == sorted(units)
    for u in kept:  # 1-minimal
        assert not reaches([v for v in kept if v != u])
    best, cert, checked = exhaustive_search(units, kept, value, full, empty, target, 10**6)
    assert cert == "exhaustive" and reaches(best) and len(best) <= len(kept)
    assert checked <= n_smaller_subsets(len(units), len(kept))
    for r in range(len(best)):
        assert not any(reaches(c) for c in itertools.combinations(units, r))
    # the limit: no check when more subsets would be needed
    _, cert0, n0 = exhaustive_search(units, kept, value, full, empty, target, 0)
    assert (cert0, n0) == (("1-minimal", 0) if kept else ("exhaustive", 0))


def test_check_behaviour_refuses_noise_and_zero() -> None:
    full = torch.tensor([1.0, -1.0, 1.5, -1.0])
    with pytest.raises(ValueError, match="not distinguishable"):
        check_behaviour(full, torch.zeros(4))
    delta, ci = check_behaviour(full, torch.zeros(4), force=True)
    assert delta == 0.125 and ci[0] <= 0 <= ci[1]
    with pytest.raises(ValueError, match="no behaviour to explain"):
        check_behaviour(torch.ones(3), torch.ones(3), force=True)
    delta, ci = check_behaviour(torch.ones(5) * 2, torch.ones(5) * 0.5)
    assert delta == 1.5 and ci == (1.5, 1.5)


# -- random small models --------------------------------------------------------------------
def random_model(seed: int, n_heads: int) -> HookedTransformer:
    cfg = TransformerConfig(
        n_layers=2, d_model=8, n_heads=n_heads, d_head=2, d_vocab=7, n_ctx=5, d_mlp=8
    )
    torch.manual_seed(seed)
    model = HookedTransformer(cfg).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.7)
    return model


@given(
    seed=st.integers(0, 10_000),
    n_heads=st.integers(1, 2),
    metric=st.sampled_from(["kl", "l2"]),
    algorithm=st.sampled_from(["acdc", "sweep", "attribution", "attribute_verify"]),
    level=st.sampled_from([0.5, 0.8, 0.95]),
    kind=st.sampled_from(["per_position", "plain", "plain_except"]),
)
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_every_algorithm_returns_a_1_minimal_circuit(
    seed, n_heads, metric, algorithm, level, kind
) -> None:
    model = random_model(seed, n_heads)
    gen = torch.Generator().manual_seed(seed + 1)
    batches = [{"tokens": torch.randint(7, (6, 5), generator=gen)}]
    units = transformer_units(model, "components")
    means = compute_means(model, units, batches, kind=kind)
    try:
        circuit = discover(
            model,
            batches,
            means,
            units=units,
            metric=metric,
            algorithm=algorithm,
            threshold=1 - level if algorithm == "acdc" else None,
            target_faithfulness=None if algorithm == "acdc" else level,
            max_exhaustive=0,  # 1-minimal only: the removal pass is what is tested
        )
    except NoBehaviourError:
        # Some random weights saturate the softmax (one token at probability 1 whatever
        # the input), so KL(full || empty) is ~1e-17: discovery rightly refuses there.
        reject()
    assert circuit.certificate == "1-minimal" and circuit.mean_kind == kind

    def faith(kept) -> float:
        def m(ablated) -> float:
            return float(metric_per_example(model, batches, ablated, means, metric).mean())

        return faithfulness(m([u for u in units if u not in set(kept)]), m([]), m(units))

    tol = 1e-5  # SetMetric and the plain forward differ in float32 rounding
    assert faith(circuit.kept) >= level - tol
    for u in circuit.kept:
        assert faith([v for v in circuit.kept if v != u]) < level + tol


# -- relative and absolute thresholds -------------------------------------------------------
def diagonal(w: list[float]) -> nn.Sequential:
    model = nn.Sequential(nn.Linear(len(w), len(w), bias=False))
    with torch.no_grad():
        model[0].weight.copy_(torch.diag(torch.tensor(w)))
    return model.eval()


@given(
    w=st.lists(st.floats(0.05, 5.0), min_size=2, max_size=5),
    t=st.floats(0.0, 0.9),
)
@settings(max_examples=60, deadline=None)
def test_relative_and_absolute_thresholds_agree_when_scaled(w, t) -> None:
    model = diagonal(w)
    x = torch.ones(2, len(w))
    means = Means({"0": torch.zeros(len(w), dtype=torch.float64)}, {"0": torch.tensor(2.0)})
    units = [f"0[neurons={i}]" for i in range(len(w))]
    rel = discover(model, [x], means, units=units, metric="l2", threshold=t)
    scale = abs(rel.behaviour)
    ab = discover(model, [x], means, units=units, metric="l2", abs_threshold=t * scale)
    assert ab.kept == rel.kept and ab.certificate == rel.certificate == "exhaustive"
    assert ab.threshold == pytest.approx(t) and rel.abs_threshold == pytest.approx(t * scale)
    assert rel.target_faithfulness == pytest.approx(ab.target_faithfulness)
