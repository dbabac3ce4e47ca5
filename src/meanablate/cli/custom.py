"""Your own model (``--model module:function`` or ``path/to/file.py:function``): a function
returning ``(model, batches)``, ``(model, batches, units)`` or a dict with those keys and
optionally ``metric``, ``ground_truth``, ``per_position``; it may take any of
``n_examples``, ``batch_size``, ``seed`` as keyword arguments."""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

from torch import Tensor, nn

from meanablate.cli.errors import one_line
from meanablate.cli.records import Inputs, default_metric
from meanablate.cli.units import resolve_units
from meanablate.config import DEFAULT_N_EXAMPLES, InputError, Resolved

__all__ = ["import_user_module", "load_custom"]


def _n_examples(cfg: Resolved) -> int:
    return cfg["n_examples"] if cfg["n_examples"] is not None else DEFAULT_N_EXAMPLES


def import_user_module(module_name: str, label: str) -> ModuleType:
    """The user's module: a ``.py`` file path, or a module importable from the working
    directory. A missing file or a path that is not Python is an :class:`InputError`
    starting with ``label``; the module's own import errors propagate to the caller."""
    if module_name.endswith(".py") or "/" in module_name or os.sep in module_name:
        path = Path(module_name)
        if not path.is_file():
            raise InputError(f"{label}: no such file {module_name}")
        mod_spec = importlib.util.spec_from_file_location(path.stem, path)
        if mod_spec is None or mod_spec.loader is None:
            raise InputError(f"{label}: {module_name} is not a Python file (*.py)")
        module = importlib.util.module_from_spec(mod_spec)
        mod_spec.loader.exec_module(module)
        return module
    sys.path.insert(0, os.getcwd())
    try:
        return importlib.import_module(module_name)
    finally:
        sys.path.remove(os.getcwd())


def load_custom(cfg: Resolved, spec: str) -> Inputs:
    module_name, _, func_name = spec.rpartition(":")
    if not module_name or not func_name.isidentifier():
        raise InputError(f"--model {spec}: expected module:function, e.g. mymodels:build")
    try:
        module = import_user_module(module_name, f"--model {spec}")
    except InputError:
        raise
    except ModuleNotFoundError as exc:
        if exc.name and module_name.startswith(exc.name):
            raise InputError(f"--model {spec}: no module named {module_name!r}") from None
        raise InputError(f"--model {spec}: importing {module_name}: {one_line(exc)}") from exc
    except Exception as exc:  # the module's own error: --debug shows its traceback
        raise InputError(
            f"--model {spec}: importing {module_name} failed: {type(exc).__name__}: {one_line(exc)}"
        ) from exc
    func = getattr(module, func_name, None)
    if not callable(func):
        raise InputError(f"--model {spec}: module {module_name} has no function {func_name!r}")
    wanted = {"n_examples": _n_examples(cfg), "batch_size": cfg["batch_size"], "seed": cfg["seed"]}
    params = inspect.signature(func).parameters
    kwargs = {k: v for k, v in wanted.items() if k in params}
    try:
        out = func(**kwargs)
    except Exception as exc:
        raise InputError(f"--model {spec}: {type(exc).__name__}: {one_line(exc)}") from exc
    fields: dict[str, Any]
    if isinstance(out, Mapping):
        fields = dict(out)
    elif isinstance(out, (tuple, list)) and len(out) in (2, 3):
        fields = dict(zip(("model", "batches", "units"), out))
    else:
        raise InputError(
            f"--model {spec}: must return (model, batches) or (model, batches, units), "
            f"got {type(out).__name__}"
        )
    model = fields.get("model")
    if not isinstance(model, nn.Module):
        raise InputError(f"--model {spec}: the model must be a torch nn.Module, got {model!r:.60}")
    model.eval()
    batches = fields.get("batches")
    if isinstance(batches, (Tensor, Mapping)):
        batches = [batches]
    try:
        batches = list(batches)  # type: ignore[arg-type]
    except TypeError:
        raise InputError(f"--model {spec}: batches must be a list of batches") from None
    if not batches:
        raise InputError(f"--model {spec}: returned no batches")
    units = fields.get("units")
    if units is not None:
        units = resolve_units(model, [str(u) for u in units], batches[0], where=f"--model {spec}")
    elif not cfg["units"]:
        try:
            from meanablate.discovery import transformer_units

            units = transformer_units(model)
        except TypeError:
            raise InputError(
                f"--model {spec}: no units; return them as the third value or pass --units"
            ) from None
    gt = fields.get("ground_truth")
    stem = Path(module_name).stem if module_name.endswith(".py") else module_name
    return Inputs(
        name=f"{stem}.{func_name}",
        model=model,
        batches=batches,
        units=list(units or []),
        metric=str(fields.get("metric") or default_metric(batches[0])),
        ground_truth=[str(u) for u in gt] if gt else None,
        per_position=bool(fields.get("per_position", False)),
        source="custom",
        description=(inspect.getdoc(func) or "").split("\n\n")[0],
    )
