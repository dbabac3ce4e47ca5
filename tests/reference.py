"""Independent reference helpers for tests (deliberately not using meanablate's parser)."""

from __future__ import annotations

import re

_UNIT_RE = re.compile(r"^([^\[\]]+)(?:\[(.*)\])?$")


def parse_unit(unit: str) -> tuple[str, dict[str, list[int]]]:
    """``"blocks.0.attn.hook_z[heads=1;pos=2]"`` -> ``("blocks.0.attn.hook_z", {...})``."""
    module, sel = _UNIT_RE.match(unit).groups()  # type: ignore[union-attr]
    out: dict[str, list[int]] = {}
    for part in (sel or "").split(";"):
        if part:
            name, value = part.split("=")
            out[name] = [int(v) for v in value.split(",")]
    return module, out
