"""The torch module behind a model argument: nnsight wrappers give the module they wrap.

A leaf module (imports nothing of meanablate), so that hooks, stats and every public
entry point can unwrap without an import cycle through :mod:`meanablate.families`.
"""

from __future__ import annotations

from torch import nn

__all__ = ["unwrap"]


def unwrap(model: object) -> nn.Module:
    """``model`` itself, or for an nnsight wrapper (``NNsight``, ``LanguageModel``, any
    ``Envoy``) the ``torch.nn.Module`` it wraps, found without importing nnsight:
    ``envoy._module`` (nnsight >= 0.5), ``_model`` before that.

    Meanablate then hooks the wrapped module directly, exactly as on the raw model;
    nnsight's own per-module controllers pass torch hooks through unchanged. A
    ``torch.compile`` wrapper gives its eager module (``_orig_mod``): site names are the
    original model's, and the compiled graph, which would skip our hooks, is not run.

    >>> m = nn.Linear(2, 2)
    >>> unwrap(m) is m
    True
    """
    if isinstance(model, nn.Module):
        # torch.compile's wrapper runs a graph traced before our hooks existed (they would
        # silently never fire); its eager module computes the same and runs them.
        inner = vars(model).get("_modules", {}).get("_orig_mod")
        if type(model).__name__ == "OptimizedModule" and isinstance(inner, nn.Module):
            return unwrap(inner)
        return model
    if any(c.__module__.split(".")[0] == "nnsight" for c in type(model).__mro__):
        for attr in ("_module", "_model"):
            inner = vars(model).get(attr)
            if isinstance(inner, nn.Module):
                return inner
    raise TypeError(
        f"expected a torch nn.Module (or an nnsight wrapper of one), got {type(model).__name__}"
    )
