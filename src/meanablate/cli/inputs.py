"""Inputs of the command line: a built-in organism, a Hugging Face model, or your function.

Three kinds of input (see :func:`load_inputs`):

- a built-in organism (``organism = "tracr-sort"``): model, data, metric, units, ground truth;
- a local Hugging Face model directory (``model = "path/to/dir"``, loaded offline) with a
  prompts file: plain text, one prompt a line, or JSONL with ``text`` and optional
  ``target`` / ``wrong`` answers (strings of one token each, or token ids) that the metric
  reads at the prompt's last token;
- a Python function (``model = "module:function"`` or ``"path/to/file.py:function"``)
  returning ``(model, batches)`` or ``(model, batches, units)`` (or a dict with those keys
  and optionally ``metric``, ``ground_truth``, ``per_position``); it may take any of
  ``n_examples``, ``batch_size``, ``seed`` as keyword arguments.

Units are site strings, granularities (``heads``, ``neurons:1``: see
:func:`~meanablate.cli.units.resolve_units`) or ``@FILE``. Bad input raises
:class:`~meanablate.config.InputError` with one line that names the culprit (the flag, or the
file and line).

The loaders: :mod:`~meanablate.cli.organism`, :mod:`~meanablate.cli.hf` (with
:mod:`~meanablate.cli.prompts`) and :mod:`~meanablate.cli.custom`; units in
:mod:`~meanablate.cli.units`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from meanablate.cli.custom import load_custom
from meanablate.cli.errors import one_line
from meanablate.cli.hf import hf_units, load_hf
from meanablate.cli.organism import load_organism
from meanablate.cli.prompts import read_prompts
from meanablate.cli.records import Inputs, Log, quiet_log
from meanablate.cli.units import GRANULARITIES, resolve_units, site_str
from meanablate.config import InputError, Resolved, subject

__all__ = [
    "GRANULARITIES",
    "Inputs",
    "Log",
    "hf_units",
    "load_inputs",
    "one_line",
    "preflight",
    "quiet_log",
    "read_prompts",
    "resolve_units",
]


# -- loading -------------------------------------------------------------------------------
def preflight(cfg: Resolved) -> None:
    """Check that every file the options name exists, before loading anything."""
    for key in ("prompts", "means"):
        if cfg[key] and not Path(cfg[key]).is_file():
            raise InputError(f"{subject(key, cfg.sources[key])} {cfg[key]}: no such file")
    for spec in cfg["units"] or ():
        if spec.strip().startswith("@") and not Path(spec.strip()[1:]).is_file():
            raise InputError(f"{subject('units', cfg.sources['units'])} {spec}: no such file")


def load_inputs(cfg: Resolved, log: Log = quiet_log) -> Inputs:
    """The model, batches, units, metric and ground truth the options ask for."""
    preflight(cfg)
    organism, model_spec = cfg["organism"], cfg["model"]
    if organism and model_spec:
        where = [
            f"{k} from {cfg.sources[k]}"
            for k in ("organism", "model")
            if not cfg.sources[k].startswith("--")
        ]
        raise InputError(
            "give either --organism or --model, not both"
            + (f" ({'; '.join(where)})" if where else "")
        )
    if not organism and not model_spec:
        raise InputError(
            "no model given: pass --organism NAME (see `meanablate organisms`), "
            "--model DIR (a Hugging Face model) or --model module:function"
        )
    device = _device(cfg["device"])
    if (
        model_spec
        and not os.path.isdir(model_spec)
        and (":" not in model_spec or os.path.exists(model_spec))
    ):
        what = "is a file, not a directory" if os.path.exists(model_spec) else "no such directory"
        raise InputError(
            f"{subject('model', cfg.sources['model'])} {model_spec}: {what} (expected a "
            "Hugging Face model directory or module:function)"
        )
    if cfg["prompts"] and not (model_spec and os.path.isdir(model_spec)):
        raise InputError("--prompts goes with --model DIR (a Hugging Face model directory)")
    if organism:
        inputs = load_organism(cfg, organism)
    elif os.path.isdir(model_spec):
        inputs = load_hf(cfg, model_spec, log)
    else:
        inputs = load_custom(cfg, model_spec)
    if cfg["units"]:
        inputs.units = resolve_units(
            inputs.model, cfg["units"], inputs.batches[0], where=cfg.sources["units"]
        )
    if cfg["ground_truth"]:
        inputs.ground_truth = [
            site_str(u, cfg.sources["ground_truth"]) for u in cfg["ground_truth"]
        ]
    if cfg["metric"]:
        inputs.metric = cfg["metric"]
    _check_metric_fields(inputs.metric, inputs.batches[0], cfg.sources["metric"])
    if cfg["per_position"] is not None:
        inputs.per_position = cfg["per_position"]
    if cfg["mean_kind"] is not None:
        wanted = cfg["mean_kind"] == "per_position"
        if cfg["per_position"] is not None and cfg["per_position"] != wanted:
            raise InputError(
                f"--per-position={str(cfg['per_position']).lower()} contradicts --mean-kind "
                f"{cfg['mean_kind']}; give one of them"
            )
        inputs.mean_kind = cfg["mean_kind"]
        inputs.per_position = cfg["mean_kind"] != "plain"
    if cfg.values.get("keep_positions") is not None:
        inputs.keep_positions = _keep_positions(cfg, inputs.effective_mean_kind)
    if cfg["method"] == "resample" and not all(
        isinstance(b, dict) and "corrupt" in b for b in inputs.batches
    ):
        raise InputError(
            f"{subject('method', cfg.sources['method'])} resample needs a corrupted input "
            "for every example: a 'corrupt' prompt on each JSONL line (same token length as "
            "'text'), or batches with a 'corrupt' [batch, pos] field from --model "
            "module:function"
        )
    inputs.model.to(device)
    _set_threads(cfg["threads"], inputs.model, device)
    return inputs


def _device(spec: str) -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except (RuntimeError, ValueError):
        raise InputError(f"--device {spec!r}: not a device (use cpu, cuda, cuda:1, mps)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"--device {spec}: CUDA is not available here")
    return device


def _set_threads(threads: int, model: nn.Module, device: torch.device) -> None:
    """``--threads N``, or (0) :func:`meanablate.torch_threads.choose_threads` (the same choice
    the Python API makes): as many as the CPU has free, 1 for small models."""
    from meanablate.torch_threads import set_threads

    if threads:
        set_threads(threads)
    elif device.type == "cpu":
        set_threads("auto", model)


# The batch fields each task metric reads (comparing metrics, kl and l2, need none).
_METRIC_FIELDS = {
    "logit_diff": ("target", "wrong"),
    "loss": ("target",),
    "prob": ("target",),
    "accuracy": ("target",),
    "mse": ("target_value",),
}


def _check_metric_fields(metric: str, batch: Any, where: str) -> None:
    have = set(batch) if isinstance(batch, Mapping) else set()
    missing = [f for f in _METRIC_FIELDS.get(metric, ()) if f not in have]
    if missing:
        who = "--metric" if where.startswith("--") else f"metric {metric!r} (from {where})"
        raise InputError(
            f"{who} {metric} needs the data to have {' and '.join(map(repr, missing))} "
            f"(the batches have {sorted(have) or 'no fields'}; prompts files: JSONL with "
            '"target"/"wrong" answers)'
        )


def _keep_positions(cfg: Resolved, kind: str) -> list[int]:
    """``--keep-positions 0,1`` as ``[0, 1]``; only with ``--mean-kind plain_except``."""
    who = subject("keep_positions", cfg.sources["keep_positions"])
    text = cfg["keep_positions"]
    if kind != "plain_except":
        raise InputError(
            f"{who} {text} is for --mean-kind plain_except (the other positions share one "
            f"plain mean), not {kind} means; add --mean-kind plain_except or drop {who}"
        )
    try:
        keep = [int(p) for p in text.split(",")]
    except ValueError:
        keep = []
    if not keep or any(p < 0 for p in keep) or len(set(keep)) != len(keep):
        raise InputError(
            f"{who} must be distinct position indices >= 0, comma-separated (e.g. 0,1), "
            f"got {text!r}"
        )
    return keep
