"""The command-line options, one ``Annotated`` type each, with their help from
:data:`meanablate.config.OPTIONS` (the commands in :mod:`meanablate.cli.app` take them)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from meanablate.config import OPTIONS, flag


def _h(key: str, extra: str = "") -> str:
    """Help of an option (rich markup escaped: ``[default: 1]`` is text, not a tag)."""
    from rich.markup import escape

    opt = OPTIONS[key]
    default = str(opt.default).lower() if isinstance(opt.default, bool) else opt.default
    choices = f" ({', '.join(opt.choices)})" if opt.choices else ""
    text = opt.help + choices + extra + ("" if default is None else f" [default: {default}]")
    return escape(text)


_IN, _RUN, _OUT = "Input", "Run", "Output"


def _option(key: str, panel: str, *short: str, metavar: str | None = None, extra: str = "") -> Any:
    """The ``typer.Option`` of a run option: its flag (``--n-examples``), help and panel."""
    return typer.Option(
        flag(key),
        *short,
        metavar=metavar,
        help=_h(key, extra),
        rich_help_panel=panel,
        show_default=False,
    )


def _switch(key: str, panel: str) -> Any:
    """A ``--name/--no-name`` boolean option."""
    name = flag(key)
    return typer.Option(
        f"{name}/--no-{name[2:]}", help=_h(key), rich_help_panel=panel, show_default=False
    )


Organism = Annotated[str | None, _option("organism", _IN)]
Model = Annotated[str | None, _option("model", _IN, metavar="DIR|MODULE:FUNC")]
Prompts = Annotated[str | None, _option("prompts", _IN, metavar="FILE")]
Units = Annotated[list[str] | None, _option("units", _IN, metavar="UNITS", extra="; repeatable")]
GroundTruth = Annotated[
    list[str] | None, _option("ground_truth", _IN, metavar="SITE", extra="; repeatable")
]
Metric = Annotated[str | None, _option("metric", _RUN)]
MeansFile = Annotated[str | None, _option("means", _IN, metavar="FILE")]
PerPosition = Annotated[bool | None, _switch("per_position", _RUN)]
NExamples = Annotated[int | None, _option("n_examples", _IN)]
BatchSize = Annotated[int | None, _option("batch_size", _IN)]
Seed = Annotated[int | None, _option("seed", _RUN)]
Method = Annotated[str | None, _option("method", _RUN)]
Algorithm = Annotated[str | None, _option("algorithm", _RUN)]
Threshold = Annotated[float | None, _option("threshold", _RUN)]
TargetFaith = Annotated[float | None, _option("target_faithfulness", _RUN)]
AbsThreshold = Annotated[float | None, _option("abs_threshold", _RUN)]
ForceDiscovery = Annotated[bool | None, _switch("force_discovery", _RUN)]
MaxExhaustive = Annotated[int | None, _option("max_exhaustive", _RUN, metavar="N")]
MeanKind = Annotated[str | None, _option("mean_kind", _RUN)]
KeepPositions = Annotated[str | None, _option("keep_positions", _RUN, metavar="POS,...")]
Attribution = Annotated[bool | None, _switch("attribution", _RUN)]
NBoot = Annotated[int | None, _option("n_boot", _RUN)]
Device = Annotated[str | None, _option("device", _RUN)]
Threads = Annotated[int | None, _option("threads", _RUN)]
Ray = Annotated[str | None, _option("ray", _RUN, metavar="ADDRESS")]
RayWorkers = Annotated[int | None, _option("ray_workers", _RUN, metavar="N")]
Out = Annotated[Path | None, _option("out", _OUT, "-o", metavar="DIR")]
Config = Annotated[
    Path | None,
    typer.Option(
        "--config",
        "-c",
        metavar="FILE",
        help="TOML file of options (same names as the flags; flags win)",
        rich_help_panel=_OUT,
    ),
]
Quiet = Annotated[
    bool | None,
    typer.Option(
        "--quiet", "-q", help="no progress bars or logs", rich_help_panel=_OUT, show_default=False
    ),
]
DryRun = Annotated[
    bool | None,
    typer.Option("--dry-run", help=_h("dry_run"), rich_help_panel=_RUN, show_default=False),
]
Force = Annotated[
    bool | None,
    typer.Option(
        "--force",
        help=_h("force"),
        rich_help_panel=_OUT,
        show_default=False,
    ),
]
Debug = Annotated[bool, typer.Option("--debug", help="show tracebacks", rich_help_panel=_OUT)]


def _plain_flags(params: list[Any]) -> list[Any]:
    # typer shows a `<bool>` type column for flags (--quiet, --help, --per-position/
    # --no-per-position); a flag takes no value, so show none.
    for p in params:
        if getattr(p, "is_flag", False) and p.metavar is None:
            p.metavar = ""
    return params


class Command(typer.core.TyperCommand):
    """A command whose help shows no metavar for flags."""

    def get_params(self, ctx: Any) -> list[Any]:
        return _plain_flags(super().get_params(ctx))


class Group(typer.core.TyperGroup):
    """The top-level group, with flags shown like :class:`Command`'s."""

    def get_params(self, ctx: Any) -> list[Any]:
        return _plain_flags(super().get_params(ctx))
