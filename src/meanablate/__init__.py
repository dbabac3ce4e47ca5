"""meanablate: mean ablation and circuit discovery for PyTorch models.

The seed API works on lists, numpy arrays and tensors of any leading shape::

    >>> import meanablate as ma
    >>> ma.mean_ablation([[1.0, 2.0]], [0.5, 0.25], [1])
    [[1.0, 0.25]]
    >>> ma.compute_ablation_effect([1.0, 2.0], [1.0, 0.25])
    1.75

On models: name sites, compute dataset means, ablate inside a context manager::

    means = ma.compute_means(model, ["blocks.0.mlp.hook_post"], batches)
    with ma.ablate(model, "blocks.0.mlp.hook_post[neurons=3,7]", means):
        logits = model(tokens)
"""

# The public names below load lazily (PEP 562): `import meanablate` and the command line's
# `--help` do not import torch. Type checkers and `dir()` still see every name.
import importlib as _importlib
from typing import TYPE_CHECKING as _TYPE_CHECKING

if _TYPE_CHECKING:
    from meanablate import metrics, report
    from meanablate.core import compute_ablation_effect, mean_ablation, replace_where
    from meanablate.data import as_batches, prompt_batches
    from meanablate.discovery import (
        Circuit,
        Scores,
        Source,
        attribute,
        discover,
        discover_edges,
        eap,
        eap_ig,
        edge_sweep,
        path_patching,
        run_edges,
        score_circuit,
        sweep,
        transformer_units,
    )
    from meanablate.estimates import Estimate, estimate
    from meanablate.hooks import capture, run_model
    from meanablate.intervene import Effect, ablate, ablation_effect, bootstrap_ci, run_ablated
    from meanablate.sites import Site, parse_site
    from meanablate.stats import MeanAccumulator, Means, compute_means
    from meanablate.torch_threads import set_threads, threads

__version__ = "0.1.0"

__all__ = [
    "Circuit",
    "Effect",
    "Estimate",
    "MeanAccumulator",
    "Means",
    "Scores",
    "Site",
    "Source",
    "__version__",
    "ablate",
    "ablation_effect",
    "as_batches",
    "attribute",
    "bootstrap_ci",
    "capture",
    "compute_ablation_effect",
    "compute_means",
    "discover",
    "discover_edges",
    "eap",
    "eap_ig",
    "edge_sweep",
    "estimate",
    "mean_ablation",
    "metrics",
    "parse_site",
    "path_patching",
    "prompt_batches",
    "replace_where",
    "report",
    "run_ablated",
    "run_edges",
    "run_model",
    "score_circuit",
    "set_threads",
    "sweep",
    "threads",
    "transformer_units",
]


def _where() -> dict[str, str]:
    """name -> the module it comes from, read off this file's imports (one source of truth:
    a name added to the ``TYPE_CHECKING`` block above is public and lazy at once)."""
    import ast
    from pathlib import Path

    tree = ast.parse(Path(__file__).read_text(encoding="utf-8"))
    where = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("meanablate"):
            for alias in node.names:
                where[alias.asname or alias.name] = (
                    f"{node.module}.{alias.name}" if node.module == "meanablate" else node.module
                )
    return where


_WHERE: dict[str, str] = {}


def __getattr__(name: str) -> object:
    """Load a public name (or a submodule: ``meanablate.organisms``) on first use."""
    if not _WHERE:
        _WHERE.update(_where())
    where = _WHERE.get(name)
    if where is None:
        if name.startswith("_"):
            raise AttributeError(f"module 'meanablate' has no attribute {name!r}")
        try:
            value = _importlib.import_module(f"meanablate.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"meanablate.{name}":
                raise
            raise AttributeError(f"module 'meanablate' has no attribute {name!r}") from None
    else:
        module = _importlib.import_module(where)
        value = module if where == f"meanablate.{name}" else getattr(module, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
