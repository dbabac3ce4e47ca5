"""The torch module behind a model argument: nnsight wrappers give the module they wrap.

A leaf module (imports nothing of meanablate), so that hooks, stats and every public
entry point can unwrap without an import cycle through :mod:`meanablate.families`.
"""

from __future__ import annotations

import sys

from torch import nn

__all__ = ["unwrap"]


def unwrap(model: object) -> nn.Module:
    """``model`` itself, or for an nnsight ``NNsight``/``LanguageModel``/any ``Envoy``
    the ``torch.nn.Module`` it wraps (``envoy._module``), found without importing nnsight.

    Meanablate then hooks the wrapped module directly, exactly as on the raw model;
    nnsight's own per-module controllers pass torch hooks through unchanged.

    >>> m = nn.Linear(2, 2)
    >>> unwrap(m) is m
    True
    """
    if isinstance(model, nn.Module):
        return model
    envoy = sys.modules.get("nnsight.intervention.envoy")
    if envoy is not None and isinstance(model, envoy.Envoy):
        inner = model.__dict__.get("_module")
        if isinstance(inner, nn.Module):
            return inner
    raise TypeError(
        f"expected a torch nn.Module (or an nnsight wrapper of one), got {type(model).__name__}"
    )
