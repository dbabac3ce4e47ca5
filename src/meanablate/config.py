"""Run options for the command line: one table of names, TOML config files, validation.

Every option of ``meanablate means/sweep/attribute/discover/demo`` has one name, used as a
flag (``--n-examples``) and as a key of a TOML config file (``n-examples`` or
``n_examples``). :func:`resolve` merges defaults < config file < flags, checks every value,
and names where a bad one came from (the flag, or the config file and line)::

    cfg = resolve({"threshold": 0.01}, load_config("run.toml"))
    cfg.values["algorithm"]      # "acdc" unless run.toml or a flag says otherwise

:func:`dump_toml` writes the resolved options back (the run folder's ``config.toml``), so a
run can be repeated with ``--config RUN_DIR/config.toml``. Paths in a config file (``model``,
``prompts``, ``means``, ``out``) are relative to the working directory, as on the command
line.
"""

from __future__ import annotations

import difflib
import math
import re
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "OPTIONS",
    "ConfigError",
    "InputError",
    "Option",
    "Resolved",
    "dump_toml",
    "load_config",
    "resolve",
    "subject",
]

METRIC_NAMES = ("kl", "l2", "logit_diff", "loss", "prob", "accuracy", "mse")
ALGORITHM_NAMES = ("acdc", "sweep", "attribution", "attribute_verify")
METHOD_NAMES = ("mean", "zero", "resample")
DEFAULT_N_EXAMPLES = 512  # built-in organisms and custom models; prompts files: every line
DEFAULT_N_EXAMPLES_BIG = 32  # organisms with more than BIG_MODEL parameters (minilm)
BIG_MODEL = 5_000_000  # parameters; smaller models also run on one CPU thread by default


class InputError(ValueError):
    """Bad input from the user (a file, a name, a value): one line that says what and where."""


class ConfigError(InputError):
    """A bad option value or config file."""


@dataclass(frozen=True)
class Option:
    """One run option: its type (``str``, ``int``, ``float``, ``bool`` or ``list``)."""

    type: type
    default: Any
    help: str
    choices: tuple[str, ...] | None = None
    minimum: float | None = None
    maximum: float | None = None
    exclusive_minimum: bool = False
    saved: bool = True  # written to the run folder's config.toml
    exclusive_maximum: bool = False


OPTIONS: dict[str, Option] = {
    "organism": Option(str, None, "built-in organism (see `meanablate organisms`)"),
    "model": Option(
        str,
        None,
        "a local Hugging Face model directory (offline), or module:function returning "
        "(model, batches[, units])",
    ),
    "prompts": Option(
        str,
        None,
        "prompts for --model DIR: plain text, one a line, or JSONL with 'text' and "
        "optional 'target'/'wrong' answer strings (single tokens)",
    ),
    "units": Option(
        list,
        None,
        "candidate units: site strings, a granularity (heads, mlps, components, neurons, "
        "layers, positions; ':L,..' picks layers, e.g. neurons:1), or @FILE (one a line)",
    ),
    "ground_truth": Option(list, None, "known circuit (site strings), for AUROC on own models"),
    "metric": Option(str, None, "metric (default: the task's)", choices=METRIC_NAMES),
    "means": Option(str, None, "precomputed means (.safetensors from `meanablate means`)"),
    "per_position": Option(bool, None, "per-position means (default: the organism's choice)"),
    "mean_kind": Option(
        str,
        None,
        "means: per_position, plain (over all positions) or plain_except (plain over "
        "positions 1.., BOS keeps its own); default: the organism's choice",
        choices=("per_position", "plain", "plain_except"),
    ),
    "keep_positions": Option(
        str,
        None,
        "with --mean-kind plain_except: the positions that keep their own per-position "
        "mean, comma-separated, e.g. 0,1 (default: 0, BOS)",
    ),
    "n_examples": Option(
        int,
        None,
        "examples (default: 512, 32 for organisms over 5M parameters; prompts: every line)",
        minimum=1,
    ),
    "batch_size": Option(int, 128, "examples per batch", minimum=1),
    "seed": Option(int, 0, "random seed (data, bootstrap)"),
    "method": Option(
        str,
        "mean",
        "ablation: replace by the mean, by zero, or (resample) by the value on each "
        "example's corrupted input (prompts JSONL 'corrupt'; organisms: fresh inputs)",
        METHOD_NAMES,
    ),
    "algorithm": Option(str, "acdc", "circuit discovery algorithm", choices=ALGORITHM_NAMES),
    "threshold": Option(
        float,
        0.01,
        "ACDC: largest metric change a removed unit may cause, as a fraction of "
        "|m(full) - m(empty)|; the circuit keeps faithfulness >= 1 - threshold",
        minimum=0,
        maximum=1,
        exclusive_maximum=True,
    ),
    "abs_threshold": Option(
        float,
        None,
        "ACDC: the threshold in the metric's own units (replaces --threshold)",
        minimum=0,
    ),
    "force_discovery": Option(
        bool, False, "discover even when m(full) - m(empty) is not told apart from 0"
    ),
    "max_exhaustive": Option(
        int,
        4096,
        "most smaller subsets the minimality check may try (beyond: certificate 1-minimal)",
        minimum=0,
    ),
    "target_faithfulness": Option(
        float,
        0.95,
        "score-then-prune algorithms: faithfulness to reach",
        minimum=0,
        maximum=1,
        exclusive_minimum=True,
    ),
    "attribution": Option(bool, True, "also estimate effects by attribution (for the report)"),
    "n_boot": Option(int, 1000, "bootstrap resamples for intervals (0: none)", minimum=0),
    "device": Option(str, "auto", "cpu, cuda, cuda:1, ... (auto: cuda if available)"),
    "threads": Option(
        int, 0, "CPU threads (0: auto: the free cores, 1 for small models)", minimum=0
    ),
    "ray": Option(
        str,
        None,
        "run on a Ray cluster: its address (host:6379, ray://host:10001), auto (the cluster "
        "of this node) or local (a new Ray instance on this machine)",
        saved=False,
    ),
    "ray_workers": Option(
        int, None, "Ray workers (default: one per GPU, else one per CPU)", minimum=1, saved=False
    ),
    "out": Option(str, None, "run folder (default: runs/<name>-<timestamp>)", saved=False),
    "quiet": Option(bool, False, "no progress bars or logs", saved=False),
    "dry_run": Option(
        bool,
        False,
        "estimate the run's time and peak memory from a short calibration, print it and "
        "stop (no run folder)",
        saved=False,
    ),
    "force": Option(
        bool,
        False,
        "go ahead where a run would refuse: write into an --out folder that holds a run, "
        "discover when the full model is indistinguishable from the empty circuit",
        saved=False,
    ),
}


def flag(key: str) -> str:
    """The command-line flag of an option: ``n_examples`` -> ``--n-examples``."""
    return "--" + key.replace("_", "-")


def _key_line(text: str, key: str) -> int | None:
    pattern = re.compile(rf"^[ \t]*[\"']?{re.escape(key)}[\"']?[ \t]*=", re.MULTILINE)
    m = pattern.search(text)
    return text.count("\n", 0, m.start()) + 1 if m else None


def load_config(path: str | Path) -> dict[str, tuple[Any, str]]:
    """Read a TOML config: ``{key: (value, "path, line N")}``, keys normalized to ``a_b``.

    Raises :class:`ConfigError` for a missing file, invalid TOML, or an unknown key (naming
    the closest valid one).
    """
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - Python 3.10
        import tomli as tomllib

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"--config {path}: no such file")
    try:
        text = p.read_text(encoding="utf-8")
        data = tomllib.loads(text)
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a UTF-8 text file") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from None
    out: dict[str, tuple[Any, str]] = {}
    for raw_key, value in data.items():
        line = _key_line(text, raw_key)
        where = f"{path}, line {line}" if line else str(path)
        key = raw_key.replace("-", "_")
        if key not in OPTIONS:
            names = [k.replace("_", "-") for k in OPTIONS]
            close = difflib.get_close_matches(raw_key.replace("_", "-"), names, n=1, cutoff=0.5)
            hint = f"; did you mean {close[0]!r}?" if close else f"; valid keys: {', '.join(names)}"
            raise ConfigError(f"{where}: unknown key {raw_key!r}{hint}")
        out[key] = (value, where)
    return out


@dataclass
class Resolved:
    """The merged options: ``values[key]`` and where each came from (``sources[key]``)."""

    values: dict[str, Any]
    sources: dict[str, str] = field(default_factory=dict)
    ignored: list[str] = field(default_factory=list)  # "where: key" of unused config keys

    def __getitem__(self, key: str) -> Any:
        return self.values[key]

    def saved(self) -> dict[str, Any]:
        """The options to keep with the run: set, used, and not session options (quiet)."""
        return {k: v for k, v in self.values.items() if v is not None and OPTIONS[k].saved}


def _type_name(t: type) -> str:
    return {str: "a string", int: "an integer", float: "a number", bool: "true or false"}.get(
        t, "a list of strings"
    )


def subject(key: str, where: str) -> str:
    """How a message names an option: ``--threshold``, or ``run.toml, line 3: threshold``."""
    name = key.replace("_", "-")
    return f"--{name}" if where == flag(key) else f"{where}: {name}"


def _check(key: str, value: Any, where: str) -> Any:
    opt = OPTIONS[key]
    who = subject(key, where)
    bad = f"{who} must be {_type_name(opt.type)}, got {value!r}"
    if opt.type is bool:
        if not isinstance(value, bool):
            raise ConfigError(bad)
    elif opt.type is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(bad)
    elif opt.type is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(bad)
        value = float(value)
        if not math.isfinite(value):
            raise ConfigError(bad)
    elif opt.type is str:
        if key == "keep_positions" and isinstance(value, (list, tuple)):
            # a config file may write the positions as a list: keep_positions = [0, 1]
            if not value or not all(type(v) is int for v in value):
                raise ConfigError(f"{who} must be positions (integers), got {value!r}")
            value = ",".join(str(v) for v in value)
        if not isinstance(value, str):
            raise ConfigError(bad)
    elif opt.type is list:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
            raise ConfigError(bad)
        value = list(value)
        if not value:
            raise ConfigError(f"{who} must not be empty")
    if opt.choices is not None and value not in opt.choices:
        close = difflib.get_close_matches(value, opt.choices, n=1, cutoff=0.5)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(
            f"{who}: unknown value {value!r}{hint}; choose one of {', '.join(opt.choices)}"
        )
    if opt.minimum is not None and (
        value < opt.minimum or (opt.exclusive_minimum and value == opt.minimum)
    ):
        op = ">" if opt.exclusive_minimum else ">="
        raise ConfigError(f"{who} must be {op} {opt.minimum:g}, got {value}")
    if opt.maximum is not None and (
        value > opt.maximum or (opt.exclusive_maximum and value == opt.maximum)
    ):
        op = "<" if opt.exclusive_maximum else "<="
        raise ConfigError(f"{who} must be {op} {opt.maximum:g}, got {value}")
    return value


def resolve(
    flags: Mapping[str, Any],
    config: Mapping[str, tuple[Any, str]] | None = None,
    defaults: Mapping[str, Any] | None = None,
    *,
    accepted: Iterable[str] | None = None,
) -> Resolved:
    """Merge option defaults < ``defaults`` (per command) < ``config`` < ``flags``.

    ``flags``: the values given on the command line (``None``: not given). Every value is
    type- and range-checked; a bad one raises :class:`ConfigError` naming its source.
    ``accepted``: the options of the command (default: all); the others stay ``None``, and
    config keys for them are listed in ``Resolved.ignored``.
    """
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    config = config or {}
    defaults = defaults or {}
    used = set(OPTIONS if accepted is None else accepted)
    ignored = [f"{config[k][1]}: {k.replace('_', '-')}" for k in config if k not in used]
    for key, opt in OPTIONS.items():
        if key not in used:
            values[key], sources[key] = None, "not used"
            continue
        if flags.get(key) is not None:
            value, where = flags[key], flag(key)
        elif key in config:
            value, where = config[key]
        elif key in defaults:
            value, where = defaults[key], "default"
        else:
            value, where = opt.default, "default"
        values[key] = None if value is None else _check(key, value, where)
        sources[key] = where
    unknown = set(flags) - set(OPTIONS)
    if unknown:  # a programming error, not a user's
        raise KeyError(f"unknown options {sorted(unknown)}")
    return Resolved(values, sources, ignored)


# -- writing TOML (tomllib reads only; tomli-w writes) -------------------------------------
def dump_toml(values: Mapping[str, Any], header: str = "") -> str:
    """Flat ``{key: value}`` as TOML (by ``tomli_w``), keys as flags spell them
    (``n-examples``), after ``header`` as ``#`` comment lines.

    >>> print(dump_toml({"n_examples": 64, "metric": "kl"}, header="rerun me"), end="")
    # rerun me
    n-examples = 64
    metric = "kl"
    """
    import tomli_w

    for key, value in values.items():
        if value is None:
            raise TypeError(f"cannot write {key}=None to TOML (TOML has no null)")
    lines = [f"# {line}" for line in header.splitlines()]
    body = tomli_w.dumps({k.replace("_", "-"): v for k, v in values.items()})
    return "\n".join(lines) + ("\n" if lines else "") + body
