"""results.json and report.html of an edge circuit: measured edges, node units, the graph."""

from __future__ import annotations

import copy
import html
import re

import pytest
import torch

import meanablate as ma
from edge_reference import random_model
from meanablate import ablate, compute_means
from meanablate.discovery import EdgeData, discover_edges, edge_sweep
from meanablate.discovery.graph import build_graph, node_unit
from meanablate.metrics import get_metric
from meanablate.organisms.transformer import TransformerConfig
from meanablate.report import example_results, load_results, validate_results
from meanablate.report.graph import MAX_ARROWS, circuit_svg, drawn_edges
from meanablate.report.html import render_html
from meanablate.results.edges import edge_records, edge_results, node_effects

torch.set_num_threads(1)

CFG = TransformerConfig(
    n_layers=2, d_model=8, n_heads=2, d_head=4, d_vocab=7, n_ctx=6, d_mlp=12, normalization="LN"
)


def _data(seed: int = 4) -> tuple:
    model = random_model(CFG, seed)
    gen = torch.Generator().manual_seed(seed)
    batches = [{"tokens": torch.randint(0, 7, (4, 5), generator=gen)} for _ in range(2)]
    return model, batches, EdgeData(model, batches, "mean")


def test_node_effects_are_node_mean_ablations_with_ablate():
    model, batches, data = _data()
    got = node_effects(data, "kl")
    m = get_metric("kl")
    nodes = [n.name for n in data.graph.srcs if n.name != "input"]
    assert got.units == [node_unit(n) for n in nodes]
    sites = sorted({u.split("[")[0] for u in got.units})
    means = compute_means(model, sites, batches)
    for i, unit in enumerate(got.units):
        want = []
        for b in batches:
            with torch.no_grad():
                clean = model(b["tokens"])
                with ablate(model, unit, means):
                    want.append(m.bind(b, clean)(model(b["tokens"])).double())
        assert torch.allclose(got.per_example[i], torch.cat(want), atol=1e-6), unit
    assert bool(got.exact.all()) and got.method == "sweep"


def test_edge_records_list_kept_edges_and_the_strongest_others():
    g = build_graph(2, 2, True)
    gen = torch.Generator().manual_seed(0)
    values = torch.randn(len(g), generator=gen).tolist()
    scores = dict(zip(g.names, values))
    scores[g.names[5]] = 0.0  # measured as nothing: never listed outside the circuit
    kept = [g.names[3], g.names[-1]]
    recs, left = edge_records(g, scores, kept, top_k=4, ground_truth=[g.names[3]])
    names = [r["name"] for r in recs]
    assert names == [n for n in g.names if n in set(names)]  # graph order
    others = [n for n in g.names if n not in kept and scores[n]]
    others.sort(key=lambda n: -abs(scores[n]))
    assert set(names) == set(kept) | set(others[:4])
    assert left == len(g) - len(recs)
    for r in recs:
        e = g.edge(r["name"])
        assert r["weight"] == scores[r["name"]]  # signed, as measured
        assert r["in_circuit"] == (r["name"] in kept)
        assert r["input"] == e.qkv
        assert r["in_ground_truth"] == (r["name"] == g.names[3])
        assert r["source"] == (node_unit(e.src) or "input")
        assert r["target"] == (node_unit(e.dst) or "output")
    with pytest.raises(ValueError, match=r"'a9\.h0->logits' does not exist"):
        edge_records(g, scores, ["a9.h0->logits"])
    with pytest.raises(ValueError, match="top_k must be >= 0, got -1"):
        edge_records(g, scores, kept, top_k=-1)


def test_report_of_an_edge_circuit_draws_its_kept_edges(tmp_path):
    model, _, data = _data(5)
    circuit = discover_edges(model, data, metric="kl", algorithm="sweep", target_faithfulness=0.9)
    sweep = edge_sweep(model, data, metric="kl")
    page = ma.report(tmp_path / "run", circuit, edge_data=data, n_boot=50, name="tiny")
    results = load_results(tmp_path / "run")
    listed = {e["name"]: e for e in results["edges"]}
    assert {n for n, e in listed.items() if e["in_circuit"]} == set(circuit.kept)
    for name, e in listed.items():  # the sweep's exact effects, sign included
        assert e["weight"] == pytest.approx(sweep[name], abs=1e-9)
    assert results["edges_left_out"] == len(data.graph) - len(listed)
    touched = {node_unit(x) for n in circuit.kept for x in n.split("<")[0].split("->")} - {None}
    assert set(results["circuit"]["units"]) == touched
    text = page.read_text()
    svg = text[text.index('<svg id="circuit-graph"') :]
    arrows = re.findall(r'<path class="edge" data-source="(\w+)" data-target="(\w+)"', svg)
    assert len(arrows) == len(circuit.kept)  # only the kept edges, none invented
    ids = {u["name"]: f"u{i}" for i, u in enumerate(results["units"])}
    want = sorted(
        (ids.get(e["source"], "input"), ids.get(e["target"], "output"))
        for e in results["edges"]
        if e["in_circuit"]
    )
    assert sorted(arrows) == want
    assert f"of the circuit&#39;s {len(circuit.kept)} measured edges" in text
    n_units = len(results["units"])  # the size tile counts edges, and names the units too
    assert f"edges kept ({len(results['circuit']['units'])} of {n_units} units)" in text
    faith_svg = (tmp_path / "run" / "faithfulness.svg").read_text()
    assert f"circuit ({len(circuit.kept)} edges): " in faith_svg
    with pytest.raises(ValueError, match="needs edge_data="):
        ma.report(tmp_path / "x", circuit)
    node_circuit = ma.Circuit.load(tmp_path / "run")  # the node view of the run
    assert node_circuit.kept == results["circuit"]["units"]


def test_graph_caps_arrows_and_skips_edges_outside_the_circuit():
    results = copy.deepcopy(example_results(with_edges=True))
    edges = results["edges"]
    edges[0]["in_circuit"] = False
    svg = circuit_svg(results)
    assert svg.count('class="edge"') == len(edges) - 1
    many = [dict(edges[1], weight=float(i + 1)) for i in range(MAX_ARROWS + 7)]
    assert drawn_edges(many) == list(range(7, MAX_ARROWS + 7))  # the strongest
    results["edges"] = many
    results["edges_left_out"] = 3
    validate_results(results)
    page = html.unescape(render_html(results, {}))
    assert page.count('class="edge"') == MAX_ARROWS
    assert f"The arrows are {MAX_ARROWS} of the circuit's {MAX_ARROWS + 7} measured edges" in page
    assert "3 measured edges outside the circuit are not drawn" in page
    bad = copy.deepcopy(results)
    bad["edges"][0]["input"] = "x"
    with pytest.raises(ValueError, match=r"\$\.edges\[0\]\.input"):
        validate_results(bad)
    bad["edges_left_out"] = -1
    bad["edges"][0]["input"] = "q"
    with pytest.raises(ValueError, match=r"edges_left_out"):
        validate_results(bad)


def test_edge_results_rejects_a_node_circuit():
    _, _, data = _data()
    node = ma.Circuit("greedy", ["blocks.0.hook_mlp_out"], [], {}, "kl", 0.0, 0.0, 0.0)
    with pytest.raises(ValueError, match="needs an edge circuit"):
        edge_results(node, data)
