"""Every shipped tracr organism x every mean kind x every pruning algorithm: the circuit
found is a smallest circuit, checked against a brute force over all unit subsets with
hand-written hooks, and its certificate is "exhaustive".

The references (tests/tracr_reference.py) are independent of the library: means are
averaged from activations caught by plain forward hooks, every subset is ablated by plain
forward hooks that overwrite the unit's output, and the metric is computed from its
definition.
"""

from __future__ import annotations

import time

import pytest
import torch

from meanablate.discovery import ALGORITHMS, discover
from meanablate.organisms import registry, tracr_program
from meanablate.stats import MEAN_KINDS, compute_means
from tracr_reference import brute_force, hand_means

ORGANISMS = ["tracr-reverse", "tracr-frac_prevs", "tracr-sort", "tracr-sort_unique", "tracr-hist"]
TARGET = 0.95
TIMES: dict[tuple[str, str, str], tuple[list[str], str, float]] = {}


# sort's 3125 inputs: every 5th keeps the test fast (any data set will do: discovery and the
# brute force below see the same one)
STRIDE = {"tracr-sort": 5}


def exhaustive(org) -> dict:
    batch = tracr_program.exhaustive_batch(org.card)
    step = STRIDE.get(org.name, 1)
    return {k: v[::step] for k, v in batch.items()}


@pytest.fixture(scope="module", params=[(o, k) for o in ORGANISMS for k in MEAN_KINDS],
                ids=lambda p: f"{p[0]}-{p[1]}")  # fmt: skip
def case(request):
    name, kind = request.param
    org = registry.load(name)
    batch = exhaustive(org)
    units = org.units
    ref = hand_means(org.model, batch["tokens"], units, kind)
    keep = [0] if kind == "plain_except" else None
    means = compute_means(org.model, units, [batch], kind=kind, keep_positions=keep)
    for key, value in ref.items():  # the library's means are the hand-computed ones
        got = means[key]
        torch.testing.assert_close(got.expand_as(value), value, atol=1e-9, rtol=1e-9)
    faith, minimal = brute_force(org.model, batch, units, org.metric, ref, TARGET)
    return org, kind, batch, means, faith, minimal


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_discovery_finds_a_brute_force_minimal_circuit(case, algorithm) -> None:
    org, kind, batch, means, faith, minimal = case
    t0 = time.perf_counter()
    circuit = discover(
        org.model,
        [batch],
        means,
        units=org.units,
        metric=org.metric,
        algorithm=algorithm,
        threshold=1 - TARGET if algorithm == "acdc" else None,
        target_faithfulness=None if algorithm == "acdc" else TARGET,
    )
    TIMES[(org.name, kind, algorithm)] = (
        circuit.kept,
        circuit.certificate,
        time.perf_counter() - t0,
    )
    assert frozenset(circuit.kept) in minimal, (circuit.kept, [sorted(s) for s in minimal])
    assert circuit.certificate == "exhaustive"
    assert circuit.target_faithfulness == pytest.approx(TARGET)
    assert circuit.faithfulness == pytest.approx(faith[frozenset(circuit.kept)], abs=1e-5)
    assert circuit.mean_kind == kind


def test_shipped_cards_agree_with_the_brute_force(case) -> None:
    """Every shipped tracr card computes its ground truth (ground_truth.add_ground_truth,
    on the whole data set); it is the test's brute force. (For sort the test sees every
    5th input, the card all 3125: the minimal circuits are the same.)"""
    org, kind, _, _, _, minimal = case
    by_kind = org.card["ground_truth_by_mean_kind"]
    assert "COMPUTED" in org.card["ground_truth_definition"]
    assert by_kind[kind]["mean_kind"] == kind
    assert {frozenset(c) for c in by_kind[kind]["circuits"]} == minimal
    # the organism's ground_truth (AUROC, the CLI) is the first circuit of its own kind
    own = org.card["mean_kind"]
    assert own == "per_position" and org.per_position_means
    assert org.ground_truth == org.card["ground_truth"] == by_kind[own]["circuits"][0]


def test_report_times(request) -> None:
    """Prints the circuit, certificate and wall time per organism, kind and algorithm."""
    for (name, kind, algorithm), (kept, cert, sec) in sorted(TIMES.items()):
        print(f"{name:18s} {kind:13s} {algorithm:17s} {cert:11s} {sec:6.2f}s {kept}")
