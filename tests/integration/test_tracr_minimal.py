"""Every shipped tracr organism x every mean kind x every pruning algorithm: the circuit
found is a smallest circuit, checked against a brute force over all unit subsets with
hand-written hooks, and its certificate is "exhaustive".

The references are independent of the library: means are averaged from activations caught
by plain forward hooks (per position; over all positions; over positions 1.. with BOS
keeping its own), every subset is ablated by plain forward hooks that overwrite the unit's
output, and the metric is computed from its definition.
"""

from __future__ import annotations

import itertools
import re
import time

import pytest
import torch

from meanablate.discovery import ALGORITHMS, discover
from meanablate.organisms import registry, tracr_models, tracr_program
from meanablate.stats import MEAN_KINDS, compute_means

ORGANISMS = ["tracr-reverse", "tracr-frac_prevs", "tracr-sort", "tracr-sort_unique", "tracr-hist"]
TARGET = 0.95
_UNIT = re.compile(r"^(blocks\.\d+\.attn\.hook_z)\[heads=(\d+)\]$|^(blocks\.\d+\.hook_mlp_out)$")
TIMES: dict[tuple[str, str, str], tuple[list[str], str, float]] = {}


def parse(unit: str) -> tuple[str, int | None]:
    m = _UNIT.match(unit)
    assert m, unit
    return (m.group(1), int(m.group(2))) if m.group(1) else (m.group(3), None)


# sort's 3125 inputs: every 5th keeps the test fast (any data set will do: discovery and the
# brute force below see the same one)
STRIDE = {"tracr-sort": 5}


def exhaustive(org) -> dict:
    if "examples" in org.card:
        batch = tracr_program.exhaustive_batch(org.card)
    else:
        batch = tracr_models.exhaustive_batches(org.card, 10**9)[0]
    step = STRIDE.get(org.name, 1)
    return {k: v[::step] for k, v in batch.items()}


def hand_means(model, tokens, units, kind: str) -> dict[str, torch.Tensor]:
    """[pos, ...] float64 means of each unit's module output, for ``kind``."""
    seen: dict[str, torch.Tensor] = {}
    keys = {parse(u)[0] for u in units}
    handles = [
        model.get_submodule(k).register_forward_hook(
            lambda _m, _a, out, k=k: seen.__setitem__(k, out.detach().double())
        )
        for k in keys
    ]
    try:
        with torch.no_grad():
            model(tokens)
    finally:
        for h in handles:
            h.remove()
    out = {}
    for k, a in seen.items():  # a: [n, pos, ...]
        per_pos = a.mean(0)
        if kind == "per_position":
            out[k] = per_pos
        elif kind == "plain":
            out[k] = a.flatten(0, 1).mean(0).expand_as(per_pos).clone()
        else:  # plain_except: BOS (position 0) keeps its own mean
            rest = a[:, 1:].flatten(0, 1).mean(0)
            out[k] = torch.cat([per_pos[:1], rest.expand_as(per_pos[1:])])
    return out


def hand_logits(model, tokens, ablated, means) -> torch.Tensor:
    handles = []
    for unit in ablated:
        key, head = parse(unit)

        def hook(_m, _a, out, key=key, head=head):
            mean = means[key].to(out.dtype).expand(out.shape)
            out = out.clone()
            if head is None:
                out[...] = mean
            else:
                out[:, :, head] = mean[:, :, head]
            return out

        handles.append(model.get_submodule(key).register_forward_hook(hook))
    try:
        with torch.no_grad():
            return model(tokens)
    finally:
        for h in handles:
            h.remove()


def hand_metric(metric: str, logits, batch) -> float:
    logits = logits.double()
    if metric == "mse":
        value = batch["target_value"].double()
        scored = ~value.isnan()
        per_pos = (logits[..., 0] - value.nan_to_num()).pow(2)
    else:
        assert metric == "loss", metric
        scored = batch["target"] != -100
        logp = torch.log_softmax(logits, -1)
        per_pos = -logp.gather(-1, batch["target"].clamp(min=0)[..., None])[..., 0]
    per_pos = torch.where(scored, per_pos, torch.zeros_like(per_pos))
    return float((per_pos.sum(1) / scored.sum(1)).mean())


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
    m = {
        frozenset(kept): hand_metric(
            org.metric,
            hand_logits(org.model, batch["tokens"], [u for u in units if u not in kept], ref),
            batch,
        )
        for r in range(len(units) + 1)
        for kept in itertools.combinations(units, r)
    }
    full, empty = m[frozenset(units)], m[frozenset()]
    faith = {s: (v - empty) / (full - empty) for s, v in m.items()}
    size = min(len(s) for s, f in faith.items() if f >= TARGET)
    minimal = {s for s, f in faith.items() if len(s) == size and f >= TARGET}
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
