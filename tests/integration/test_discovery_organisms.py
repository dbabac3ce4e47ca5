"""Circuit discovery recovers the known circuits of the built-in organisms.

For every organism with a ground truth, node-level discovery under mean ablation
(per-position means where the organism says so) must rank the true units first
(AUROC >= 0.99) and find a circuit with faithfulness >= 0.95, for ACDC and for sweep
score-then-prune. The references are independent of the library: means are averaged from
activations captured by hand-written hooks, every subset of units is ablated by hand-written
hooks, and the task metric is computed from its definition. With at most 16 units every
subset is enumerated, so "smallest circuit reaching the target" is checked exactly.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from meanablate.discovery import discover, score_circuit
from meanablate.organisms import registry
from meanablate.stats import compute_means
from tracr_reference import hand_logits, parse

TARGET = 0.95
# ACDC removes a unit when the metric moves by less than this fraction of the gap between
# the full model and the empty circuit, |m(full) - m(empty)| (hand-computed).
ACDC_FRACTION = 0.01
EXAMPLES = {"induction": 48}  # the tracr organisms are tiny: 128 examples
ORGANISMS = ["tracr-reverse", "tracr-frac_prevs", "tracr-sort", "induction"]


def hand_means(model, batches, units, per_position: bool) -> dict[str, torch.Tensor]:
    """float64 mean of every unit's activation over examples (and positions unless
    ``per_position``), from activations captured with plain forward hooks."""
    seen: dict[str, list[torch.Tensor]] = {parse(u)[0]: [] for u in units}
    handles = [
        model.get_submodule(key).register_forward_hook(
            lambda _m, _a, out, key=key: seen[key].append(out.detach().double())
        )
        for key in seen
    ]
    try:
        with torch.no_grad():
            for batch in batches:
                model(batch["tokens"])
    finally:
        for h in handles:
            h.remove()
    out = {}
    for key, acts in seen.items():
        a = torch.cat(acts)  # [examples, pos, ...]
        out[key] = a.mean(0) if per_position else a.flatten(0, 1).mean(0)
    return out


def hand_metric(metric: str, logits: torch.Tensor, batch: dict) -> np.ndarray:
    """Per-example task metric: mean over the example's scored positions."""
    logits = logits.double()
    if metric == "mse":
        value = batch["target_value"].double()
        scored = ~value.isnan()
        per_pos = (logits[..., 0] - value.nan_to_num()).pow(2)
    else:
        assert metric == "loss"
        target = batch["target"]
        scored = target != -100
        logp = torch.log_softmax(logits, -1)
        per_pos = -logp.gather(-1, target.clamp(min=0)[..., None])[..., 0]
    per_pos = torch.where(scored, per_pos, torch.zeros_like(per_pos))
    return (per_pos.sum(1) / scored.sum(1)).numpy()


class Table:
    """m(S) per example for every subset S of kept units (the rest mean-ablated)."""

    def __init__(self, org, batches, means) -> None:
        self.units = list(org.units)
        self.values: dict[frozenset, np.ndarray] = {}
        for r in range(len(self.units) + 1):
            for kept in itertools.combinations(self.units, r):
                ablated = [u for u in self.units if u not in kept]
                self.values[frozenset(kept)] = np.concatenate(
                    [
                        hand_metric(
                            org.metric, hand_logits(org.model, b["tokens"], ablated, means), b
                        )
                        for b in batches
                    ]
                )

    def m(self, kept) -> float:
        return float(self.values[frozenset(kept)].mean())

    @property
    def full(self) -> float:
        return self.m(self.units)

    @property
    def empty(self) -> float:
        return self.m([])

    def faithfulness(self, kept) -> float:
        return (self.m(kept) - self.empty) / (self.full - self.empty)


@pytest.fixture(scope="module", params=ORGANISMS)
def case(request):
    name = request.param
    try:
        org = registry.load(name)
    except Exception as exc:  # not built yet, or an optional extra is missing
        pytest.skip(f"organism {name} does not load: {exc}")
    if not org.ground_truth:
        pytest.skip(f"organism {name} has no known circuit")
    n = EXAMPLES.get(name, 128)
    batches = org.make_batches(n, n, 0)
    per_position = org.per_position_means
    means = compute_means(org.model, org.units, batches, per_position=per_position)
    ref_means = hand_means(org.model, batches, org.units, per_position)
    for key, value in ref_means.items():
        torch.testing.assert_close(means[key], value, atol=1e-9, rtol=1e-9)
    table = Table(org, batches, ref_means) if len(org.units) <= 16 else None
    return org, batches, means, table


def _run(case, algorithm: str):
    org, batches, means, _ = case
    threshold = ACDC_FRACTION if algorithm == "acdc" else None
    circuit = discover(
        org.model,
        batches,
        means,
        units=org.units,
        metric=org.metric,
        algorithm=algorithm,
        threshold=threshold,
        target_faithfulness=TARGET,
    )
    return circuit


@pytest.mark.parametrize("algorithm", ["acdc", "sweep"])
def test_discovery_recovers_the_ground_truth(case, algorithm) -> None:
    org, _, _, table = case
    circuit = _run(case, algorithm)
    _, _, area = circuit.roc(org.ground_truth)
    # the circuit's own numbers agree with the hand-computed table
    assert circuit.metric_full == pytest.approx(table.full, abs=1e-6)
    assert circuit.metric_empty == pytest.approx(table.empty, abs=1e-6)
    assert circuit.metric_circuit == pytest.approx(table.m(circuit.kept), abs=1e-6)
    faith = table.faithfulness(circuit.kept)
    assert circuit.faithfulness == pytest.approx(faith, abs=1e-5)
    assert faith >= TARGET, (org.name, algorithm, circuit.kept, faith)
    assert area >= 0.99, (org.name, algorithm, circuit.scores)


def test_score_then_prune_finds_a_smallest_circuit(case) -> None:
    _, _, _, table = case
    if table is None:
        pytest.skip("more than 16 units")
    circuit = _run(case, "sweep")
    reaching = [kept for kept in table.values if table.faithfulness(kept) >= TARGET]
    smallest = min(len(k) for k in reaching)
    assert len(circuit.kept) == smallest, (circuit.kept, [sorted(k) for k in reaching])
    assert frozenset(circuit.kept) in reaching


def test_score_circuit_matches_hand_computations(case) -> None:
    org, batches, means, table = case
    truth = list(org.ground_truth)
    circuits = [truth] + [[u for u in truth if u != v] for v in truth]
    for circuit in circuits[:3]:
        scores = score_circuit(
            org.model, batches, circuit, org.units, means, org.metric, n_boot=500, seed=1
        )
        rest = [u for u in org.units if u not in circuit]
        denom = table.full - table.empty
        assert scores.metric_full == pytest.approx(table.full, abs=1e-6)
        assert scores.metric_empty == pytest.approx(table.empty, abs=1e-6)
        assert scores.metric_circuit == pytest.approx(table.m(circuit), abs=1e-6)
        assert scores.metric_without_circuit == pytest.approx(table.m(rest), abs=1e-6)
        assert scores.faithfulness == pytest.approx(table.faithfulness(circuit), abs=1e-5)
        completeness = (table.full - table.m(rest)) / denom
        assert scores.completeness == pytest.approx(completeness, abs=1e-5)
        assert set(scores.minimality) == set(circuit)
        for v in circuit:
            without_v = [u for u in circuit if u != v]
            want = (table.m(circuit) - table.m(without_v)) / denom
            assert scores.minimality[v] == pytest.approx(want, abs=1e-5)
        lo, hi = scores.faithfulness_ci
        assert lo - 1e-9 <= scores.faithfulness <= hi + 1e-9, (circuit, scores)
