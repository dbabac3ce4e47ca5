"""Plots of a discovery run (matplotlib, drawn on the Agg canvas, imported lazily).

Each ``plot_*`` function takes a validated results dict (see :mod:`meanablate.report.schema`)
and an output path ``NAME.png``, writes the PNG and, beside it, ``NAME.svg`` and
``NAME.pdf`` (atomically each) and returns the PNG's path, or returns ``None`` (and writes
nothing) when there is nothing to plot. No pyplot state is touched, so the functions
are safe to call from scripts, notebooks and threads alike, whatever backend is active.
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from meanablate.report._io import write_bytes_atomic

__all__ = ["KIND_COLORS", "plot_effects", "plot_faithfulness", "plot_roc", "roc_curve"]

KIND_ORDER = ("head", "attn", "mlp", "neuron", "resid", "position", "other")
KIND_COLORS = {
    "head": "#1f6fb4",
    "attn": "#5b8fc7",
    "mlp": "#c0392b",
    "neuron": "#d9822b",
    "resid": "#6c757d",
    "position": "#7b4fa0",
    "other": "#444444",
}
CIRCUIT_COLOR = "#111111"
TRUTH_COLOR = "#f2b705"
_DPI = 110


# -- helpers ---------------------------------------------------------------------------------
def roc_curve(
    scores: Sequence[float], labels: Sequence[bool]
) -> tuple[list[float], list[float], float]:
    """ROC of ``scores`` (higher: more likely positive) against boolean ``labels``.

    Returns ``(fpr, tpr, auroc)``; tied scores move along the diagonal together, so the area
    counts ties as half. With no positive or no negative label the area is ``nan``.

    >>> roc_curve([0.9, 0.8, 0.1], [True, False, False])
    ([0.0, 0.0, 0.5, 1.0], [0.0, 1.0, 1.0, 1.0], 1.0)
    """
    pairs = sorted(zip(scores, labels), key=lambda p: -p[0])
    n_pos = sum(1 for _, y in pairs if y)
    n_neg = len(pairs) - n_pos
    if n_pos == 0 or n_neg == 0:
        return [0.0, 1.0], [0.0, 1.0], math.nan
    fpr, tpr = [0.0], [0.0]
    tp = fp = 0
    i = 0
    while i < len(pairs):
        j = i
        while j < len(pairs) and pairs[j][0] == pairs[i][0]:
            tp += bool(pairs[j][1])
            fp += not pairs[j][1]
            j += 1
        fpr.append(fp / n_neg)
        tpr.append(tp / n_pos)
        i = j
    auc = sum((fpr[k] - fpr[k - 1]) * (tpr[k] + tpr[k - 1]) / 2 for k in range(1, len(fpr)))
    return fpr, tpr, auc


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _figure(width: float, height: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=_DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


FORMATS = ("png", "svg", "pdf")


def _save(fig: Any, path: str | os.PathLike[str]) -> Path:
    """The PNG at ``path`` and the same figure as SVG and PDF beside it."""
    path = Path(path)
    for fmt in FORMATS:
        buf = io.BytesIO()
        meta = {"Creator": None, "Producer": None, "CreationDate": None} if fmt == "pdf" else {}
        if fmt == "svg":
            meta = {"Date": None}
        if fmt == "png":
            meta = {"Software": None}
        fig.savefig(buf, format=fmt, dpi=_DPI, metadata=meta)
        write_bytes_atomic(path.with_suffix(f".{fmt}"), buf.getvalue())
    return path


def _finish(
    fig: Any, ax: Any, path: str | os.PathLike[str], labels: tuple[str, str], title: str
) -> Path:
    """Axis labels, a grid, the legend (lower right) and the title; then save the figure."""
    ax.set_xlabel(labels[0])
    ax.set_ylabel(labels[1])
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    ax.set_title(title, fontsize=11)
    return _save(fig, path)


def _title(results: Mapping[str, Any]) -> str:
    return f"{results['model']['name']} · {results['metric']['name']}"


def _row_label(kind: str, index: int | None, dup: int) -> str:
    short = {"position": "pos"}.get(kind, kind)
    label = short if index is None else f"{short} {index}"
    return f"{label} ({dup + 1})" if dup else label


def effect_grid(
    units: Sequence[Mapping[str, Any]], n_layers: int = 0
) -> tuple[list[int], list[tuple[str, int | None, int]], dict[tuple[int, int], int]]:
    """Lay units out on a (row, layer) grid: ``(layers, rows, {(row, col): unit position})``.

    Rows are grouped by kind (heads first, then whole attention layers, MLPs, neurons, ...) and
    sorted by index; two units with the same layer, kind and index get separate rows.
    """
    layer_values = [int(u["layer"]) for u in units]
    lo = min([0, *layer_values])
    hi = max([n_layers - 1, lo, *layer_values])
    layers = list(range(lo, hi + 1))
    seen: dict[tuple[int, str, int | None], int] = {}
    keys: list[tuple[str, int | None, int]] = []
    for unit in units:
        base = (int(unit["layer"]), unit["kind"], unit["index"])
        dup = seen.get(base, 0)
        seen[base] = dup + 1
        keys.append((unit["kind"], unit["index"], dup))

    def order(key: tuple[str, int | None, int]) -> tuple[int, int, int]:
        kind, index, dup = key
        rank = KIND_ORDER.index(kind) if kind in KIND_ORDER else len(KIND_ORDER)
        return rank, -1 if index is None else int(index), dup

    rows = sorted(set(keys), key=order)
    row_of = {key: r for r, key in enumerate(rows)}
    cells = {
        (row_of[key], int(unit["layer"]) - lo): i for i, (key, unit) in enumerate(zip(keys, units))
    }
    return layers, rows, cells


# -- the plots -------------------------------------------------------------------------------
def _scale(vmax: float) -> tuple[float, str]:
    """A power of ten for the cell labels when ``vmax`` is below 0.01 or 1000 and above (so
    ``1e-3`` effects read ``4.2`` on a ``×1e-3`` colour bar, not ``0.00``), and its name."""
    if not math.isfinite(vmax) or vmax <= 0:
        return 1.0, ""
    k = math.floor(math.log10(vmax))
    k = 0 if -2 <= k < 3 else k  # 0.01 .. 999 read fine with 2 significant digits
    return 10.0**k, ("" if k == 0 else f" (×1e{k})")


def plot_effects(results: Mapping[str, Any], path: str | os.PathLike[str]) -> Path:
    """Heat map of unit importance: layers on x, units (heads, MLPs, ...) on y.

    Importance is the effect oriented so that positive means "ablating the unit hurts the
    metric" (see :func:`meanablate.report.fmt.importance`), so one colour means important
    whatever the metric. The scale is symmetric around 0 (orange: needed; purple: ablating
    it helps; grey: no unit). Cells carry 2 significant digits on a common power of ten
    named in the colour bar. Kept units are outlined, ground-truth units carry a yellow mark;
    the legend lists only what the map shows.
    """
    import numpy as np
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch, Rectangle

    from meanablate.report.fmt import importance

    units = results["units"]
    hib = bool(results["metric"]["higher_is_better"])
    layers, rows, cells = effect_grid(units, int(results["model"]["n_layers"]))
    n_rows, n_cols = max(len(rows), 1), len(layers)
    grid = np.full((n_rows, n_cols), np.nan)
    for (r, c), i in cells.items():
        grid[r, c] = importance(units[i]["effect"], hib) if _finite(units[i]["effect"]) else np.nan

    dense = n_rows > 60
    width = min(14.0, max(5.5, 2.6 + 0.75 * n_cols))
    height = min(9.0, max(4.0, 0.012 * n_rows)) if dense else max(3.2, 1.7 + 0.32 * n_rows)
    fig = _figure(width, height)
    ax = fig.add_subplot()
    finite = grid[np.isfinite(grid)]
    vmax = float(np.max(np.abs(finite))) if finite.size else 1.0
    vmax = vmax or 1.0
    factor, factor_name = _scale(vmax)
    from matplotlib import colormaps

    cmap = colormaps["PuOr_r"].with_extremes(bad="#ececec")
    image = ax.imshow(
        np.ma.masked_invalid(grid),
        cmap=cmap,
        vmin=-vmax,
        vmax=vmax,
        aspect="auto",
        interpolation="nearest",
    )
    cbar = fig.colorbar(image, ax=ax, shrink=0.9, pad=0.02)
    cbar.set_label(f"importance{factor_name}")
    if factor != 1.0:
        from matplotlib.ticker import FuncFormatter

        cbar.ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v / factor:.3g}"))

    ax.set_xticks(range(n_cols), [f"L{layer}" for layer in layers])
    if n_cols > 16:
        for k, label in enumerate(ax.get_xticklabels()):
            label.set_visible(k % math.ceil(n_cols / 16) == 0)
    ax.set_xlabel("layer")
    ax.set_ylabel("unit")
    if not dense:
        ax.set_yticks(range(len(rows)), [_row_label(*row) for row in rows])
        for tick, row in zip(ax.get_yticklabels(), rows):
            tick.set_color(KIND_COLORS.get(row[0], "#444444"))
            tick.set_fontweight("bold")
    else:  # one label per kind, at the middle of its rows, skipping labels that would collide
        ticks: list[float] = []
        labels: list[str] = []
        starts = [r for r, row in enumerate(rows) if r == 0 or rows[r - 1][0] != row[0]]
        for start, end in zip(starts, [*starts[1:], len(rows)]):
            middle = (start + end - 1) / 2
            if ticks and middle - ticks[-1] < 0.03 * n_rows:
                continue
            ticks.append(middle)
            labels.append(f"{rows[start][0]} ({end - start})")
        ax.set_yticks(ticks, labels)
        for tick, label in zip(ax.get_yticklabels(), labels):
            tick.set_color(KIND_COLORS.get(label.split()[0], "#444444"))
            tick.set_fontweight("bold")
    ax.tick_params(length=0)
    for r in range(1, len(rows)):
        if rows[r][0] != rows[r - 1][0]:
            ax.axhline(r - 0.5, color="#333333", lw=1.2)
    for c in range(1, n_cols):
        ax.axvline(c - 0.5, color="white", lw=1.0 if n_cols > 8 else 1.5)

    annotate = not dense and n_rows * n_cols <= 400
    fontsize = 8 if n_cols <= 8 else 6.5
    any_kept = any_truth = False
    for (r, c), i in cells.items():
        unit = units[i]
        if unit["in_circuit"]:
            any_kept = True
            ax.add_patch(
                Rectangle(
                    (c - 0.5, r - 0.5), 1, 1, fill=False, ec=CIRCUIT_COLOR,
                    lw=1.2 if dense else 2.2, zorder=3,
                )
            )  # fmt: skip
        if unit["in_ground_truth"]:
            any_truth = True
            ax.plot(
                c + 0.36, r - 0.3, marker="v", ms=4 if dense else 6, color=TRUTH_COLOR,
                mec="#333333", mew=0.6, zorder=4,
            )  # fmt: skip
        value = grid[r, c]
        if annotate and math.isfinite(value):
            rgba = cmap((value + vmax) / (2 * vmax))
            lum = 0.2126 * rgba[0] + 0.7152 * rgba[1] + 0.0722 * rgba[2]
            scaled = value / factor
            ax.text(
                c, r, "0" if scaled == 0 else f"{scaled:.2g}", ha="center", va="center",
                fontsize=fontsize, color="white" if lum < 0.45 else "#222222", zorder=5,
            )  # fmt: skip
    ax.set_xlim(-0.5, n_cols - 0.5)
    ax.set_ylim(n_rows - 0.5, -0.5)
    handles = []
    if any_kept:
        handles.append(Patch(fill=False, ec=CIRCUIT_COLOR, lw=2, label="in circuit"))
    if any_truth:
        handles.append(
            Line2D([], [], ls="", marker="v", color=TRUTH_COLOR, mec="#333", label="ground truth")
        )
    if np.isnan(grid).any():
        handles.append(Patch(fc="#ececec", label="no unit"))
    if handles:
        fig.legend(
            handles=handles, loc="outside lower center", ncol=len(handles), frameon=False,
            fontsize=8,
        )  # fmt: skip
    sense = "−effect" if hib else "effect"
    what = "Unit importance"
    if results.get("effect_source") == "attribution":
        what, sense = "Estimated importance", f"attribution of the {sense}"
    ax.set_title(
        f"{what} ({sense} on {results['metric']['name']}) — {results['model']['name']}",
        fontsize=10,
        wrap=True,
    )
    return _save(fig, path)


def plot_faithfulness(results: Mapping[str, Any], path: str | os.PathLike[str]) -> Path:
    """Faithfulness against circuit size (``curve``), with the chosen circuit marked.

    Without a curve only the chosen circuit (with its interval) and the references are drawn.
    """
    fig = _figure(6.0, 3.8)
    ax = fig.add_subplot()
    curve = results.get("curve")
    n_units = len(results["units"])
    size = len(results["circuit"]["units"])
    word = "units"
    edges = results.get("edges") or []
    if any("in_circuit" in e for e in edges):  # an edge run: its curve counts edges
        word = "edges"
        size = sum(1 for e in edges if e.get("in_circuit", True))
        n_units = len(edges) + (results.get("edges_left_out") or 0)
    faith = results["scores"]["faithfulness"]
    ci = results["scores"]["faithfulness_ci"]
    xmax = max(n_units, size, 1)
    if curve and curve["size"]:
        xmax = max(xmax, *curve["size"])
        ax.plot(
            curve["size"],
            curve["faithfulness"],
            marker="o",
            ms=3.5,
            lw=1.8,
            color=KIND_COLORS["head"],
            label="faithfulness",
            zorder=2,
        )
    ax.axhline(1.0, color="#2a9d8f", ls="--", lw=1, label="full model")
    ax.axhline(0.0, color="#888888", ls=":", lw=1, label="everything ablated")
    if _finite(faith):
        yerr = None
        if ci is not None and _finite(ci[0]) and _finite(ci[1]):
            yerr = [[max(faith - ci[0], 0.0)], [max(ci[1] - faith, 0.0)]]
        ax.errorbar(
            [size],
            [faith],
            yerr=yerr,
            fmt="*",
            ms=14,
            color="#e63946",
            mec="#222222",
            ecolor="#e63946",
            capsize=4,
            label=f"circuit ({size} {word}): {faith:.3f}",
            zorder=4,
        )
    ax.set_xlim(-0.3, xmax + 0.3)
    return _finish(
        fig, ax, path, (f"circuit size ({word} kept)", "faithfulness"),
        f"Faithfulness vs circuit size — {_title(results)}",
    )  # fmt: skip


def _roc_points(results: Mapping[str, Any]) -> tuple[list[float], list[float]] | None:
    roc = results["scores"]["roc"]
    if roc is not None and roc["fpr"]:
        return list(roc["fpr"]), list(roc["tpr"])
    labelled = [u for u in results["units"] if u["in_ground_truth"] is not None]
    if not labelled:
        return None
    fpr, tpr, _ = roc_curve(
        [abs(u["effect"]) if _finite(u["effect"]) else 0.0 for u in labelled],
        [bool(u["in_ground_truth"]) for u in labelled],
    )
    return fpr, tpr


def plot_roc(results: Mapping[str, Any], path: str | os.PathLike[str]) -> Path | None:
    """ROC of the unit scores against the ground truth; ``None`` (no file) if ``auroc`` is null.

    Uses ``scores.roc`` when given, otherwise ranks the labelled units by ``|effect|``. The
    discovered circuit is marked as an operating point.
    """
    auroc = results["scores"]["auroc"]
    if auroc is None:
        return None
    fig = _figure(4.6, 4.4)
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], color="#999999", ls=":", lw=1, label="chance")
    points = _roc_points(results)
    if points is not None:
        ax.plot(
            *points,
            drawstyle="default",
            color=KIND_COLORS["head"],
            lw=2,
            label=f"unit scores (AUROC {auroc:.3f})",
        )
        ax.fill_between(points[0], points[1], alpha=0.08, color=KIND_COLORS["head"])
    labelled = [u for u in results["units"] if u["in_ground_truth"] is not None]
    n_pos = sum(1 for u in labelled if u["in_ground_truth"])
    n_neg = len(labelled) - n_pos
    if n_pos and n_neg:
        tp = sum(1 for u in labelled if u["in_ground_truth"] and u["in_circuit"])
        fp = sum(1 for u in labelled if not u["in_ground_truth"] and u["in_circuit"])
        ax.plot(
            fp / n_neg,
            tp / n_pos,
            marker="*",
            ms=14,
            color="#e63946",
            mec="#222222",
            ls="",
            label=f"circuit: TPR {tp / n_pos:.2f}, FPR {fp / n_neg:.2f}",
            zorder=4,
        )
    ax.set_xlim(-0.02, 1.02)
    ax.set_ylim(-0.02, 1.02)
    ax.set_aspect("equal")
    return _finish(
        fig, ax, path, ("false positive rate", "true positive rate"),
        f"ROC vs ground truth — {results['model']['name']}",
    )  # fmt: skip
