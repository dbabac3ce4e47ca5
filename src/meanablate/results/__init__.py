"""Results you can keep and show: save / load as JSON, pandas DataFrames, notebook display,
and run folders written from Python (:func:`report`).

Every result type (:class:`~meanablate.Scores`, :class:`~meanablate.Circuit`,
:class:`~meanablate.discovery.CircuitScores`, :class:`~meanablate.Effect`,
:class:`~meanablate.Means`) has a one-screen ``repr``, a ``_repr_html_`` table for Jupyter
and ``to_dataframe()`` (pandas: the ``pandas`` extra). ``Scores`` and ``Circuit`` have
``save`` / ``load`` (JSON: the CLI's ``sweep.json`` and ``results.json`` formats).

Modules: :mod:`~meanablate.results.persist` (JSON), :mod:`~meanablate.results.build` (the
``results.json`` object), :mod:`~meanablate.results.views` (reprs, tables, DataFrames),
:mod:`~meanablate.results.api` (:func:`report`).
"""

from meanablate.results.api import report, write_run, write_scores_run
from meanablate.results.build import discovery_results, unit_cis
from meanablate.results.persist import (
    circuit_from_results,
    load_circuit,
    load_scores,
    save_circuit,
    save_scores,
    scores_from_dict,
    scores_to_dict,
)

__all__ = [
    "circuit_from_results",
    "discovery_results",
    "load_circuit",
    "load_scores",
    "report",
    "save_circuit",
    "save_scores",
    "scores_from_dict",
    "scores_to_dict",
    "unit_cis",
    "write_run",
    "write_scores_run",
]
