"""Edge ground truth of the organisms, edge AUROC, faithfulness, MIB's CPR / CMD."""

from __future__ import annotations

import functools
import json

import numpy as np
import pytest
import torch

from meanablate.discovery.edge_prune import discover_edges
from meanablate.discovery.edge_sweep import edge_sweep
from meanablate.discovery.edge_truth import edge_ground_truth, program_edges
from meanablate.discovery.edges import EdgeData, edge_mask
from meanablate.discovery.mib import (
    MIB_PERCENTAGES,
    edge_auroc,
    mib_curve,
    on_paths,
    score_edge_circuit,
    to_mib_json,
)
from meanablate.organisms import registry
from meanablate.organisms.tracr_models import exhaustive_batches, score

TRACR = ["tracr-reverse", "tracr-frac_prevs", "tracr-sort"]


@functools.cache
def _truth(name: str) -> tuple[str, ...]:
    return tuple(edge_ground_truth(registry.load(name)))


def _data(org):
    if org.name == "tracr-sort":
        return org.make_batches(300, 300, 0)
    if org.name.startswith("tracr-"):
        return exhaustive_batches(org.card)
    return org.make_batches(128, 64, 1)


@pytest.mark.parametrize("name", [*TRACR, "induction"])
def test_edge_auroc_is_one_and_the_truth_survives_ablation(name):
    org = registry.load(name)
    truth = list(_truth(org.name))
    source = "mean-positional" if org.per_position_means else "mean"
    data = EdgeData(org.model, _data(org), source)
    sweep = edge_sweep(org.model, data, metric=org.metric)
    assert edge_auroc(sweep, truth) == 1.0
    # Ablating any true edge alone moves the metric ...
    effects = sweep.as_dict()
    assert min(abs(effects[e]) for e in truth) > 1e-3
    # ... and ablating every other edge keeps the task.
    others = [n for n in data.graph.names if n not in set(truth)]
    mask = edge_mask(data.graph, others)
    for item in data.items:
        logits = data.logits(item, mask)
        if name.startswith("tracr-"):
            assert score(org.card, logits, item.batch)["accuracy"] == 1.0
        else:
            keep = item.batch["target"] != -100
            acc = (logits[keep].argmax(-1) == item.batch["target"][keep]).float().mean()
            assert float(acc) > 0.99
    s = score_edge_circuit(data, truth, org.metric)
    assert s.faithfulness == pytest.approx(1.0, abs=1e-3)


@pytest.mark.parametrize("name", TRACR)
def test_true_tracr_edges_are_program_edges(name):
    org = registry.load(name)
    assert set(_truth(name)) <= set(program_edges(org.model))


def test_acdc_over_edges_on_tracr_reverse_has_auroc_one():
    org = registry.load("tracr-reverse")
    truth = list(_truth(org.name))
    data = EdgeData(org.model, exhaustive_batches(org.card), "mean-positional")
    for threshold in (1e-6, 1e-5, 1e-4, 1e-3):
        c = discover_edges(org.model, data, metric="kl", abs_threshold=threshold)
        assert sorted(c.kept) == sorted(truth)
        assert edge_auroc(c.scores, truth) == 1.0


def test_mib_curve_matches_a_hand_computation():
    org = registry.load("tracr-sort")
    data = EdgeData(org.model, org.make_batches(200, 200, 3), "mean-positional")
    gen = torch.Generator().manual_seed(0)
    scores = dict(zip(data.graph.names, torch.randn(len(data.graph), generator=gen).tolist()))
    curve = mib_curve(data, scores, "loss")
    full = float(data.metric_of([], "loss").mean())
    empty = float(data.metric_of(data.graph.names, "loss").mean())
    ranking = sorted(scores, key=lambda n: -abs(scores[n]))
    faiths = []
    for p in MIB_PERCENTAGES:
        kept = set(on_paths(data.graph, ranking[: int(p * len(ranking))]))
        m = float(data.metric_of([n for n in ranking if n not in kept], "loss").mean())
        faiths.append((m - empty) / (full - empty))
    x = np.array(MIB_PERCENTAGES)
    f = np.array(faiths)
    assert curve.faithfulness == pytest.approx(faiths)
    assert curve.cpr == pytest.approx(float(np.sum(np.diff(x) * (f[1:] + f[:-1]) / 2)))
    assert curve.cmd == pytest.approx(
        float(np.sum(np.diff(x) * (abs(1 - f[1:]) + abs(1 - f[:-1])) / 2))
    )
    assert curve.faithfulness[-1] == pytest.approx(1.0)


def test_on_paths_drops_dangling_edges():
    org = registry.load("tracr-reverse")
    graph = EdgeData(org.model, exhaustive_batches(org.card)[:1], "zero").graph
    kept = ["input->a3.h0<v>", "a3.h0->logits", "a0.h0->m0", "m2->a3.h0<q>"]
    assert on_paths(graph, kept) == ["input->a3.h0<v>", "a3.h0->logits"]


def test_mib_json_export(tmp_path):
    org = registry.load("tracr-reverse")
    data = EdgeData(org.model, exhaustive_batches(org.card), "mean-positional")
    s = edge_sweep(org.model, data, metric="loss")
    out = to_mib_json(data.graph, s, ["input->a3.h0<v>", "a3.h0->logits"], tmp_path / "c.json")
    loaded = json.loads((tmp_path / "c.json").read_text())
    assert loaded == out
    assert set(out["edges"]) == set(data.graph.names)
    assert out["edges"]["a3.h0->logits"] == {
        "score": pytest.approx(s.as_dict()["a3.h0->logits"]),
        "in_graph": True,
    }
    assert [n for n, v in out["nodes"].items() if v["in_graph"]] == ["input", "a3.h0", "logits"]
    with pytest.raises(ValueError, match="does not exist"):
        to_mib_json(data.graph, s, ["a3.h0->a0.h0<q>"])


def test_circuit_to_dot_draws_kept_edges_with_signs_and_top_k():
    from meanablate.discovery import Circuit

    units = ["input->a0.h0<v>", "a0.h0->logits", "input->logits", "input->m0"]
    scores = {"input->a0.h0<v>": 0.5, "a0.h0->logits": -2.0, "input->logits": 0.1, "input->m0": 0}
    c = Circuit("acdc", units, units[:3], scores, "kl", 0.0, 0.1, 1.0)
    dot = c.to_dot()
    assert dot.startswith("digraph circuit {") and dot.rstrip().endswith("}")
    arrows = [ln for ln in dot.splitlines() if "->" in ln]
    assert len(arrows) == 3  # kept edges only
    assert '"a0.h0" -> "logits" [label="-2", color="#c0392b", penwidth=4.00];' in dot
    assert '"input" -> "a0.h0" [label="0.5 (v)", color="#2e86c1"' in dot
    top = c.to_dot(top_k=1)
    assert len([ln for ln in top.splitlines() if "->" in ln]) == 1
    assert "2 more kept edges not drawn" in top
    node = Circuit(
        "sweep",
        ["blocks.0.attn.hook_z[heads=0]", "blocks.1.hook_mlp_out"],
        ["blocks.0.attn.hook_z[heads=0]", "blocks.1.hook_mlp_out"],
        {},
        "loss",
        0.0,
        0.0,
        1.0,
    )
    nd = node.to_dot()
    assert '"a0.h0" -> "m1" [style=dashed];' in nd and '"input" -> "a0.h0" [style=dashed];' in nd
    with pytest.raises(ValueError, match="top_k"):
        c.to_dot(top_k=0)
