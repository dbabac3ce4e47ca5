"""Reprs, HTML tables and DataFrames of every result type (the classes delegate here).

``Scores``, ``Circuit``, ``CircuitScores``, ``Effect``, ``Means``: each gets a text repr that
fits one screen, a ``_repr_html_`` table and a ``to_dataframe()`` (pandas, the ``pandas``
extra, imported only when asked for).
"""

from __future__ import annotations

from typing import Any

from meanablate.results.display import TOP, html_table, sig, top_units

__all__ = ["frame", "html", "text"]


def _pandas() -> Any:
    try:
        import pandas
    except ImportError:
        raise ImportError("to_dataframe() needs pandas: pip install 'meanablate[pandas]'") from None
    return pandas


def _unit_info(unit: str) -> tuple[int | None, str]:
    from meanablate.discovery.units import unit_kind, unit_layer

    try:
        return unit_layer(unit), unit_kind(unit)
    except Exception:  # a site of no known layout
        return None, "other"


# -- Scores ----------------------------------------------------------------------------------
def _scores_rows(s: Any) -> tuple[list[int], list[list[str]]]:
    values = s.values.tolist()
    idx = top_units(s.units, values)
    exact = s.exact.tolist()
    rows = [
        [s.units[i], sig(values[i], signed=True), "exact" if exact[i] else "estimate"] for i in idx
    ]
    return idx, rows


def _scores_text(s: Any) -> str:
    n_ex = s.per_example.shape[1] if s.per_example.ndim == 2 else 0
    kind = "exact" if bool(s.exact.all()) else ("estimates" if not bool(s.exact.any()) else "mixed")
    head = (
        f"Scores({s.method}, metric={s.metric}, {len(s.units)} units x {n_ex} examples, "
        f"{kind}, {s.seconds:.2f} s)"
    )
    _, rows = _scores_rows(s)
    lines = [head] + [f"  {r[1]:>10}  {r[0]}" for r in rows]
    if len(s.units) > TOP:
        lines.append(f"  ... {len(s.units) - TOP} more (by |value|; to_dataframe() has all)")
    return "\n".join(lines)


def _scores_html(s: Any) -> str:
    _, rows = _scores_rows(s)
    facts = [
        ("method", s.method),
        ("metric", s.metric),
        ("units", len(s.units)),
        ("examples", s.per_example.shape[1] if s.per_example.ndim == 2 else 0),
    ]
    return html_table("Scores", facts, ["unit", "value", ""], rows, max(0, len(s.units) - TOP))


def _scores_frame(s: Any) -> Any:
    pd = _pandas()
    info = [_unit_info(u) for u in s.units]
    values = s.values.tolist()
    rank = {u: r for r, u in enumerate(s.ranking(), start=1)}
    return pd.DataFrame(
        {
            "layer": [i[0] for i in info],
            "kind": [i[1] for i in info],
            "value": values,
            "abs_value": [abs(v) for v in values],
            "rank": [rank[u] for u in s.units],
            "exact": s.exact.tolist(),
        },
        index=pd.Index(s.units, name="unit"),
    )


# -- Circuit ---------------------------------------------------------------------------------
def _circuit_facts(c: Any) -> list[tuple[str, Any]]:
    facts: list[tuple[str, Any]] = [
        ("algorithm", c.algorithm),
        ("metric", c.metric),
        ("kept", f"{len(c.kept)} / {len(c.units)}"),
        ("faithfulness", sig(c.faithfulness)),
        (
            "full / circuit / empty",
            " / ".join(sig(x) for x in (c.metric_full, c.metric_circuit, c.metric_empty)),
        ),
    ]
    certificate = getattr(c, "certificate", None)
    if certificate is not None:
        facts.append(("certificate", certificate))
    if c.threshold is not None:
        facts.append(("threshold", sig(c.threshold)))
    return facts


def _circuit_rows(c: Any) -> list[list[str]]:
    kept = [u for u in c.units if u in set(c.kept)][:TOP]
    return [[u, sig(c.scores.get(u), signed=True)] for u in kept]


def _circuit_text(c: Any) -> str:
    facts = ", ".join(f"{k}={v}" for k, v in _circuit_facts(c))
    lines = [f"Circuit({facts})"]
    lines += [f"  {r[1]:>10}  {r[0]}" for r in _circuit_rows(c)]
    if len(c.kept) > TOP:
        lines.append(f"  ... {len(c.kept) - TOP} more kept units")
    return "\n".join(lines)


def _circuit_html(c: Any) -> str:
    return html_table(
        "Circuit",
        _circuit_facts(c),
        ["kept unit", "score"],
        _circuit_rows(c),
        max(0, len(c.kept) - TOP),
    )


def _circuit_frame(c: Any) -> Any:
    pd = _pandas()
    kept = set(c.kept)
    info = [_unit_info(u) for u in c.units]
    effect = c.unit_scores.as_dict() if c.unit_scores is not None else {}
    data: dict[str, Any] = {
        "layer": [i[0] for i in info],
        "kind": [i[1] for i in info],
        "kept": [u in kept for u in c.units],
        "score": [c.scores.get(u) for u in c.units],
    }
    if effect:
        data["effect"] = [effect.get(u) for u in c.units]
    return pd.DataFrame(data, index=pd.Index(c.units, name="unit"))


# -- CircuitScores ---------------------------------------------------------------------------
def _cs_facts(cs: Any) -> list[tuple[str, str]]:
    lo, hi = cs.faithfulness_ci
    return [
        ("faithfulness", f"{sig(cs.faithfulness)} [{sig(lo)}, {sig(hi)}]"),
        ("completeness", sig(cs.completeness)),
        ("metric full", sig(cs.metric_full)),
        ("metric circuit", sig(cs.metric_circuit)),
        ("metric empty", sig(cs.metric_empty)),
        ("metric without circuit", sig(cs.metric_without_circuit)),
    ]


def _cs_text(cs: Any) -> str:
    lines = ["CircuitScores(" + ", ".join(f"{k}={v}" for k, v in _cs_facts(cs)) + ")"]
    mini = dict(cs.minimality)
    for u in list(mini)[:TOP]:
        lines.append(f"  minimality {sig(mini[u]):>8}  {u}")
    if len(mini) > TOP:
        lines.append(f"  ... {len(mini) - TOP} more")
    return "\n".join(lines)


def _cs_html(cs: Any) -> str:
    mini = dict(cs.minimality)
    rows = [[u, sig(v)] for u, v in list(mini.items())[:TOP]]
    return html_table(
        "CircuitScores", _cs_facts(cs), ["kept unit", "minimality"], rows, max(0, len(mini) - TOP)
    )


def _cs_frame(cs: Any) -> Any:
    pd = _pandas()
    return pd.DataFrame(
        {"minimality": pd.Series(dict(cs.minimality), dtype="float64")}
    ).rename_axis("unit")


# -- Effect ----------------------------------------------------------------------------------
def _effect_facts(e: Any) -> list[tuple[str, str]]:
    return [
        ("metric", e.metric),
        ("effect", f"{sig(e.value, signed=True)} [{sig(e.ci[0])}, {sig(e.ci[1])}]"),
        ("clean", sig(e.clean)),
        ("ablated", sig(e.ablated)),
        ("examples", str(int(e.per_example.numel()))),
    ]


def _effect_text(e: Any) -> str:
    return "Effect(" + ", ".join(f"{k}={v}" for k, v in _effect_facts(e)) + ")"


def _effect_html(e: Any) -> str:
    return html_table("Effect", _effect_facts(e), [], [])


def _effect_frame(e: Any) -> Any:
    pd = _pandas()
    values = e.per_example.double().reshape(-1).tolist()
    return pd.DataFrame({"effect": values}, index=pd.RangeIndex(len(values), name="example"))


# -- Means -----------------------------------------------------------------------------------
def _means_rows(m: Any) -> list[list[str]]:
    rows = []
    for k in m.keys():  # noqa: SIM118  (Means.keys is sorted)
        t = m.tensors[k]
        tokens = m.counts[k].max() if k in m.counts else None
        rows.append([k, str(list(t.shape)), sig(None if tokens is None else float(tokens))])
    return rows


def _means_text(m: Any) -> str:
    keys = m.keys()
    rows = _means_rows(m)
    head = f"Means({len(keys)} sites, per_position={m.per_position})"
    lines = [head] + [f"  {r[0]}  {r[1]}  tokens={r[2]}" for r in rows[:TOP]]
    if len(rows) > TOP:
        lines.append(f"  ... {len(rows) - TOP} more sites")
    return "\n".join(lines)


def _means_html(m: Any) -> str:
    rows = _means_rows(m)
    facts = [("sites", len(rows)), ("per position", m.per_position)]
    return html_table(
        "Means", facts, ["site", "shape", "tokens"], rows[:TOP], max(0, len(rows) - TOP)
    )


def _means_frame(m: Any) -> Any:
    pd = _pandas()
    keys = m.keys()
    return pd.DataFrame(
        {
            "shape": [tuple(m.tensors[k].shape) for k in keys],
            "tokens": [float(m.counts[k].max()) if k in m.counts else None for k in keys],
            "mean_abs": [float(m.tensors[k].abs().mean()) for k in keys],
        },
        index=pd.Index(keys, name="site"),
    )


_VIEWS = {
    "Scores": (_scores_text, _scores_html, _scores_frame),
    "Circuit": (_circuit_text, _circuit_html, _circuit_frame),
    "CircuitScores": (_cs_text, _cs_html, _cs_frame),
    "Effect": (_effect_text, _effect_html, _effect_frame),
    "Means": (_means_text, _means_html, _means_frame),
}


def _view(obj: Any, which: int) -> Any:
    for cls in type(obj).__mro__:
        if cls.__name__ in _VIEWS:
            return _VIEWS[cls.__name__][which](obj)
    raise TypeError(f"no view for {type(obj).__name__}")


def text(obj: Any) -> str:
    """The one-screen repr of a result."""
    return _view(obj, 0)


def html(obj: Any) -> str:
    """The ``_repr_html_`` table of a result."""
    return _view(obj, 1)


def frame(obj: Any) -> Any:
    """The pandas DataFrame of a result (one row per unit, site or example)."""
    return _view(obj, 2)
