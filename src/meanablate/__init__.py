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

from meanablate import metrics
from meanablate.core import compute_ablation_effect, mean_ablation, replace_where
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
from meanablate.hooks import capture, run_model
from meanablate.intervene import Effect, ablate, ablation_effect, bootstrap_ci, run_ablated
from meanablate.sites import Site, parse_site
from meanablate.stats import MeanAccumulator, Means, compute_means

__version__ = "0.1.0"

__all__ = [
    "Circuit",
    "Effect",
    "MeanAccumulator",
    "Means",
    "Scores",
    "Site",
    "Source",
    "__version__",
    "ablate",
    "ablation_effect",
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
    "mean_ablation",
    "metrics",
    "parse_site",
    "path_patching",
    "replace_where",
    "run_ablated",
    "run_edges",
    "run_model",
    "score_circuit",
    "sweep",
    "transformer_units",
]
