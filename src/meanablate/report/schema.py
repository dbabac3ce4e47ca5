"""The documented format of ``results.json``, the file a discovery run leaves in its run folder.

:data:`RESULTS_SCHEMA` is the JSON Schema (draft 2020-12) of the file and
:func:`validate_results` checks an already-parsed object against it (plus a few cross-field
rules a schema cannot express), raising :class:`ValueError` that names the path of the first
problem, e.g. ``results.json is invalid at $.units[3].effect: expected a number, got 'abc'``.
The schema is checked by ``jsonschema`` (draft 2020-12); :func:`validate_results` adds the
cross-field rules and words each error as the JSON path of the problem and what was expected.

Numbers may be ints or floats everywhere a float is documented. Every object may carry extra
keys (they are kept and ignored), so writers can add fields without a schema bump; the fields
below are the contract. ``null`` is only allowed where documented.

Top level
---------
``schema_version`` (int, always ``1``)
    Version of this format; bumped on any incompatible change.
``meanablate_version`` (str)
    ``meanablate.__version__`` of the run.
``versions`` (object)
    The library versions of the run: ``python``, ``torch``, ``numpy`` (str each); extra keys
    (e.g. ``transformer_lens``) are welcome, as strings.
``created`` (str)
    When the run finished, ISO-8601 (``datetime.isoformat()``; a trailing ``Z`` is accepted),
    preferably with a UTC offset.
``seed`` (int)
    The random seed of the run (bootstrap, sampling).
``config`` (object)
    The exact configuration used, free-form; enough to rerun.
``model`` (object)
    ``name`` (str): the model or organism name; ``class`` (str): the Python class of the
    model; ``n_layers`` (int >= 0): the number of blocks.
``metric`` (object)
    ``name`` (str): e.g. ``"logit_diff"``; ``higher_is_better`` (bool).
``units`` (array of objects)
    Every candidate unit that was scored, one object each:

    ``name`` (str, unique)
        The site string of the unit, e.g. ``"blocks.0.attn.hook_z[heads=1]"`` or
        ``"blocks.1.hook_mlp_out"`` (see :mod:`meanablate.sites`).
    ``layer`` (int)
        The block the unit lives in (0-based).
    ``kind`` (str)
        One of ``"head"``, ``"mlp"``, ``"neuron"``, ``"attn"`` (a whole attention layer),
        ``"resid"``, ``"position"``, ``"other"``.
    ``index`` (int or null)
        The head / neuron / position index within the layer; ``null`` for whole-layer units
        such as an MLP output.
    ``effect`` (float)
        The unit's effect on the metric when it alone is mean-ablated (in metric units;
        signed).
    ``ci`` ([float, float] or null)
        Confidence interval ``[low, high]`` of ``effect`` (bootstrap), ``low <= high``;
        ``null`` if not computed.
    ``attribution`` (float or null)
        A cheap estimate of ``effect`` (e.g. attribution patching), if computed.
    ``in_circuit`` (bool)
        Whether the discovered circuit keeps the unit; must agree with ``circuit.units``.
    ``in_ground_truth`` (bool or null)
        Whether the unit belongs to the known ground-truth circuit; ``null`` when no ground
        truth is known.
``circuit`` (object)
    ``algorithm`` (str): how the circuit was found (e.g. ``"greedy"``, ``"threshold"``);
    ``threshold`` (float or null): its cut-off, if any; ``units`` (array of str, unique): the
    names of the kept units, each one the ``name`` of an entry of ``units``;
    ``metric_full`` / ``metric_circuit`` / ``metric_empty`` (float): the metric with nothing
    ablated, with everything outside the circuit ablated, and with everything ablated.
    Optional: ``certificate`` (``"exhaustive"``, ``"1-minimal"`` or ``"none"``: what is
    proven about the circuit's minimality) and ``certificate_text`` (that in words);
    ``abs_threshold`` (float or null): ACDC's threshold in the metric's units (``threshold``
    is then a fraction of ``|metric_full - metric_empty|``); ``mean_kind`` (str or null):
    ``per_position``, ``plain`` or ``plain_except``; ``behaviour`` (float): ``metric_full -
    metric_empty`` and ``behaviour_ci`` ([float, float] or null) its bootstrap interval.
``scores`` (object)
    ``faithfulness`` (float): usually ``(metric_circuit - metric_empty) / (metric_full -
    metric_empty)``, 1 is perfect; ``faithfulness_ci`` ([float, float] or null): its interval;
    ``completeness`` (float or null); ``notes`` (optional array of str): why a score outside
    [0, 1] is shown; ``minimality`` (object or null): per kept unit name, the
    loss of faithfulness when that unit is removed (keys must be unit names);
    ``auroc`` (float in [0, 1] or null): area under the ROC curve of the unit scores against
    the ground truth, ``null`` when no ground truth is known; ``roc`` (object or null): the
    ROC curve, ``fpr`` and ``tpr`` (arrays of floats in [0, 1], equal lengths).
``curve`` (object or null)
    Faithfulness against circuit size: ``size`` (array of int >= 0, numbers of units kept)
    and ``faithfulness`` (array of float), equal lengths.
``edges`` (array of objects or null)
    Optional explicit circuit graph, one object per arrow: ``source`` (str), ``target``
    (str), ``weight`` (float, signed; drawn as the arrow's width and colour). Endpoints are
    unit names; ``"input"`` and ``"output"`` (or any name that is not a unit) stand for the
    model's input (as a source) and output (as a target). ``null``: the report draws a default
    graph from the kept units. Optional per edge: ``name`` (str: the edge's name in the
    computational graph, e.g. ``"a0.h1->a1.h0<k>"``), ``input`` (``"q"``, ``"k"``, ``"v"`` or
    null: which input of a head it feeds), ``in_circuit`` (bool, default true: the report draws
    only these) and ``in_ground_truth`` (bool or null). From edge discovery ``weight`` is the
    measured score (the metric's change when the edge alone is ablated, or the algorithm's own
    score, named by ``effect_source``); the list holds every kept edge and the strongest
    others.
``edges_left_out`` (optional int >= 0 or null)
    How many measured edges ``edges`` does not list (the report states the number).
``timings`` (object)
    Wall-clock seconds per phase, ``{str: float >= 0}``, e.g. ``{"means": 1.2, "search": 3.4}``.

Cross-field rules checked by :func:`validate_results`: unit names are unique; every
``circuit.units`` entry names a unit and appears once; ``units[i].in_circuit`` is true exactly
for those; every ``ci`` (and ``faithfulness_ci``) has ``low <= high``; ``curve`` and ``roc``
arrays have equal lengths; ``minimality`` keys are unit names.

Optional fields (may be absent; ``null`` is the same as absent): ``title`` (str, a heading
for the report), ``notes`` (str, free text shown in the report), ``effect_source`` (str: what
``units[].effect`` holds: ``"sweep"``, exact single-unit ablations, the default;
``"attribution"``, an estimate; or a pruning algorithm's name, its own per-unit score) and
``circuit.record`` (object: the fields of the Python ``Circuit``, which
``meanablate.Circuit.load`` rebuilds it from, with ``timings.search`` as its run time) and
``unit_scores`` (object: the scores a score-based algorithm ranked by, in the
``sweep.json`` format of :data:`SCORES_SCHEMA`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from datetime import datetime
from functools import lru_cache
from typing import Any

__all__ = [
    "RESULTS_SCHEMA",
    "SCHEMA_VERSION",
    "SCORES_SCHEMA",
    "UNIT_KINDS",
    "validate_results",
    "validate_scores",
]

SCHEMA_VERSION = 1
UNIT_KINDS = ("head", "mlp", "neuron", "attn", "resid", "position", "other")

_NUM = {"type": "number"}
_NUM_OR_NULL = {"type": ["number", "null"]}
_INTERVAL = {"type": "array", "prefixItems": [_NUM, _NUM], "minItems": 2, "maxItems": 2}
_INTERVAL_OR_NULL = {"anyOf": [{"type": "null"}, _INTERVAL]}
_STR_OR_NULL = {"type": ["string", "null"]}

RESULTS_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "$id": "https://meanablate.invalid/schemas/results-v1.json",
    "title": "meanablate results.json",
    "description": "The results of one circuit discovery run (see meanablate.report.schema).",
    "type": "object",
    "required": [
        "schema_version",
        "meanablate_version",
        "versions",
        "created",
        "seed",
        "config",
        "model",
        "metric",
        "units",
        "circuit",
        "scores",
        "curve",
        "edges",
        "timings",
    ],
    "properties": {
        "schema_version": {"const": SCHEMA_VERSION},
        "meanablate_version": {"type": "string"},
        "versions": {
            "type": "object",
            "required": ["python", "torch", "numpy"],
            "properties": {
                "python": {"type": "string"},
                "torch": {"type": "string"},
                "numpy": {"type": "string"},
            },
            "additionalProperties": {"type": "string"},
        },
        "created": {"type": "string", "format": "date-time"},
        "seed": {"type": "integer"},
        "config": {"type": "object"},
        "model": {
            "type": "object",
            "required": ["name", "class", "n_layers"],
            "properties": {
                "name": {"type": "string"},
                "class": {"type": "string"},
                "n_layers": {"type": "integer", "minimum": 0},
            },
        },
        "metric": {
            "type": "object",
            "required": ["name", "higher_is_better"],
            "properties": {
                "name": {"type": "string"},
                "higher_is_better": {"type": "boolean"},
            },
        },
        "units": {"type": "array", "items": {"$ref": "#/$defs/unit"}},
        "circuit": {
            "type": "object",
            "required": [
                "algorithm",
                "threshold",
                "units",
                "metric_full",
                "metric_circuit",
                "metric_empty",
            ],
            "properties": {
                "algorithm": {"type": "string"},
                "threshold": _NUM_OR_NULL,
                "units": {"type": "array", "items": {"type": "string"}, "uniqueItems": True},
                "metric_full": _NUM,
                "metric_circuit": _NUM,
                "metric_empty": _NUM,
                # what is proven about the circuit (see meanablate.discovery.minimal)
                "certificate": {"enum": ["exhaustive", "1-minimal", "none"]},
                "certificate_text": {"type": "string"},
                "abs_threshold": _NUM_OR_NULL,
                "mean_kind": {"type": ["string", "null"]},
                "behaviour": _NUM,
                "behaviour_ci": {"type": ["array", "null"], "items": _NUM},
            },
        },
        "scores": {
            "type": "object",
            "required": [
                "faithfulness",
                "faithfulness_ci",
                "completeness",
                "minimality",
                "auroc",
                "roc",
            ],
            "properties": {
                "faithfulness": _NUM,
                "faithfulness_ci": _INTERVAL_OR_NULL,
                "completeness": _NUM_OR_NULL,
                # why a faithfulness / completeness / minimality outside [0, 1] is shown
                "notes": {"type": "array", "items": {"type": "string"}},
                "minimality": {
                    "type": ["object", "null"],
                    "additionalProperties": _NUM,
                },
                "auroc": {"type": ["number", "null"], "minimum": 0, "maximum": 1},
                "roc": {
                    "anyOf": [
                        {"type": "null"},
                        {
                            "type": "object",
                            "required": ["fpr", "tpr"],
                            "properties": {
                                "fpr": {"$ref": "#/$defs/rates"},
                                "tpr": {"$ref": "#/$defs/rates"},
                            },
                        },
                    ]
                },
            },
        },
        "curve": {
            "anyOf": [
                {"type": "null"},
                {
                    "type": "object",
                    "required": ["size", "faithfulness"],
                    "properties": {
                        "size": {"type": "array", "items": {"type": "integer", "minimum": 0}},
                        "faithfulness": {"type": "array", "items": _NUM},
                    },
                },
            ]
        },
        "edges": {
            "anyOf": [
                {"type": "null"},
                {"type": "array", "items": {"$ref": "#/$defs/edge"}},
            ]
        },
        "edges_left_out": {"type": ["integer", "null"], "minimum": 0},
        "timings": {
            "type": "object",
            "additionalProperties": {"type": "number", "minimum": 0},
        },
        "title": _STR_OR_NULL,
        "effect_source": _STR_OR_NULL,
        "notes": _STR_OR_NULL,
    },
    "$defs": {
        "unit": {
            "type": "object",
            "required": [
                "name",
                "layer",
                "kind",
                "index",
                "effect",
                "ci",
                "attribution",
                "in_circuit",
                "in_ground_truth",
            ],
            "properties": {
                "name": {"type": "string", "minLength": 1},
                "layer": {"type": "integer"},
                "kind": {"enum": list(UNIT_KINDS)},
                "index": {"type": ["integer", "null"]},
                "effect": _NUM,
                "ci": _INTERVAL_OR_NULL,
                "attribution": _NUM_OR_NULL,
                "in_circuit": {"type": "boolean"},
                "in_ground_truth": {"type": ["boolean", "null"]},
            },
        },
        "edge": {
            "type": "object",
            "required": ["source", "target", "weight"],
            "properties": {
                "source": {"type": "string"},
                "target": {"type": "string"},
                "weight": _NUM,
                "name": {"type": "string"},
                "input": {"enum": ["q", "k", "v", None]},
                "in_circuit": {"type": "boolean"},
                "in_ground_truth": {"type": ["boolean", "null"]},
            },
        },
        "rates": {"type": "array", "items": {"type": "number", "minimum": 0, "maximum": 1}},
    },
}


# -- a small validator for the subset of draft 2020-12 the schema above uses ----------------
_TYPE_NAMES = {
    "null": "null",
    "boolean": "a boolean",
    "string": "a string",
    "object": "an object",
    "array": "an array",
    "number": "a number",
    "integer": "an integer",
}


class _InvalidError(Exception):
    def __init__(self, path: str, message: str) -> None:
        super().__init__(path, message)
        self.path = path
        self.message = message


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _key(path: str, key: str) -> str:
    return f"{path}.{key}" if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key) else f"{path}[{key!r}]"


def _json_path(parts: Any) -> str:
    path = "$"
    for part in parts:
        path = f"{path}[{part}]" if isinstance(part, int) else _key(path, str(part))
    return path


@lru_cache(maxsize=4)
def _validator(schema_id: str) -> Any:
    import jsonschema

    schema = {RESULTS_SCHEMA["$id"]: RESULTS_SCHEMA, SCORES_SCHEMA["$id"]: SCORES_SCHEMA}[schema_id]
    formats = jsonschema.FormatChecker(formats=())

    @formats.checks("date-time", raises=ValueError)
    def _date_time(value: object) -> bool:  # ISO-8601 as datetime.fromisoformat reads it
        if isinstance(value, str):
            datetime.fromisoformat(re.sub(r"[zZ]$", "+00:00", value))
        return True

    return jsonschema.Draft202012Validator(schema, format_checker=formats)


def _message(error: Any) -> tuple[str, str]:
    """``(path, message)`` of a jsonschema error, in our words where they read better."""
    path = _json_path(error.absolute_path)
    value = error.instance
    kind = error.validator
    if kind == "type":
        types = error.validator_value
        types = types if isinstance(types, list) else [types]
        return path, f"expected {' or '.join(_TYPE_NAMES[t] for t in types)}, got {_show(value)}"
    if kind == "required":
        missing = next(k for k in error.validator_value if k not in value)
        return _key(path, missing), "required field is missing"
    if kind == "const":
        return path, f"expected {error.validator_value!r}, got {_show(value)}"
    if kind == "enum":
        options = ", ".join(repr(o) for o in error.validator_value)
        return path, f"expected one of {options}; got {_show(value)}"
    if kind == "uniqueItems":
        seen: list[Any] = []
        for i, item in enumerate(value):
            if item in seen:
                return f"{path}[{i}]", f"duplicate item {_show(item)}"
            seen.append(item)
    if kind == "format":
        return path, f"expected an ISO-8601 date-time, got {_show(value)}"
    return path, error.message


def _schema_check(obj: Any, schema: Mapping[str, Any]) -> None:
    """Raise :class:`_InvalidError` at the most relevant error jsonschema finds (if any)."""
    import jsonschema

    error = jsonschema.exceptions.best_match(_validator(schema["$id"]).iter_errors(obj))
    if error is None:
        return
    while error.context:  # anyOf: the option that got furthest (the non-null one, usually)
        error = max(error.context, key=lambda e: len(e.absolute_path))
    raise _InvalidError(*_message(error))


def _check_interval(ci: Any, path: str) -> None:
    if ci is not None and not (math.isnan(ci[0]) or math.isnan(ci[1])) and ci[0] > ci[1]:
        raise _InvalidError(path, f"interval low > high: {_show(list(ci))}")


def _check_semantics(obj: Mapping[str, Any]) -> None:
    names: dict[str, int] = {}
    for i, unit in enumerate(obj["units"]):
        if unit["name"] in names:
            raise _InvalidError(
                f"$.units[{i}].name",
                f"duplicate unit name {unit['name']!r} (also $.units[{names[unit['name']]}])",
            )
        names[unit["name"]] = i
        _check_interval(unit["ci"], f"$.units[{i}].ci")
    kept = obj["circuit"]["units"]
    for i, name in enumerate(kept):
        if name not in names:
            raise _InvalidError(f"$.circuit.units[{i}]", f"{name!r} is not the name of any unit")
    kept_set = set(kept)
    for i, unit in enumerate(obj["units"]):
        if unit["in_circuit"] != (unit["name"] in kept_set):
            where = "is" if unit["name"] in kept_set else "is not"
            raise _InvalidError(
                f"$.units[{i}].in_circuit",
                f"is {unit['in_circuit']} but {unit['name']!r} {where} in $.circuit.units",
            )
    scores = obj["scores"]
    _check_interval(scores["faithfulness_ci"], "$.scores.faithfulness_ci")
    for key in scores["minimality"] or {}:
        if key not in names:
            raise _InvalidError(_key("$.scores.minimality", key), "is not the name of any unit")
    if scores["roc"] is not None and len(scores["roc"]["fpr"]) != len(scores["roc"]["tpr"]):
        raise _InvalidError("$.scores.roc.tpr", "fpr and tpr must have the same length")
    curve = obj["curve"]
    if curve is not None and len(curve["size"]) != len(curve["faithfulness"]):
        raise _InvalidError(
            "$.curve.faithfulness", "size and faithfulness must have the same length"
        )


def validate_results(obj: Any) -> None:
    """Check a parsed ``results.json`` against :data:`RESULTS_SCHEMA` and the cross-field rules.

    Raises :class:`ValueError` naming the JSON path of the first problem found::

        >>> from meanablate.report import example_results
        >>> results = example_results()
        >>> validate_results(results)
        >>> results["units"][3]["effect"] = "large"
        >>> validate_results(results)
        Traceback (most recent call last):
        ...
        ValueError: results.json is invalid at $.units[3].effect: expected a number, got 'large'
    """
    if not isinstance(obj, Mapping):
        raise ValueError(f"results.json is invalid at $: expected an object, got {_show(obj)}")
    try:
        _schema_check(obj, RESULTS_SCHEMA)
        _check_semantics(obj)
    except _InvalidError as exc:
        raise ValueError(f"results.json is invalid at {exc.path}: {exc.message}") from None


SCORES_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "$id": "https://meanablate.invalid/schemas/scores-v1.json",
    "title": "meanablate sweep.json / attribution.json",
    "type": "object",
    "required": ["method", "metric", "units"],
    "properties": {
        "method": {"type": "string"},
        "metric": {"type": "string"},
        "n_examples": {"type": "integer", "minimum": 0},
        "seconds": {"type": "number", "minimum": 0},
        "config": {"type": "object"},
        "units": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["name", "effect"],
                "properties": {
                    "name": {"type": "string"},
                    "effect": _NUM,
                    "ci": _INTERVAL_OR_NULL,
                    "exact": {"type": "boolean"},
                    "per_example": {"type": "array", "items": _NUM_OR_NULL},
                },
            },
        },
    },
}


def validate_scores(obj: Any, *, where: str = "scores") -> None:
    """Check a ``sweep.json`` / ``attribution.json`` object (:data:`SCORES_SCHEMA`): unit names
    unique, per-example lists of one length; ``ValueError`` naming the path otherwise."""
    try:
        if not isinstance(obj, Mapping):
            raise _InvalidError("$", f"expected an object, got {_show(obj)}")
        _schema_check(obj, SCORES_SCHEMA)
        seen: set[str] = set()
        lengths = set()
        for i, unit in enumerate(obj["units"]):
            if unit["name"] in seen:
                raise _InvalidError(f"$.units[{i}].name", f"duplicate unit {unit['name']!r}")
            seen.add(unit["name"])
            _check_interval(unit.get("ci"), f"$.units[{i}].ci")
            if "per_example" in unit:
                lengths.add(len(unit["per_example"]))
        if len(lengths) > 1:
            raise _InvalidError("$.units", f"per_example lists differ in length: {sorted(lengths)}")
    except _InvalidError as exc:
        raise ValueError(f"{where} is invalid at {exc.path}: {exc.message}") from None
