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

from meanablate import metrics, report
from meanablate.core import compute_ablation_effect, mean_ablation, replace_where
from meanablate.data import as_batches, prompt_batches
from meanablate.discovery import (
    Circuit,
    Scores,
    attribute,
    discover,
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
    "estimate",
    "mean_ablation",
    "metrics",
    "parse_site",
    "prompt_batches",
    "replace_where",
    "report",
    "run_ablated",
    "run_model",
    "score_circuit",
    "set_threads",
    "sweep",
    "threads",
    "transformer_units",
]
