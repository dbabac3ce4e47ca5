"""Reports that scale, in headless Chromium at two window sizes: GPT-2 small's layout
(12 x 12 heads + MLPs, effects ~1e-3) and 1024 neuron units; plus sweep and attribute pages.

Checks: no horizontal overflow, the number of units drawn (kept + top-k, the rest counted),
the page's size (the 1024-neuron page under 1 MB), measured-only arrows, and screenshots
saved in the test's temporary folder (their sizes are printed: ``pytest -s``).
"""

from __future__ import annotations

import random
import re
import struct
from pathlib import Path

import pytest

from meanablate.report import write_json_atomic, write_report, write_scores_report
from meanablate.report.graph import TOP_K
from meanablate.report.schema import validate_results

CHROMIUM = Path("/usr/bin/chromium")
SIZES = {"desktop": (1280, 900), "phone": (390, 844)}
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-sync"]


def synthetic(n_layers, heads, neurons, mlp, kept, seed=0, scale=1e-3, metric="logit_diff"):
    """A results.json object: ``kept`` planted strong units, the rest small noise."""
    rng = random.Random(seed)
    units = []
    for layer in range(n_layers):
        for h in range(heads):
            units.append((f"blocks.{layer}.attn.hook_z[heads={h}]", layer, "head", h))
        if mlp:
            units.append((f"blocks.{layer}.hook_mlp_out", layer, "mlp", None))
        for n in range(neurons):
            units.append((f"blocks.{layer}.mlp.hook_post[neurons={n}]", layer, "neuron", n))
    strong = set(rng.sample(range(len(units)), kept))
    rows = []
    for i, (name, layer, kind, index) in enumerate(units):
        effect = (rng.uniform(3, 9) if i in strong else rng.gauss(0, 0.4)) * scale
        effect = -effect if rng.random() < 0.8 else effect
        rows.append(
            {
                "name": name, "layer": layer, "kind": kind, "index": index,
                "effect": effect, "ci": [effect - scale * 0.3, effect + scale * 0.3],
                "attribution": effect * rng.uniform(0.6, 1.3), "in_circuit": i in strong,
                "in_ground_truth": None,
            }
        )  # fmt: skip
    results = {
        "schema_version": 1, "meanablate_version": "0.1.0",
        "versions": {"python": "3", "torch": "2", "numpy": "2"},
        "created": "2026-01-01T00:00:00+00:00", "seed": 0, "config": {},
        "model": {"name": "synthetic", "class": "x.Model", "n_layers": n_layers},
        "metric": {"name": metric, "higher_is_better": metric == "logit_diff"},
        "units": rows,
        "circuit": {"algorithm": "acdc", "threshold": 1e-3,
                    "units": [r["name"] for r in rows if r["in_circuit"]],
                    "metric_full": 3.1, "metric_circuit": 2.9, "metric_empty": 0.2},
        "scores": {"faithfulness": 0.93, "faithfulness_ci": [0.9, 0.95], "completeness": 0.8,
                   "minimality": None, "auroc": None, "roc": None},
        "curve": None, "edges": None, "timings": {"search": 1.0},
    }  # fmt: skip
    validate_results(results)
    return results


CASES = {
    "gpt2-small": dict(n_layers=12, heads=12, neurons=0, mlp=True, kept=14),
    "neurons-1024": dict(n_layers=2, heads=0, neurons=512, mlp=False, kept=40, scale=0.05),
}


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    return struct.unpack(">II", data[16:24])


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.exists():
        pytest.skip(f"no headless browser: {CHROMIUM} is absent")
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=str(CHROMIUM), args=ARGS, headless=True)
        yield b
        b.close()


def check_page(browser, page_path: Path, shots: Path, label: str) -> dict:
    """Open the page at both sizes; overflow, errors, screenshots. Returns what it measured."""
    measured = {}
    for size, (w, h) in SIZES.items():
        page = browser.new_page(viewport={"width": w, "height": h})
        errors: list[str] = []
        page.on("pageerror", lambda exc, errors=errors: errors.append(str(exc)))
        try:
            page.goto(page_path.resolve().as_uri(), wait_until="load")
            overflow = page.evaluate(
                "() => document.documentElement.scrollWidth - window.innerWidth"
            )
            assert overflow <= 0, f"{label} at {size}: {overflow}px horizontal overflow"
            wide = page.evaluate(
                """() => Array.from(document.querySelectorAll('main *'))
                     .filter(e => !e.closest('.table-wrap') && !e.closest('pre'))
                     .filter(e => e.getBoundingClientRect().right > window.innerWidth + 1)
                     .map(e => e.tagName + '.' + e.className).slice(0, 5)"""
            )
            assert wide == [], f"{label} at {size}: elements past the right edge: {wide}"
            measured[f"nodes_{size}"] = page.locator("#circuit-graph .unit").count()
            shot = shots / f"{label}-{size}.png"
            page.screenshot(path=str(shot), full_page=True)
            measured[f"shot_{size}"] = (png_size(shot), shot.stat().st_size)
            assert errors == []
        finally:
            page.close()
    return measured


@pytest.mark.browser
@pytest.mark.parametrize("case", CASES)
def test_large_reports_fit_the_window(browser, tmp_path, case):
    results = synthetic(**CASES[case])
    run = tmp_path / "run"
    run.mkdir()
    write_json_atomic(run / "results.json", results)
    page_path = write_report(run)
    size = page_path.stat().st_size
    m = check_page(browser, page_path, tmp_path, case)
    kept = len(results["circuit"]["units"])
    n = len(results["units"])
    assert m["nodes_desktop"] == m["nodes_phone"] == kept + min(TOP_K, n - kept)
    text = page_path.read_text()
    counted = sum(int(x) for x in re.findall(r'class="more"[^>]*>\+(\d+) more', text))
    assert counted == n - m["nodes_desktop"]  # every unit not drawn is counted
    assert 'class="edge"' not in text  # nothing measured between units: no arrows
    assert size < 1_000_000, f"{case}: report is {size} bytes"
    for name in ("effects.svg", "effects.pdf", "faithfulness.svg", "faithfulness.pdf"):
        assert (run / name).stat().st_size > 1000
    print(f"\n{case}: report.html {size} bytes; screenshots {m['shot_desktop']} {m['shot_phone']}")


@pytest.mark.browser
def test_gpt2_heat_map_has_significant_digits_and_one_colour_meaning(tmp_path):
    """Effects ~1e-3: cells show two significant digits on a power of ten, not 0.00."""
    pytest.importorskip("matplotlib")
    from meanablate.report.plots import plot_effects

    results = synthetic(**CASES["gpt2-small"])
    plot_effects(results, tmp_path / "effects.png")
    svg = (tmp_path / "effects.svg").read_text()
    assert "×1e-3" in svg or "1e-3" in svg.replace("\u00d7", "")
    assert "0.00<" not in svg


@pytest.mark.browser
def test_sweep_and_attribute_pages(browser, tmp_path):
    import torch

    import meanablate as ma

    units = [f"blocks.{b}.attn.hook_z[heads={h}]" for b in range(12) for h in range(12)]
    g = torch.Generator().manual_seed(0)
    per = torch.randn(len(units), 16, generator=g, dtype=torch.float64) * 1e-3
    sweep = ma.Scores(units, per.mean(1), per, "logit_diff", "sweep")
    noisy = per + torch.randn(per.shape, generator=g, dtype=torch.float64) * 3e-4
    attr = ma.Scores.from_examples(units, noisy, "logit_diff", "attribution", 0.1)
    page = ma.report(tmp_path / "a", sweep=sweep, attribution=attr, n_boot=0)
    text = page.read_text()
    assert "attribution (estimate)" in text and "exact effect" in text
    rho = ma.discovery.spearman(attr.values, sweep.values)
    assert f"{rho:.3f}" in text  # the rank correlation shown is the real one
    check_page(browser, page, tmp_path, "attribute")
    page = ma.report(tmp_path / "s", sweep=sweep, n_boot=0)
    assert write_scores_report(tmp_path / "s") == page
    check_page(browser, page, tmp_path, "sweep")


@pytest.mark.browser
def test_gpt2_sized_edge_report_fits_and_caps_its_arrows(browser, tmp_path):
    """GPT-2 small's edge graph (32k edges): 150 kept edges, drawn at most MAX_ARROWS (the
    strongest), the rest stated; no horizontal overflow at either size."""
    from meanablate.discovery.graph import build_graph, node_unit
    from meanablate.report.graph import MAX_ARROWS
    from meanablate.results.edges import edge_records

    graph = build_graph(12, 12, True)
    rng = random.Random(3)
    scores = {n: rng.gauss(0, 1e-4) for n in graph.names}
    kept = rng.sample(graph.names, 150)
    for n in kept:
        scores[n] = rng.uniform(2e-3, 9e-3) * rng.choice((1, -1))
    edges, left = edge_records(graph, scores, kept)
    results = synthetic(**CASES["gpt2-small"])
    touched = {node_unit(x) for n in kept for x in n.split("<")[0].split("->")} - {None}
    for u in results["units"]:
        u["in_circuit"] = u["name"] in touched
    results["circuit"]["units"] = [u["name"] for u in results["units"] if u["in_circuit"]]
    results["edges"], results["edges_left_out"] = edges, left
    validate_results(results)
    run = tmp_path / "run"
    run.mkdir()
    write_json_atomic(run / "results.json", results)
    page_path = write_report(run)
    check_page(browser, page_path, tmp_path, "gpt2-edges")
    text = page_path.read_text()
    assert text.count('class="edge"') == MAX_ARROWS
    assert f"The arrows are {MAX_ARROWS} of the circuit&#39;s 150 measured edges" in text
    assert f"{len(graph) - 150} measured edges outside the circuit are not drawn" in text
