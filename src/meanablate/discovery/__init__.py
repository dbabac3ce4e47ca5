"""Circuit discovery: exact sweeps, attribution, pruning, and scores.

Every algorithm takes ``(model, batches, units, means, metric)``; sweeps and attribution
return :class:`Scores`, pruning returns a :class:`Circuit`.
"""

from meanablate.discovery.attribution import attribute
from meanablate.discovery.eap import eap, eap_ig
from meanablate.discovery.edge_prune import EDGE_ALGORITHMS, discover_edges
from meanablate.discovery.edge_sweep import edge_sweep
from meanablate.discovery.edge_truth import edge_ground_truth
from meanablate.discovery.edges import EdgeData, edge_mask, run_edges
from meanablate.discovery.evaluate import (
    CircuitScores,
    faithfulness,
    metric_per_example,
    score_circuit,
)
from meanablate.discovery.graph import Edge, Graph, build_graph
from meanablate.discovery.mib import (
    MIB_PERCENTAGES,
    edge_auroc,
    mib_curve,
    score_edge_circuit,
    to_mib_json,
)
from meanablate.discovery.path_patching import path_patching
from meanablate.discovery.prune import ALGORITHMS, Circuit, discover
from meanablate.discovery.scores import Scores, auroc, roc_curve, spearman
from meanablate.discovery.source import Source
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
    "EDGE_ALGORITHMS",
    "MIB_PERCENTAGES",
    "Circuit",
    "CircuitScores",
    "Edge",
    "EdgeData",
    "Graph",
    "Scores",
    "SetMetric",
    "Source",
    "attribute",
    "auroc",
    "build_graph",
    "discover",
    "discover_edges",
    "eap",
    "eap_ig",
    "edge_auroc",
    "edge_ground_truth",
    "edge_mask",
    "edge_sweep",
    "faithfulness",
    "metric_per_example",
    "mib_curve",
    "path_patching",
    "reverse_topological",
    "roc_curve",
    "run_edges",
    "score_circuit",
    "score_edge_circuit",
    "spearman",
    "sweep",
    "to_mib_json",
    "transformer_units",
    "unit_kind",
    "unit_layer",
]
