"""meanablate.report: the results.json schema, atomic writes, plots and the HTML report."""

from __future__ import annotations

import base64
import copy
import itertools
import json
import math
import os
import random
import re
import stat
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from meanablate.report import (
    RESULTS_SCHEMA,
    example_results,
    validate_results,
    write_json_atomic,
    write_report,
)
from meanablate.report.html import render_html
from meanablate.report.plots import plot_roc, roc_curve

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# -- helpers ---------------------------------------------------------------------------------
class _Collector(HTMLParser):
    """Collects every element (tag, attributes, enclosing ids) and the text of <title>s."""

    def __init__(self) -> None:
        super().__init__()
        self.elements: list[tuple[str, dict[str, str], tuple[str, ...]]] = []
        self.stack: list[tuple[str, str]] = []
        self.titles: dict[str, str] = {}  # id of the enclosing unit -> its <title> text
        self._in_title: str | None = None
        self.text = ""  # all the page's text

    def handle_starttag(self, tag, attrs):
        attrs = self._record(tag, attrs)
        if tag == "title" and self.stack and re.fullmatch(r"u\d+", self.stack[-1][1]):
            self._in_title = self.stack[-1][1]
            self.titles[self._in_title] = ""
        if tag not in {"meta", "link", "img", "br", "input"}:
            self.stack.append((tag, attrs.get("id", "")))

    def handle_startendtag(self, tag, attrs):  # <path .../>: no children
        self._record(tag, attrs)

    def _record(self, tag, attrs):
        attrs = {k: v or "" for k, v in attrs}
        self.elements.append((tag, attrs, tuple(i for _, i in self.stack if i)))
        return attrs

    def handle_endtag(self, tag):
        while self.stack:
            open_tag, _ = self.stack.pop()
            if open_tag == tag:
                break
        if tag == "title":
            self._in_title = None

    def handle_data(self, data):
        self.text += data
        if self._in_title:
            self.titles[self._in_title] += data


def parse(page: str) -> _Collector:
    collector = _Collector()
    collector.feed(page)
    collector.close()
    return collector


def classes(attrs: dict[str, str]) -> set[str]:
    return set(attrs.get("class", "").split())


def graph_nodes(doc: _Collector) -> list[dict[str, str]]:
    return [
        attrs
        for tag, attrs, ancestors in doc.elements
        if "circuit-graph" in ancestors and "unit" in classes(attrs)
    ]


def without_ground_truth(results: dict) -> dict:
    results = copy.deepcopy(results)
    for unit in results["units"]:
        unit["in_ground_truth"] = None
    results["scores"].update(auroc=None, roc=None)
    return results


# -- the schema ------------------------------------------------------------------------------
def test_example_is_valid_deterministic_and_json_clean():
    results = example_results()
    validate_results(results)
    validate_results(example_results(with_edges=True))
    assert results == example_results()
    assert json.loads(json.dumps(results, allow_nan=False)) == results
    kinds = {u["kind"] for u in results["units"]}
    assert {"head", "mlp"} <= kinds
    assert 2 <= results["model"]["n_layers"] <= 3
    assert results["circuit"]["units"] == [u["name"] for u in results["units"] if u["in_circuit"]]


def test_nullable_fields_are_valid():
    results = without_ground_truth(example_results())
    results["curve"] = None
    results["edges"] = None
    results["circuit"]["threshold"] = None
    results["scores"].update(faithfulness_ci=None, completeness=None, minimality=None)
    for unit in results["units"]:
        unit.update(ci=None, attribution=None)
    results["units"][0]["index"] = None
    results["title"] = "A run"
    results["extra_field"] = {"anything": [1, 2]}  # extra keys are allowed
    validate_results(results)


def _set(path, value):
    def mutate(results):
        *parents, last = path
        target = results
        for key in parents:
            target = target[key]
        target[last] = value

    return mutate


def _delete(*path):
    def mutate(results):
        *parents, last = path
        target = results
        for key in parents:
            target = target[key]
        del target[last]

    return mutate


# (mutation, the path the message must name, whether a plain JSON Schema validator sees it too)
BROKEN = {
    "missing schema_version": (_delete("schema_version"), "$.schema_version", True),
    "wrong schema_version": (_set(["schema_version"], 2), "$.schema_version", True),
    "effect not a number": (_set(["units", 3, "effect"], "big"), "$.units[3].effect", True),
    "effect is a bool": (_set(["units", 3, "effect"], True), "$.units[3].effect", True),
    "unknown kind": (_set(["units", 0, "kind"], "layer"), "$.units[0].kind", True),
    "index a float": (_set(["units", 0, "index"], 1.5), "$.units[0].index", True),
    "ci too short": (_set(["units", 2, "ci"], [1.0]), "$.units[2].ci", True),
    "ci element": (_set(["units", 2, "ci"], [0.0, "x"]), "$.units[2].ci[1]", True),
    "ci reversed": (_set(["units", 2, "ci"], [2.0, 1.0]), "$.units[2].ci", False),
    "in_circuit missing": (_delete("units", 5, "in_circuit"), "$.units[5].in_circuit", True),
    "n_layers a string": (_set(["model", "n_layers"], "3"), "$.model.n_layers", True),
    "model class missing": (_delete("model", "class"), "$.model.class", True),
    "higher_is_better an int": (
        _set(["metric", "higher_is_better"], 1),
        "$.metric.higher_is_better",
        True,
    ),
    "seed a bool": (_set(["seed"], True), "$.seed", True),
    "created not a date": (_set(["created"], "yesterday"), "$.created", False),
    "config a list": (_set(["config"], []), "$.config", True),
    "auroc above 1": (_set(["scores", "auroc"], 1.5), "$.scores.auroc", True),
    "roc rate above 1": (_set(["scores", "roc", "fpr", 2], 3.0), "$.scores.roc.fpr[2]", True),
    "faithfulness null": (_set(["scores", "faithfulness"], None), "$.scores.faithfulness", True),
    "minimality value": (
        _set(["scores", "minimality", "blocks.0.hook_mlp_out"], "x"),
        "$.scores.minimality['blocks.0.hook_mlp_out']",
        True,
    ),
    "curve size float": (_set(["curve", "size", 1], 1.5), "$.curve.size[1]", True),
    "curve lengths": (_set(["curve", "size"], [0, 1]), "$.curve.faithfulness", False),
    "edge without target": (
        _set(["edges"], [{"source": "a", "weight": 1}]),
        "$.edges[0].target",
        True,
    ),
    "negative timing": (_set(["timings", "means"], -1.0), "$.timings.means", True),
    "versions missing torch": (_delete("versions", "torch"), "$.versions.torch", True),
    "circuit unit unknown": (
        lambda r: r["circuit"]["units"].append("blocks.9.hook_mlp_out"),
        "$.circuit.units[5]",
        False,
    ),
    "circuit unit repeated": (
        lambda r: r["circuit"]["units"].append(r["circuit"]["units"][0]),
        "$.circuit.units[5]",
        True,
    ),
    "in_circuit disagrees": (
        _set(["units", 1, "in_circuit"], False),
        "$.units[1].in_circuit",
        False,
    ),
    "duplicate unit name": (
        lambda r: r["units"][1].update(name=r["units"][0]["name"]),
        "$.units[1].name",
        False,
    ),
    "minimality key unknown": (
        _set(["scores", "minimality", "nope"], 0.1),
        "$.scores.minimality.nope",
        False,
    ),
    "roc lengths": (lambda r: r["scores"]["roc"]["tpr"].pop(), "$.scores.roc.tpr", False),
    "faithfulness_ci reversed": (
        _set(["scores", "faithfulness_ci"], [0.9, 0.1]),
        "$.scores.faithfulness_ci",
        False,
    ),
}


@pytest.mark.parametrize("case", BROKEN, ids=list(BROKEN))
def test_broken_results_are_rejected_with_their_path(case):
    mutate, path, _ = BROKEN[case]
    results = example_results()
    mutate(results)
    with pytest.raises(ValueError) as info:
        validate_results(results)
    message = str(info.value)
    assert f"invalid at {path}:" in message, message


@pytest.mark.parametrize("obj", [[], None, "results", 3])
def test_non_objects_are_rejected_at_the_root(obj):
    with pytest.raises(ValueError, match=r"invalid at \$: expected an object"):
        validate_results(obj)


def test_schema_is_a_valid_draft_2020_12_schema_that_agrees_with_validate_results():
    jsonschema = pytest.importorskip("jsonschema")
    validator_cls = jsonschema.Draft202012Validator
    validator_cls.check_schema(RESULTS_SCHEMA)
    validator = validator_cls(RESULTS_SCHEMA)
    validator.validate(example_results())
    validator.validate(example_results(with_edges=True))
    for case, (mutate, _, schema_level) in BROKEN.items():
        results = example_results()
        mutate(results)
        if schema_level:
            assert not validator.is_valid(results), case


def test_the_docstring_documents_every_field():
    from meanablate.report import schema

    doc = schema.__doc__
    fields = set(RESULTS_SCHEMA["properties"]) | set(RESULTS_SCHEMA["$defs"]["unit"]["properties"])
    for section in ("versions", "model", "metric", "circuit", "scores"):
        fields |= set(RESULTS_SCHEMA["properties"][section].get("properties", {}))
    fields |= {"fpr", "tpr", "size", "source", "target", "weight"}
    missing = sorted(f for f in fields if f"``{f}``" not in doc)
    assert not missing, f"fields not documented in meanablate.report.schema: {missing}"


# -- atomic JSON -----------------------------------------------------------------------------
def test_write_json_atomic_round_trips_and_encodes_numpy(tmp_path):
    path = tmp_path / "results.json"
    results = example_results()
    results["extra"] = {"array": np.arange(3), "scalar": np.float32(0.5), "int": np.int64(7)}
    assert write_json_atomic(path, results) == path
    loaded = json.loads(path.read_text())
    assert loaded["extra"] == {"array": [0, 1, 2], "scalar": 0.5, "int": 7}
    assert loaded["units"] == results["units"]
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]


def test_write_json_atomic_keeps_the_old_file_when_encoding_fails_midway(tmp_path):
    path = tmp_path / "results.json"
    write_json_atomic(path, example_results())
    before = path.read_bytes()
    os.chmod(path, 0o640)
    # a long, valid prefix gets written to the temp file before json meets the bad object
    broken = {"units": [{"effect": float(i)} for i in range(5000)], "bad": object()}
    with pytest.raises(TypeError, match="not JSON serializable"):
        write_json_atomic(path, broken)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]  # no temp left
    write_json_atomic(path, {"ok": True})
    assert json.loads(path.read_text()) == {"ok": True}
    assert stat.S_IMODE(path.stat().st_mode) == 0o640  # permissions kept across replaces


def test_write_json_atomic_survives_an_interrupt(tmp_path, monkeypatch):
    path = tmp_path / "results.json"
    write_json_atomic(path, [1, 2, 3])

    class Interrupting:
        def tolist(self):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_json_atomic(path, {"a": list(range(1000)), "b": Interrupting()})
    assert json.loads(path.read_text()) == [1, 2, 3]
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]


# -- plots and the report --------------------------------------------------------------------
def test_roc_curve_matches_pairwise_auroc():
    rng = random.Random(3)
    for _ in range(20):
        n = rng.randint(2, 30)
        scores = [rng.choice([0.1, 0.2, 0.3, rng.random()]) for _ in range(n)]
        labels = [rng.random() < 0.4 for _ in range(n)]
        fpr, tpr, auc = roc_curve(scores, labels)
        pos = [s for s, y in zip(scores, labels) if y]
        neg = [s for s, y in zip(scores, labels) if not y]
        if not pos or not neg:
            assert math.isnan(auc)
            continue
        pairs = list(itertools.product(pos, neg))
        expected = sum(1.0 if p > q else 0.5 if p == q else 0.0 for p, q in pairs) / len(pairs)
        assert auc == pytest.approx(expected)
        assert fpr[0] == tpr[0] == 0 and fpr[-1] == tpr[-1] == 1
        assert fpr == sorted(fpr) and tpr == sorted(tpr)


def _run_dir(tmp_path: Path, results: dict) -> Path:
    write_json_atomic(tmp_path / "results.json", results)
    return tmp_path


def test_write_report_writes_all_files(tmp_path):
    run_dir = _run_dir(tmp_path, example_results())
    page = write_report(run_dir)
    assert page == run_dir / "report.html"
    for name in ("effects.png", "faithfulness.png", "roc.png"):
        data = (run_dir / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 5000, name
    text = page.read_text(encoding="utf-8")
    assert text.startswith("<!DOCTYPE html>")
    # each plot is embedded, byte for byte
    for name in ("effects.png", "faithfulness.png", "roc.png"):
        encoded = base64.b64encode((run_dir / name).read_bytes()).decode()
        assert f"data:image/png;base64,{encoded}" in text, name
    leftovers = [p.name for p in run_dir.iterdir() if p.name.startswith(".")]
    assert not leftovers


def test_write_report_without_ground_truth_skips_roc(tmp_path):
    results = without_ground_truth(example_results())
    results["curve"] = None
    run_dir = _run_dir(tmp_path, results)
    (run_dir / "roc.png").write_bytes(b"stale")
    assert plot_roc(results, tmp_path / "other.png") is None
    assert not (tmp_path / "other.png").exists()
    write_report(run_dir)
    assert not (run_dir / "roc.png").exists()
    assert (run_dir / "faithfulness.png").read_bytes().startswith(PNG_MAGIC)
    text = (run_dir / "report.html").read_text(encoding="utf-8")
    assert "no ground truth" in text
    nodes = graph_nodes(parse(text))
    assert len(nodes) == len(results["units"])
    assert not any("ground-truth" in classes(n) for n in nodes)


def test_write_report_rejects_invalid_results_with_the_path(tmp_path):
    results = example_results()
    results["units"][4]["kind"] = "block"
    run_dir = _run_dir(tmp_path, results)
    with pytest.raises(ValueError, match=r"\$\.units\[4\]\.kind"):
        write_report(run_dir)
    assert not (run_dir / "report.html").exists()
    (run_dir / "results.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        write_report(run_dir)


@pytest.mark.parametrize("with_edges", [False, True], ids=["no-edges", "measured-edges"])
def test_html_draws_one_node_per_unit_and_highlights_the_circuit(with_edges):
    from meanablate.report.fmt import num

    results = example_results(with_edges=with_edges)
    doc = parse(render_html(results, {}))
    svgs = [a for tag, a, _ in doc.elements if tag == "svg" and a.get("id") == "circuit-graph"]
    assert len(svgs) == 1
    nodes = graph_nodes(doc)
    assert len(nodes) == len(results["units"])  # 15 units: fewer than the top-k drawn
    assert [n["data-name"] for n in nodes] == [u["name"] for u in results["units"]]
    kept = [n["data-name"] for n in nodes if "in-circuit" in classes(n)]
    assert kept == results["circuit"]["units"]
    truth = [n["data-name"] for n in nodes if "ground-truth" in classes(n)]
    assert truth == [u["name"] for u in results["units"] if u["in_ground_truth"]]
    # every unit's <title> (the hover text) names it and gives its effect and interval,
    # and calls attribution an estimate
    for i, unit in enumerate(results["units"]):
        title = doc.titles[f"u{i}"]
        assert unit["name"] in title
        assert f"effect: {num(unit['effect'], signed=True)}" in title
        assert f"[{num(unit['ci'][0])}, {num(unit['ci'][1])}]" in title
        assert f"attribution (estimate): {num(unit['attribution'], signed=True)}" in title
    ids = {a.get("id") for _, a, _ in doc.elements}
    assert {"n-input", "n-output"} <= ids
    edges = [a for tag, a, _ in doc.elements if "edge" in classes(a)]
    if with_edges:  # the measured edges, as given, and nothing else
        by_name = {u["name"]: f"u{i}" for i, u in enumerate(results["units"])}
        want = [
            (by_name.get(e["source"], "input"), by_name.get(e["target"], "output"))
            for e in results["edges"]
        ]
        assert [(e["data-source"], e["data-target"]) for e in edges] == want
        widths = [float(e["stroke-width"]) for e in edges]
        strongest = max(range(len(want)), key=lambda k: abs(results["edges"][k]["weight"]))
        assert widths[strongest] == max(widths)
    else:  # nothing was measured between units: no arrows at all, and the page says so
        assert edges == []
        assert "Connections between units were not measured" in doc.text


def test_html_is_self_contained():
    run_images = {"effects": PNG_MAGIC + b"fake"}
    text = render_html(example_results(), run_images)
    doc = parse(text)
    assert not re.search(r"https?://", text)
    for tag, attrs, _ in doc.elements:
        for attr in ("src", "href"):
            value = attrs.get(attr)
            if value is not None:
                assert value.startswith(("data:", "#")), (tag, attr, value)
        assert tag != "script" or "src" not in attrs
    assert "Content-Security-Policy" in text
    assert f"data:image/png;base64,{base64.b64encode(PNG_MAGIC + b'fake').decode()}" in text


def test_html_escapes_every_string():
    results = example_results()
    evil = '<script>alert("x")</script>&'
    results["model"]["name"] = evil
    results["model"]["class"] = evil
    results["metric"]["name"] = evil
    results["title"] = evil
    results["notes"] = evil
    results["config"] = {"k": evil}
    results["timings"] = {evil: 1.0}
    results["versions"]["torch"] = evil
    old = results["units"][1]["name"]
    new = 'blocks.0.attn.hook_z[heads=1]"><script>alert(1)</script>'
    results["units"][1]["name"] = new
    results["circuit"]["units"] = [new if n == old else n for n in results["circuit"]["units"]]
    results["scores"]["minimality"][new] = results["scores"]["minimality"].pop(old)
    validate_results(results)
    text = render_html(results, {})
    assert "<script>alert" not in text
    assert text.count("<script>") == 1  # ours
    doc = parse(text)
    nodes = graph_nodes(doc)
    assert len(nodes) == len(results["units"])
    assert nodes[1]["data-name"] == new  # round-trips through escaping


def test_matplotlib_is_imported_lazily():
    code = (
        "import sys; from meanablate.report import example_results, validate_results; "
        "from meanablate.report.html import render_html; "
        "r = example_results(); validate_results(r); render_html(r, {}); "
        "print('matplotlib' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_html_shows_the_certificate_and_every_score_note():
    """The circuit's certificate (tile and sentence) and the notes on scores outside [0, 1]
    (results.json ``scores.notes``, ``circuit.notes``) are on the page, each note once."""
    results = example_results()
    circuit, scores = results["circuit"], results["scores"]
    circuit["certificate"] = "1-minimal"
    circuit["certificate_text"] = "1-minimal: removing any one kept unit falls below 0.95"
    faith_note = "faithfulness 1.2 > 1: the circuit alone scores better than the full model"
    comp_note = "completeness 1.3 > 1: ablating only the circuit hurts more than everything"
    circuit["notes"] = [faith_note]
    scores["notes"] = [faith_note, comp_note]
    validate_results(results)
    text = parse(render_html(results, {})).text
    assert "1-minimal: removing any one kept unit falls below 0.95" in text
    assert text.count(faith_note) == 1 and text.count(comp_note) == 1
    tiles = re.findall(r"certificate\s*1-minimal", text)
    assert tiles, "no certificate tile"
    # without notes nothing is invented; without a certificate no tile or sentence
    del circuit["certificate"], circuit["certificate_text"], circuit["notes"]
    scores["notes"] = []
    text = parse(render_html(results, {})).text
    assert "1-minimal" not in text and faith_note not in text and comp_note not in text
