"""discover() on micro models whose answer is known, and its argument checks.

- Heads with ``W_O = 0`` provably do nothing (their output is multiplied by zero), so
  every algorithm must drop them and ACDC must keep exactly the others.
- A linear model where neuron ``i`` writes only to output ``i`` with weight ``w_i`` gives
  ACDC's metric changes in closed form.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import nn

from meanablate.discovery import (
    Circuit,
    discover,
    faithfulness,
    score_circuit,
    sweep,
    transformer_units,
)
from meanablate.organisms import HookedTransformer, TransformerConfig
from meanablate.stats import Means, compute_means

CFG = TransformerConfig(
    n_layers=2, d_model=12, n_heads=4, d_head=3, d_vocab=9, n_ctx=6, d_mlp=10, normalization="LN"
)
DEAD_HEADS = {(0, 1), (1, 0), (1, 3)}


def micro_transformer(dead: set[tuple[int, int]] = DEAD_HEADS, dead_mlps=()) -> HookedTransformer:
    torch.manual_seed(0)
    model = HookedTransformer(CFG).eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.6 + name.endswith(".w"))
        for layer, h in dead:
            model.blocks[layer].attn.W_O[h] = 0.0
        for layer in dead_mlps:
            model.blocks[layer].mlp.W_out.zero_()
    return model


def data(n: int = 24, seed: int = 0) -> list[dict]:
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(CFG.d_vocab, (n, 6), generator=gen)
    target = torch.randint(CFG.d_vocab, (n, 6), generator=gen)
    target[:, :2] = -100
    return [{"tokens": t, "target": y} for t, y in zip(tokens.split(12), target.split(12))]


@pytest.fixture(scope="module")
def micro():
    model = micro_transformer()
    batches = data()
    units = transformer_units(model, "components")
    means = compute_means(model, units, batches, per_position=True)
    alive = [
        u
        for u in units
        if not any(f"blocks.{L}.attn.hook_z[heads={h}]" == u for L, h in DEAD_HEADS)
    ]
    return model, batches, units, means, alive


def _faith_without(model, batches, units, means, metric, kept) -> float:
    """Faithfulness of ``kept`` by the plain hooked forward (independent of SetMetric)."""
    from meanablate.discovery.evaluate import metric_per_example

    def m(ablated):
        return float(metric_per_example(model, batches, ablated, means, metric).mean())

    full, empty = m([]), m(units)
    return faithfulness(m([u for u in units if u not in set(kept)]), full, empty)


@pytest.mark.parametrize("metric", ["kl", "l2"])
def test_acdc_keeps_exactly_the_units_that_matter(micro, metric) -> None:
    model, batches, units, means, alive = micro
    # the exhaustive check (848 subsets) once; for l2 the removal pass alone
    limit = 4096 if metric == "kl" else 0
    circuit = discover(
        model, batches, means, units=units, metric=metric, threshold=1e-7, max_exhaustive=limit
    )
    assert isinstance(circuit, Circuit) and circuit.algorithm == "acdc"
    assert circuit.kept == alive
    assert set(circuit.scores) == set(units)
    for u in set(units) - set(alive):
        assert circuit.scores[u] == 0.0  # provably nothing: the output is bit-identical
    assert min(circuit.scores[u] for u in alive) > 1e-4
    assert circuit.metric_circuit == circuit.metric_full  # dead heads change nothing
    assert circuit.faithfulness == 1.0
    assert circuit.threshold == 1e-7 and circuit.metric == metric
    assert circuit.target_faithfulness == 1 - 1e-7
    assert circuit.abs_threshold == pytest.approx(1e-7 * abs(circuit.behaviour))
    if metric == "kl":  # 10 units, 7 kept: the 848 smaller subsets were all checked
        assert circuit.certificate == "exhaustive" and circuit.subsets_checked == 848
    else:
        assert circuit.certificate == "1-minimal" and circuit.subsets_checked == 0


def test_discovery_refuses_behaviour_it_cannot_tell_from_noise(micro) -> None:
    """A random model's loss: m(full) - m(empty) has a bootstrap interval around 0."""
    model, batches, units, means, _ = micro
    for algorithm, thr in (("acdc", 0.01), ("sweep", None)):
        with pytest.raises(ValueError, match=r"not distinguishable.*contains 0.*force=True"):
            discover(model, batches, means, units=units, metric="loss", algorithm=algorithm,
                     threshold=thr)  # fmt: skip
    circuit = discover(model, batches, means, units=units, metric="loss", threshold=0.01,
                       force=True)  # fmt: skip
    lo, hi = circuit.behaviour_ci
    assert lo <= 0 <= hi and circuit.behaviour == pytest.approx(
        circuit.metric_full - circuit.metric_empty
    )


def test_acdc_with_a_dead_mlp_too() -> None:
    model = micro_transformer(dead={(0, 2)}, dead_mlps=(0,))
    batches = data(12)
    units = transformer_units(model, "components")
    means = compute_means(model, units, batches)
    circuit = discover(model, batches, means, units=units, metric="kl", threshold=1e-7)
    assert circuit.kept == [
        u for u in units if u not in ("blocks.0.attn.hook_z[heads=2]", "blocks.0.hook_mlp_out")
    ]


@pytest.mark.parametrize("algorithm", ["sweep", "attribution", "attribute_verify"])
def test_score_then_prune_never_needs_a_dead_head(micro, algorithm) -> None:
    model, batches, units, means, alive = micro
    circuit = discover(
        model,
        batches,
        means,
        units=units,
        metric="kl",
        algorithm=algorithm,
        target_faithfulness=0.9,
    )
    assert set(circuit.kept) <= set(alive)
    assert circuit.faithfulness >= 0.9
    assert circuit.target_faithfulness == 0.9 and circuit.threshold is None
    # the ranking's curve: the smallest top-k reaching the target, before the removal pass
    sizes = [s for s, _ in circuit.curve]
    assert sizes == list(range(sizes[-1] + 1))
    assert circuit.curve[-1][1] >= 0.9
    assert all(f < 0.9 for _, f in circuit.curve[:-1])
    assert len(circuit.kept) <= sizes[-1]
    # minimal, checked by the plain hooked forward: no kept unit can go
    assert circuit.certificate == "exhaustive"
    for u in circuit.kept:
        rest = [v for v in circuit.kept if v != u]
        assert _faith_without(model, batches, units, means, "kl", rest) < 0.9
    if algorithm == "sweep":
        exact = sweep(model, batches, units, means, metric="kl")
        assert circuit.scores == exact.as_dict()


def test_the_exhaustive_check_finds_a_smaller_circuit_and_respects_its_limit(micro) -> None:
    from meanablate.discovery.evaluate import metric_per_example

    model, batches, units, means, _ = micro
    units = [u for u in units if "heads" in u]  # 8 heads: a brute force the test can afford
    kw = dict(units=units, metric="kl", algorithm="sweep", target_faithfulness=0.9)
    small = discover(model, batches, means, **kw)
    one_min = discover(model, batches, means, **kw, max_exhaustive=0)
    assert one_min.certificate == "1-minimal" and one_min.subsets_checked == 0
    assert small.certificate == "exhaustive" and len(small.kept) <= len(one_min.kept)
    raw = discover(model, batches, means, **kw, minimize=False)
    assert raw.certificate == "none" and len(raw.kept) >= len(one_min.kept)

    # brute force with the plain hooked forward: nothing smaller reaches 0.9
    def m(ablated) -> float:
        return float(metric_per_example(model, batches, ablated, means, "kl").mean())

    full, empty = m([]), m(units)
    for size in range(len(small.kept)):
        for combo in itertools.combinations(units, size):
            rest = [u for u in units if u not in combo]
            assert faithfulness(m(rest), full, empty) < 0.9 + 1e-9
    assert faithfulness(small.metric_circuit, full, empty) >= 0.9 - 1e-9


# -- ACDC in closed form -----------------------------------------------------------------
def diagonal_model(w: list[float]) -> nn.Sequential:
    n = len(w)
    model = nn.Sequential(nn.Linear(n, n, bias=False), nn.Linear(n, n, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(torch.eye(n))
        model[1].weight.copy_(torch.diag(torch.tensor(w)))
    return model.eval()


@pytest.mark.parametrize(
    ("threshold", "kept"),
    [(0.05, [0, 1, 2]), (0.5, [0, 2]), (2.0, [0, 2]), (2.01, [0]), (3.5, [2])],
)
def test_acdc_metric_changes_in_closed_form(threshold, kept) -> None:
    # l2 after ablating neurons S: sqrt(sum_{i in S} w_i^2 (x_i - mean_i)^2) = sqrt(sum w_i^2)
    # A removal needs a step below the threshold AND the circuit left within it of full
    # (target faithfulness 1 - threshold / m(empty)): at 2.0, removing neuron 2 after 1
    # is a step of 1.90 but leaves 2.0025 > 2.0, so it stays.
    w = [3.0, 0.1, 2.0]
    model = diagonal_model(w)
    x = torch.tensor([[0.5, -1.0, 2.0]])
    means = Means({"0": (x[0] - 1).double()}, {"0": torch.tensor(1.0)})
    units = ["0[neurons=0]", "0[neurons=1]", "0[neurons=2]"]
    circuit = discover(model, [x], means, units=units, metric="l2", abs_threshold=threshold)
    assert circuit.kept == [units[i] for i in kept]
    removed = [i for i in range(3) if i not in kept]
    assert circuit.metric_circuit == pytest.approx(math.sqrt(sum(w[i] ** 2 for i in removed)))
    empty = math.sqrt(sum(v**2 for v in w))
    assert circuit.metric_empty == pytest.approx(empty)
    assert circuit.threshold == pytest.approx(threshold / empty)
    assert circuit.certificate == "exhaustive"
    # the walk: neuron 0 first (input order among equals), each tried on top of the removed
    current, expect, gone = 0.0, {}, []
    for i in range(3):
        trial = math.sqrt(sum(w[j] ** 2 for j in [*gone, i]))
        expect[units[i]] = abs(trial - current)
        if expect[units[i]] < threshold and trial <= threshold:
            gone.append(i)
            current = trial
    assert circuit.scores == pytest.approx(expect)
    # the same threshold given relative to |m(full) - m(empty)| finds the same circuit
    rel = discover(model, [x], means, units=units, metric="l2", threshold=threshold / empty)
    assert rel.kept == circuit.kept and rel.scores == pytest.approx(circuit.scores)


# -- argument checks -----------------------------------------------------------------------
@pytest.mark.parametrize(
    "threshold", [None, -0.1, 1.0, 1.5, float("nan"), float("inf"), -float("inf")]
)
def test_acdc_threshold_out_of_range_raises(micro, threshold) -> None:
    model, batches, units, means, _ = micro
    with pytest.raises(ValueError, match=r"threshold in \[0, 1\)"):
        discover(model, batches, means, units=units, metric="kl", threshold=threshold)


@pytest.mark.parametrize("bad", [-0.1, float("nan"), float("inf")])
def test_abs_threshold_out_of_range_raises(micro, bad) -> None:
    model, batches, units, means, _ = micro
    with pytest.raises(ValueError, match="abs_threshold must be a finite number >= 0"):
        discover(model, batches, means, units=units, metric="kl", abs_threshold=bad)
    with pytest.raises(ValueError, match="not both"):
        discover(model, batches, means, units=units, threshold=0.1, abs_threshold=0.1)
    with pytest.raises(ValueError, match="whole behaviour"):
        discover(model, batches, means, units=units, metric="kl", abs_threshold=1e9)
    with pytest.raises(ValueError, match="max_exhaustive"):
        discover(model, batches, means, units=units, metric="kl", threshold=0.1,
                 max_exhaustive=-1)  # fmt: skip


@pytest.mark.parametrize("algorithm", ["sweep", "attribution", "attribute_verify"])
def test_threshold_given_to_score_based_pruning_raises(micro, algorithm) -> None:
    model, batches, units, means, _ = micro
    with pytest.raises(ValueError, match="threshold"):
        discover(model, batches, means, units=units, algorithm=algorithm, threshold=0.1)


@pytest.mark.parametrize("target", [0.0, -0.5, 1.01, float("nan")])
def test_target_faithfulness_out_of_range_raises(micro, target) -> None:
    model, batches, units, means, _ = micro
    with pytest.raises(ValueError, match="target_faithfulness"):
        discover(model, batches, means, units=units, algorithm="sweep", target_faithfulness=target)


def test_unknown_units_algorithm_and_verify_top_raise(micro) -> None:
    model, batches, units, means, _ = micro
    for bad in (["blocks.5.hook_mlp_out"], ["blocks.0.attn.hook_q[heads=0]", "nope"]):
        for algorithm, thr in (("acdc", 0.1), ("sweep", None)):
            with pytest.raises(ValueError, match="no module"):
                discover(model, batches, means, units=bad, algorithm=algorithm, threshold=thr)
    with pytest.raises(IndexError):  # a module that exists, a head that does not
        discover(model, batches, means, units=["blocks.0.attn.hook_z[heads=9]"], threshold=0.1)
    with pytest.raises(ValueError, match="algorithm"):
        discover(model, batches, means, units=units, algorithm="greedy")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="verify_top"):
        discover(model, batches, means, units=units, algorithm="attribute_verify", verify_top=99)
    with pytest.raises(ValueError, match="duplicates"):
        discover(model, batches, means, units=[units[0], units[0]], threshold=0.1)


def test_faithfulness_is_undefined_when_full_equals_empty() -> None:
    with pytest.raises(ValueError, match="undefined"):
        faithfulness(0.3, 0.7, 0.7)
    assert faithfulness(0.5, 1.0, 0.0) == 0.5
    # a model whose every head is dead: ablating all of them changes nothing
    dead = {(L, h) for L in range(2) for h in range(4)}
    model = micro_transformer(dead=dead)
    batches = data(8)
    units = transformer_units(model, "heads")
    means = compute_means(model, units, batches)
    for metric in ("kl", "loss"):
        for algorithm, thr in (("sweep", None), ("acdc", 1e-9)):
            with pytest.raises(ValueError, match="no behaviour to explain"):
                discover(model, batches, means, units=units, metric=metric,
                         algorithm=algorithm, threshold=thr, force=True)  # fmt: skip
        with pytest.raises(ValueError, match="undefined"):
            score_circuit(model, batches, units[:2], units, means, metric)


def test_a_confidence_interval_from_one_example_raises(micro) -> None:
    model, batches, units, means, alive = micro
    one = [{k: v[:1] for k, v in batches[0].items()}]
    with pytest.raises(ValueError, match="at least 2 examples"):
        score_circuit(model, one, alive, units, means, "loss")
    scores = sweep(model, one, units, means, metric="loss")
    with pytest.raises(ValueError, match="at least 2 examples"):
        scores.ci()
    # with two examples it works, and the interval is ordered
    two = [{k: v[:2] for k, v in batches[0].items()}]
    lo, hi = score_circuit(model, two, alive[:3], units, means, "loss").faithfulness_ci
    assert lo <= hi


def test_roc_needs_known_units_and_both_classes(micro) -> None:
    model, batches, units, means, alive = micro
    circuit = discover(
        model, batches, means, units=units, metric="kl", threshold=1e-7, max_exhaustive=0
    )
    fpr, tpr, area = circuit.roc(alive)
    assert area == 1.0 and fpr[0] == tpr[0] == 0.0 and fpr[-1] == tpr[-1] == 1.0
    with pytest.raises(ValueError, match="not among the units"):
        circuit.roc(["blocks.9.hook_mlp_out"])
    with pytest.raises(ValueError, match="positives and negatives"):
        circuit.roc(units)


@pytest.mark.parametrize("metric", ["kl", "l2", "loss", "prob"])
def test_cached_clean_outputs_change_nothing(micro, metric) -> None:
    """Pruning reuses the clean outputs; the metric of any set must be what a fresh
    clean forward gives, and mismatched clean outputs are refused."""
    from meanablate.discovery.evaluate import clean_outputs, metric_per_example

    model, batches, units, means, _ = micro
    clean = clean_outputs(model, batches)
    assert clean is not None and len(clean) == len(batches)
    for ablated in ([], units[:3], units):
        fresh = metric_per_example(model, batches, ablated, means, metric)
        cached = metric_per_example(model, batches, ablated, means, metric, clean=clean)
        torch.testing.assert_close(cached, fresh, rtol=0, atol=0)
    with pytest.raises(ValueError, match="clean has 1 outputs for 2 batches"):
        metric_per_example(model, batches, units[:1], means, metric, clean=clean[:1])


def test_clean_outputs_over_budget_are_not_kept(micro, monkeypatch) -> None:
    from meanablate.discovery import evaluate

    model, batches, *_ = micro
    monkeypatch.setattr(evaluate, "CLEAN_CACHE_BYTES", 100)
    assert evaluate.clean_outputs(model, batches) is None


def test_attribute_verify_keeps_only_verified_units(micro) -> None:
    """However small verify_top starts, every kept unit ends up measured exactly, and its
    score is its exact sweep effect."""
    model, batches, units, means, _ = micro
    exact = sweep(model, batches, units, means, metric="kl").as_dict()
    c = discover(
        model,
        batches,
        means,
        units=units,
        metric="kl",
        algorithm="attribute_verify",
        target_faithfulness=0.99,
        verify_top=1,
    )
    assert c.unit_scores is not None and c.faithfulness >= 0.99
    verified = {u for u, e in zip(c.unit_scores.units, c.unit_scores.exact) if bool(e)}
    assert set(c.kept) <= verified
    # room below the cut: as many verified units outside the circuit as in it (or all)
    assert len(verified) >= min(len(units), 2 * len(c.kept))
    for u in c.kept:
        measured = c.unit_scores.per_example[units.index(u)].mean().item()
        assert math.isclose(measured, exact[u], rel_tol=1e-9, abs_tol=1e-12)
