"""report.html in a real headless browser (Debian's chromium at /usr/bin/chromium).

Driven with the ``playwright`` package (its own browser downloads are not used: it launches
the system chromium). A second test uses chromium's own ``--dump-dom`` / ``--screenshot``
command line, which needs no Python package. Both skip only when /usr/bin/chromium is absent.
"""

from __future__ import annotations

import copy
import re
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from meanablate.report import example_results, write_json_atomic, write_report
from meanablate.report.fmt import num

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(
        not CHROMIUM.exists(),
        reason=f"no headless browser: {CHROMIUM} is absent (apt-get install -y chromium)",
    ),
]


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data.startswith(PNG_MAGIC), f"{path} is not a PNG"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def no_ground_truth() -> dict:
    results = copy.deepcopy(example_results(with_edges=True))
    for unit in results["units"]:
        unit["in_ground_truth"] = None
    results["scores"].update(auroc=None, roc=None)
    results["curve"] = None
    return results


VARIANTS = {"example": example_results, "edges-no-truth": no_ground_truth}


def make_report(tmp_path: Path, results: dict) -> Path:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    write_json_atomic(run_dir / "results.json", results)
    return write_report(run_dir)


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip(
        "playwright.sync_api", reason="the playwright package is not installed"
    )
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True, timeout=30_000
        )
        yield browser
        browser.close()


@pytest.mark.parametrize("variant", VARIANTS)
def test_report_in_headless_chromium(browser, tmp_path, variant):
    results = VARIANTS[variant]()
    page_path = make_report(tmp_path, results)
    units = results["units"]

    page = browser.new_page(viewport={"width": 1280, "height": 900})
    errors: list[str] = []
    outside: list[str] = []
    page.on("console", lambda m: errors.append(f"console: {m.text}") if m.type == "error" else None)
    page.on("pageerror", lambda exc: errors.append(f"page error: {exc}"))
    page.on(
        "request",
        lambda r: None if r.url.startswith(("file:", "data:")) else outside.append(r.url),
    )
    try:
        page.goto(page_path.resolve().as_uri(), wait_until="load")

        graph = page.locator("#circuit-graph")
        assert graph.is_visible()
        box = graph.bounding_box()
        assert box is not None and box["width"] > 300 and box["height"] > 100
        assert page.locator("#circuit-graph .unit").count() == len(units)
        assert page.locator("#circuit-graph .unit.in-circuit").count() == len(
            results["circuit"]["units"]
        )
        for img in page.locator("img").all():  # every embedded plot decoded
            assert img.evaluate("el => el.complete && el.naturalWidth > 0")

        # hovering the strongest unit shows the tooltip with its name, effect and interval
        tooltip = page.locator("#tooltip")
        assert tooltip.is_hidden()
        strongest = max(range(len(units)), key=lambda i: abs(units[i]["effect"]))
        unit = units[strongest]
        page.locator(f"#u{strongest}").hover()
        tooltip.wait_for(state="visible", timeout=5_000)
        text = tooltip.inner_text()
        assert unit["name"] in text
        assert f"effect: {num(unit['effect'], signed=True)}" in text
        assert f"[{num(unit['ci'][0])}, {num(unit['ci'][1])}]" in text
        # its measured edges (if any) are highlighted while hovering; none are invented
        if results["edges"]:
            assert page.locator("#circuit-graph .edge.hl").count() >= 1
        else:
            assert page.locator("#circuit-graph .edge").count() == 0
        page.screenshot(path=str(tmp_path / "hover.png"))

        page.mouse.move(2, 2)
        tooltip.wait_for(state="hidden", timeout=5_000)

        # keyboard focus shows it too; another unit, another text
        page.focus("#u0")
        tooltip.wait_for(state="visible", timeout=5_000)
        assert units[0]["name"] in tooltip.inner_text()
        page.locator("#units-table th.sortable").first.click()  # the sort script runs cleanly

        shot = tmp_path / "report.png"
        page.screenshot(path=str(shot), full_page=True)
    finally:
        page.close()

    width, height = png_size(shot)
    assert shot.stat().st_size > 20_000
    assert width == 1280 and height > 900
    assert png_size(tmp_path / "hover.png") == (1280, 900)
    assert errors == []
    assert outside == []  # self-contained: nothing fetched from anywhere


def _chromium(*args: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(CHROMIUM), *CHROMIUM_ARGS, f"--user-data-dir={tmp_path / 'profile'}", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_report_with_chromium_command_line(tmp_path):
    """No Python browser driver: the DOM after scripts ran, and a screenshot."""
    results = example_results()
    page_path = make_report(tmp_path, results)
    url = page_path.resolve().as_uri()

    dom = _chromium("--dump-dom", url, tmp_path=tmp_path)
    assert dom.returncode == 0, dom.stderr[-2000:]
    html = dom.stdout
    assert 'id="circuit-graph"' in html
    node_classes = re.findall(r'<g class="(unit\b[^"]*)"', html)
    assert len(node_classes) == len(results["units"])
    kept = [c for c in node_classes if "in-circuit" in c.split()]
    assert len(kept) == len(results["circuit"]["units"])

    shot = tmp_path / "cli.png"
    run = _chromium(f"--screenshot={shot}", "--window-size=1280,1000", url, tmp_path=tmp_path)
    assert run.returncode == 0, run.stderr[-2000:]
    assert png_size(shot) == (1280, 1000)
    assert shot.stat().st_size > 20_000
    shutil.rmtree(tmp_path / "profile", ignore_errors=True)


@pytest.mark.parametrize("size", [(1280, 900), (390, 844)], ids=["desktop", "phone"])
def test_edge_report_in_headless_chromium(browser, tmp_path, size):
    """A real edge run's page (meanablate.report of discover_edges): the kept edges as
    arrows, each highlighted with its endpoint, and no horizontal overflow."""
    import torch

    import meanablate as ma
    from edge_reference import random_model
    from meanablate.discovery import EdgeData, discover_edges
    from meanablate.organisms.transformer import TransformerConfig

    torch.set_num_threads(1)
    cfg = TransformerConfig(
        n_layers=2, d_model=8, n_heads=2, d_head=4, d_vocab=7, n_ctx=6, d_mlp=12
    )
    model = random_model(cfg, 5)
    gen = torch.Generator().manual_seed(5)
    data = EdgeData(model, [{"tokens": torch.randint(0, 7, (4, 5), generator=gen)}], "mean")
    circuit = discover_edges(model, data, metric="kl", algorithm="sweep", target_faithfulness=0.9)
    page_path = ma.report(tmp_path / "run", circuit, edge_data=data, n_boot=20, name="tiny")
    w, h = size
    page = browser.new_page(viewport={"width": w, "height": h})
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    try:
        page.goto(page_path.resolve().as_uri(), wait_until="load")
        overflow = page.evaluate("() => document.documentElement.scrollWidth - window.innerWidth")
        assert overflow <= 0, f"{overflow}px horizontal overflow at {size}"
        arrows = page.locator("#circuit-graph .edge")
        assert arrows.count() == len(circuit.kept)
        src = arrows.first.get_attribute("data-source")
        if src != "input":
            page.locator(f"#{src}").hover()
            page.locator("#tooltip").wait_for(state="visible", timeout=5_000)
            assert page.locator("#circuit-graph .edge.hl").count() >= 1
        assert page.locator("#circuit-graph").bounding_box()["width"] <= w
        page.screenshot(path=str(tmp_path / f"edges-{w}.png"), full_page=True)
    finally:
        page.close()
    assert errors == []
