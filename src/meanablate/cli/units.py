"""Units as the options name them: site strings, granularities (``heads``, ``neurons:1``,
...) or ``@FILE`` (one site a line), resolved against the model (:func:`resolve_units`)."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from torch import nn

from meanablate.cli.errors import one_line
from meanablate.cli.hf import hf_units
from meanablate.config import InputError

__all__ = ["GRANULARITIES", "resolve_units", "site_str"]

GRANULARITIES = ("heads", "mlps", "components", "neurons", "layers", "positions")
_GRAN_RE = re.compile(rf"^({'|'.join(GRANULARITIES)})(?::(\d+(?:,\d+)*))?$")


def site_str(text: str, where: str) -> str:
    from meanablate.sites import parse_site

    try:
        return str(parse_site(text))
    except (ValueError, TypeError) as exc:
        raise InputError(f"{where}: {one_line(exc)}") from None


def resolve_units(model: nn.Module, specs: Sequence[str], batch: Any, *, where: str) -> list[str]:
    """Site strings from ``specs`` (sites, granularities like ``heads``/``neurons:1``, @FILE)."""
    from meanablate.discovery import transformer_units

    out: list[str] = []
    origin: dict[str, str] = {}  # unit -> where the user wrote it (the flag, or file and line)
    for spec in specs:
        spec = spec.strip()
        if spec.startswith("@"):
            path = Path(spec[1:])
            if not path.is_file():
                raise InputError(f"{where}: units file {path}: no such file")
            try:
                text = path.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                raise InputError(f"{where}: units file {path}: {one_line(exc)}") from None
            for i, line in enumerate(text.splitlines(), start=1):
                if line.strip() and not line.lstrip().startswith("#"):
                    unit = site_str(line.strip(), f"{path}, line {i}")
                    origin.setdefault(unit, f"{path}, line {i}")
                    out.append(unit)
            continue
        m = _GRAN_RE.match(spec)
        if not m:
            out.append(site_str(spec, where))
            continue
        gran, layers = m.group(1), m.group(2)
        chosen = [int(x) for x in layers.split(",")] if layers else None
        if getattr(getattr(model, "cfg", None), "n_heads", None) is not None:
            n_pos = None
            if gran == "positions":
                tokens = (
                    batch.get("tokens", batch.get("input_ids"))
                    if isinstance(batch, Mapping)
                    else batch
                )
                n_pos = int(tokens.shape[1])
            try:
                out += transformer_units(model, gran, layers=chosen, n_positions=n_pos)  # type: ignore[arg-type]
            except (ValueError, IndexError, TypeError) as exc:
                raise InputError(f"{where}: {spec!r}: {one_line(exc)}") from None
            continue
        units = hf_units(model, gran, chosen, batch) if isinstance(batch, Mapping) else None
        if units is None:
            raise InputError(
                f"{where}: granularity {spec!r} needs a model with a TransformerLens-style "
                f"cfg (or a GPT-2, BERT or Llama-style HF model); {type(model).__name__} has "
                "neither, so list its units as site strings"
            )
        out += units
    out = list(dict.fromkeys(out))
    if not out:
        raise InputError(f"{where}: no units")
    _check_fit(model, out, batch, lambda u: origin.get(u, where))
    return out


def _check_fit(model: nn.Module, units: list[str], batch: Any, origin: Any) -> None:
    """Every unit names a module of ``model`` and its selector fits the activation there:
    the family's layout (head counts from the config), then the real activation's shape."""
    from meanablate._validate import activation_shapes
    from meanablate.families import family_of
    from meanablate.sites import check_units_in_range, parse_site, resolve_module

    family = family_of(model)
    sites = []
    checked: set[str] = set()
    for unit in units:
        site = parse_site(unit)
        try:
            if site.module not in checked:
                resolve_module(model, site.module)
                checked.add(site.module)
            sites.append(family.check_site(site))
        except (IndexError, ValueError, TypeError) as exc:
            msg = one_line(exc).removeprefix(f"site {site}: ")
            raise InputError(f"{origin(unit)}: unit {unit!r}: {msg}") from None
    shapes = activation_shapes(model, [s.key for s in sites], batch)
    for unit, site in zip(units, sites):
        if site.key not in shapes:
            continue
        try:
            check_units_in_range(site, shapes[site.key])
        except (IndexError, ValueError) as exc:
            msg = one_line(exc).removeprefix(f"site {site}: ")
            raise InputError(f"{origin(unit)}: unit {unit!r}: {msg}") from None
