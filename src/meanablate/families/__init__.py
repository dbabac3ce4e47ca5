"""Model families: one description of each family's structure (see :mod:`.base`).

:func:`family_of` finds the family of a model (unwrapping an nnsight wrapper first);
families register in ``_REGISTRY`` in detection order, the generic one last.
:func:`check_sites` is what every entry point (``ablate``, ``compute_means``, ``sweep``,
``attribute``) runs on the sites it is given.

>>> import torch.nn as nn
>>> family_of(nn.Linear(2, 2)).name
'generic'
"""

from __future__ import annotations

from collections.abc import Iterable

from meanablate._unwrap import unwrap
from meanablate.families.base import Family, HeadLayout, LinearWrite, UnitInfo
from meanablate.sites import Site, as_sites

__all__ = [
    "Family",
    "HeadLayout",
    "LinearWrite",
    "UnitInfo",
    "check_sites",
    "family_of",
    "register",
    "unwrap",
]

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
    return Generic(module)


def check_sites(model: object, sites: Site | str | Iterable[Site | str]) -> list[Site]:
    """``sites`` checked against ``model``'s family, with what it knows filled in.

    Flat head activations get ``n_heads`` from the config; ``heads=`` on an activation
    without a head axis, or past the config's head count, raises naming the site and
    what to write instead.
    """
    family = family_of(model)
    return [family.check_site(s) for s in as_sites(sites)]


# Detection order: the registered families, then Generic. Importing a family module
# registers it. The bridge goes first: it reaches the HF modules it wraps by attribute,
# so an HF family would claim it too.
import meanablate.families.tl_bridge  # noqa: E402, F401
from meanablate.families import (  # noqa: E402, F401
    hf_bert,
    hf_gpt2,
    hf_llama,
    hf_neox,
    ours,
)
from meanablate.families.generic import Generic  # noqa: E402
