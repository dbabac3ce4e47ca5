"""Model families: one description of each family's structure (see :mod:`.base`).

:func:`family_of` finds the family of a model (unwrapping an nnsight wrapper first);
families register in ``_REGISTRY`` in detection order, the generic one last.
"""

from __future__ import annotations

from torch import nn

from meanablate.families.base import Family, HeadLayout, LinearWrite, UnitInfo

__all__ = ["Family", "HeadLayout", "LinearWrite", "UnitInfo", "family_of", "unwrap"]

_REGISTRY: list[type[Family]] = []


def register(cls: type[Family]) -> type[Family]:
    """Class decorator: add a family to the detection order (before the generic one)."""
    _REGISTRY.append(cls)
    return cls


def unwrap(model: object) -> nn.Module:
    """The torch module behind ``model``: an nnsight ``NNsight``/``LanguageModel``
    wrapper gives the module it wraps (without importing nnsight)."""
    inner = getattr(model, "_model", None)
    if not isinstance(model, nn.Module) and isinstance(inner, nn.Module):
        return inner
    if isinstance(model, nn.Module):
        return model
    raise TypeError(f"expected a torch nn.Module (or an nnsight wrapper), got {type(model).__name__}")


def family_of(model: object) -> Family:
    """The :class:`Family` describing ``model`` (generic when no family matches)."""
    module = unwrap(model)
    for cls in _REGISTRY:
        if cls.detect(module):
            return cls(module)
    return Family(module)
