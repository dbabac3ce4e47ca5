"""Circuit discovery: exact sweeps, attribution, pruning, and scores.

Every algorithm takes ``(model, batches, units, means, metric)``; sweeps and attribution
return :class:`Scores`, pruning returns a :class:`Circuit`.
"""

from meanablate.discovery.attribution import attribute
from meanablate.discovery.evaluate import (
    CircuitScores,
    faithfulness,
    metric_per_example,
    score_circuit,
)
from meanablate.discovery.prune import ALGORITHMS, Circuit, discover
from meanablate.discovery.scores import Scores, auroc, roc_curve, spearman
from meanablate.discovery.subsets import SetMetric
from meanablate.discovery.sweep import sweep
from meanablate.discovery.units import (
    reverse_topological,
    transformer_units,
    unit_kind,
    unit_layer,
)

__all__ = [
    "ALGORITHMS",
    "Circuit",
    "CircuitScores",
    "Scores",
    "SetMetric",
    "attribute",
    "auroc",
    "discover",
    "faithfulness",
    "metric_per_example",
    "reverse_topological",
    "roc_curve",
    "score_circuit",
    "spearman",
    "sweep",
    "transformer_units",
    "unit_kind",
    "unit_layer",
]
