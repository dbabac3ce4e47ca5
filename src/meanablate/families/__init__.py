"""Model families: one description of each family's structure (see :mod:`.base`).

:func:`family_of` finds the family of a model (unwrapping an nnsight wrapper first);
families register in ``_REGISTRY`` in detection order, the generic one last.
"""

from __future__ import annotations

from meanablate._unwrap import unwrap
from meanablate.families.base import Family, HeadLayout, LinearWrite, UnitInfo

__all__ = ["Family", "HeadLayout", "LinearWrite", "UnitInfo", "family_of", "unwrap"]

_REGISTRY: list[type[Family]] = []


def register(cls: type[Family]) -> type[Family]:
    """Class decorator: add a family to the detection order (before the generic one)."""
    _REGISTRY.append(cls)
    return cls


def family_of(model: object) -> Family:
    """The :class:`Family` describing ``model`` (generic when no family matches)."""
    module = unwrap(model)
    for cls in _REGISTRY:
        if cls.detect(module):
            return cls(module)
    return Family(module)


# Families register on import (after `register` exists: they import it from here).
from meanablate.families import tl_bridge as tl_bridge  # noqa: E402
