"""What a command prints on stdout: the summary of a discovery run and the top units of a
sweep or an attribution, as rich tables."""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["print_scores", "print_summary"]


def _fmt(x: float | None, digits: int = 3) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def print_summary(results: dict[str, Any], out: Path, seconds: float, gt: list[str] | None) -> None:
    """A discovery run: its circuit, the ground truth, the scores, the time and the report."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    scores, circuit = results["scores"], results["circuit"]
    kept = circuit["units"]
    n_units = len(results["units"])
    table = Table(
        title=f"meanablate {results['command']}: {results['model']['name']}",
        show_header=False,
        title_justify="left",
    )
    table.add_column(style="bold")
    table.add_column(overflow="fold")
    what = circuit["algorithm"]
    if circuit.get("abs_threshold") is not None and circuit["algorithm"] == "acdc":
        what += f", threshold {circuit['threshold']:g} (= {circuit['abs_threshold']:.3g} abs)"
    elif circuit["threshold"] is not None:
        what += f", threshold {circuit['threshold']:g}"
    if circuit.get("mean_kind"):
        what += f", {circuit['mean_kind']} means"
    table.add_row("circuit", f"{len(kept)} of {n_units} units ({what})")
    shown = kept[:12] + (
        [f"... and {len(kept) - 12} more (results.json)"] if len(kept) > 12 else []
    )
    table.add_row("", escape("\n".join(shown)) if kept else "(empty)")
    if circuit.get("certificate_text"):
        table.add_row("certificate", escape(circuit["certificate_text"]))
    if gt:
        found, extra = len(set(kept) & set(gt)), len(set(kept) - set(gt))
        match = (
            "exact match"
            if found == len(set(gt)) and not extra
            else f"circuit has {found} of them and {extra} other units"
        )
        table.add_row("ground truth", f"{len(gt)} units: {match}")
    ci = scores["faithfulness_ci"]
    faith = _fmt(scores["faithfulness"]) + (f"  95% CI [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")
    table.add_row("faithfulness", faith)
    table.add_row("completeness", _fmt(scores["completeness"]))
    for note in scores.get("notes") or []:
        table.add_row("note", escape(note))
    table.add_row("AUROC", _fmt(scores["auroc"]) if gt else "n/a (no ground truth)")
    metric = results["metric"]["name"]
    table.add_row(
        f"metric ({metric})",
        f"full {circuit['metric_full']:.4g}, circuit {circuit['metric_circuit']:.4g}, "
        f"empty {circuit['metric_empty']:.4g}",
    )
    from meanablate.report.fmt import seconds as fmt_seconds

    table.add_row("time", fmt_seconds(seconds))  # as the report shows the same number
    table.add_row("report", escape(str(out / "report.html")))
    Console(soft_wrap=False).print(table)


def print_scores(kind: str, scores: Any, cis: list[Any], path: Path) -> None:
    """The ten units of largest ``|effect|`` with their intervals, and where all are."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    estimate = not bool(scores.exact.all())
    value = "estimate" if estimate else "effect"
    title = f"{kind}: top units by |{value}| ({scores.metric})"
    if estimate:  # attribution approximates the effect; it is not an ablation
        title += " — estimates of the effect, not exact ablations"
    table = Table(title=title, title_justify="left")
    table.add_column("unit", overflow="fold")
    table.add_column(value, justify="right")
    table.add_column("95% CI", justify="right")
    ci_of = dict(zip(scores.units, cis))
    for u in scores.ranking()[:10]:
        ci = ci_of[u]
        table.add_row(
            escape(u),
            f"{float(scores.values[scores.units.index(u)]):+.4g}",
            f"[{ci[0]:+.3g}, {ci[1]:+.3g}]" if ci else "",
        )
    Console(soft_wrap=False).print(table)
    print(f"{len(scores.units)} units in {scores.seconds:.1f} s: {path}")
    print(f"report: {path.parent / 'report.html'}")
