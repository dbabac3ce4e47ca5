"""The typer application: ``demo``, ``organisms``, ``means``, ``sweep``, ``attribute``,
``discover`` and ``report`` (see :mod:`meanablate.cli` for an overview)."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from meanablate.config import OPTIONS, InputError, load_config, resolve

__all__ = ["app", "main"]

EXIT_INPUT = 2
EXIT_INTERRUPTED = 130

app = typer.Typer(
    name="meanablate",
    help=(
        "Mean ablation and circuit discovery for PyTorch models.\n\n"
        "Start with [bold]meanablate demo[/bold]: it finds the circuit of a built-in model "
        "whose true circuit is known, scores it, and writes a report."
    ),
    epilog=(
        "Examples:\n\n"
        "  meanablate demo\n\n"
        "  meanablate demo --organism tracr-reverse --out runs/reverse\n\n"
        "  meanablate discover --model ./gpt2-small --prompts prompts.jsonl --units heads\n\n"
        "  meanablate report runs/reverse"
    ),
    no_args_is_help=True,
    rich_markup_mode="rich",
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


# -- options ---------------------------------------------------------------------------------
def _h(key: str, extra: str = "") -> str:
    """Help of an option (rich markup escaped: ``[default: 1]`` is text, not a tag)."""
    from rich.markup import escape

    opt = OPTIONS[key]
    default = str(opt.default).lower() if isinstance(opt.default, bool) else opt.default
    choices = f" ({', '.join(opt.choices)})" if opt.choices else ""
    text = opt.help + choices + extra + ("" if default is None else f" [default: {default}]")
    return escape(text)


_IN, _RUN, _OUT = "Input", "Run", "Output"
Organism = Annotated[
    str | None, typer.Option("--organism", help=_h("organism"), rich_help_panel=_IN)
]
Model = Annotated[
    str | None,
    typer.Option("--model", metavar="DIR|MODULE:FUNC", help=_h("model"), rich_help_panel=_IN),
]
Prompts = Annotated[
    str | None,
    typer.Option("--prompts", metavar="FILE", help=_h("prompts"), rich_help_panel=_IN),
]
Units = Annotated[
    list[str] | None,
    typer.Option("--units", metavar="UNITS", help=_h("units", "; repeatable"), rich_help_panel=_IN),
]
GroundTruth = Annotated[
    list[str] | None,
    typer.Option(
        "--ground-truth",
        metavar="SITE",
        help=_h("ground_truth", "; repeatable"),
        rich_help_panel=_IN,
    ),
]
Metric = Annotated[
    str | None,
    typer.Option(
        "--metric",
        help=_h("metric"),
        rich_help_panel=_RUN,
    ),
]
MeansFile = Annotated[
    str | None, typer.Option("--means", metavar="FILE", help=_h("means"), rich_help_panel=_IN)
]
PerPosition = Annotated[
    bool | None,
    typer.Option(
        "--per-position/--no-per-position",
        help=_h("per_position"),
        rich_help_panel=_RUN,
        show_default=False,
    ),
]
NExamples = Annotated[
    int | None,
    typer.Option("--n-examples", help=_h("n_examples"), rich_help_panel=_IN, show_default=False),
]
BatchSize = Annotated[
    int | None,
    typer.Option("--batch-size", help=_h("batch_size"), rich_help_panel=_IN, show_default=False),
]
Seed = Annotated[
    int | None, typer.Option("--seed", help=_h("seed"), rich_help_panel=_RUN, show_default=False)
]
Method = Annotated[str | None, typer.Option("--method", help=_h("method"), rich_help_panel=_RUN)]
Algorithm = Annotated[
    str | None,
    typer.Option(
        "--algorithm",
        help=_h("algorithm"),
        rich_help_panel=_RUN,
    ),
]
Threshold = Annotated[
    float | None,
    typer.Option("--threshold", help=_h("threshold"), rich_help_panel=_RUN, show_default=False),
]
TargetFaith = Annotated[
    float | None,
    typer.Option(
        "--target-faithfulness",
        help=_h("target_faithfulness"),
        rich_help_panel=_RUN,
        show_default=False,
    ),
]
Attribution = Annotated[
    bool | None,
    typer.Option(
        "--attribution/--no-attribution",
        help=_h("attribution"),
        rich_help_panel=_RUN,
        show_default=False,
    ),
]
NBoot = Annotated[
    int | None,
    typer.Option("--n-boot", help=_h("n_boot"), rich_help_panel=_RUN, show_default=False),
]
Device = Annotated[
    str | None,
    typer.Option("--device", help=_h("device"), rich_help_panel=_RUN, show_default=False),
]
Threads = Annotated[
    int | None,
    typer.Option("--threads", help=_h("threads"), rich_help_panel=_RUN, show_default=False),
]
Out = Annotated[
    Path | None, typer.Option("--out", "-o", metavar="DIR", help=_h("out"), rich_help_panel=_OUT)
]
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
Debug = Annotated[bool, typer.Option("--debug", help="show tracebacks", rich_help_panel=_OUT)]


# -- plumbing ---------------------------------------------------------------------------------
class _Session:
    """Resolved options, a stderr logger, and one-line error handling."""

    def __init__(self, command: str, debug: bool) -> None:
        self.command = command
        self.debug = debug
        self.quiet = False
        self.results_written = False
        self.started = time.perf_counter()

    def log(self, message: str) -> None:
        if not self.quiet:
            print(message, file=sys.stderr, flush=True)

    def resolve(self, flags: dict[str, Any], defaults: dict[str, Any] | None = None) -> Any:
        """The command's options: its flags over the ``--config`` file over the defaults."""
        flags = dict(flags)
        config_path = flags.pop("config", None)
        flags = {k: (None if v == [] else v) for k, v in flags.items()}
        flags = {k: (str(v) if isinstance(v, Path) else v) for k, v in flags.items()}
        config = load_config(config_path) if config_path is not None else None
        cfg = resolve(flags, config, defaults, accepted=flags)
        self.quiet = bool(cfg["quiet"])
        for item in cfg.ignored:
            self.log(f"note: {item} is not an option of `meanablate {self.command}`; ignored")
        return cfg

    def fail(self, message: str, code: int) -> typer.Exit:
        print(f"error: {' '.join(message.split())}", file=sys.stderr, flush=True)
        return typer.Exit(code)


def _guarded(session: _Session, body: Any) -> None:
    import torch

    # A run changes process-wide state (torch threads, transformers' logging): restore it,
    # so that calling the app in process (tests, notebooks) leaves no trace.
    threads = torch.get_num_threads()
    hf_logging = _hf_logging_state()
    try:
        body()
    except typer.Exit:
        raise
    except InputError as exc:
        if session.debug:
            raise
        raise session.fail(str(exc), EXIT_INPUT) from None
    except KeyboardInterrupt:
        if session.debug:
            raise
        what = (
            "results.json is complete; rebuild the report with `meanablate report`"
            if session.results_written
            else "no results were written"
        )
        raise session.fail(f"interrupted; {what}", EXIT_INTERRUPTED) from None
    except Exception as exc:
        if session.debug:
            raise
        raise session.fail(
            f"{type(exc).__name__}: {exc} (run with --debug for the traceback)", 1
        ) from None
    finally:
        torch.set_num_threads(threads)
        _restore_hf_logging(hf_logging)


def _hf_logging_state() -> tuple[int, bool]:
    tf = sys.modules.get("transformers")
    if tf is None:
        return 30, True  # transformers' defaults: WARNING, progress bars on
    return tf.utils.logging.get_verbosity(), tf.utils.logging.is_progress_bar_enabled()


def _restore_hf_logging(state: tuple[int, bool]) -> None:
    tf = sys.modules.get("transformers")
    if tf is None or _hf_logging_state() == state:
        return
    tf.utils.logging.set_verbosity(state[0])
    if state[1]:
        tf.utils.logging.enable_progress_bar()
    else:
        tf.utils.logging.disable_progress_bar()


def _flags(local: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in local.items() if k in OPTIONS or k == "config"}


def _out_dir(cfg: Any, name: str) -> Path:
    from meanablate.cli.pipeline import default_run_dir

    return Path(cfg["out"]) if cfg["out"] else default_run_dir(name)


def _fmt(x: float | None, digits: int = 3) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def _summary(results: dict[str, Any], out: Path, seconds: float, gt: list[str] | None) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    scores, circuit = results["scores"], results["circuit"]
    kept = circuit["units"]
    n_units = len(results["units"])
    table = Table(
        title=f"meanablate {results['command']}: {results['model']['name']}",
        show_header=False,
        title_justify="left",
    )
    table.add_column(style="bold")
    table.add_column(overflow="fold")
    what = circuit["algorithm"]
    if circuit["threshold"] is not None:
        what += f", threshold {circuit['threshold']:g}"
    table.add_row("circuit", f"{len(kept)} of {n_units} units ({what})")
    shown = kept[:12] + (
        [f"... and {len(kept) - 12} more (results.json)"] if len(kept) > 12 else []
    )
    table.add_row("", escape("\n".join(shown)) if kept else "(empty)")
    if gt:
        found, extra = len(set(kept) & set(gt)), len(set(kept) - set(gt))
        match = (
            "exact match"
            if found == len(set(gt)) and not extra
            else f"circuit has {found} of them and {extra} other units"
        )
        table.add_row("ground truth", f"{len(gt)} units: {match}")
    ci = scores["faithfulness_ci"]
    faith = _fmt(scores["faithfulness"]) + (f"  95% CI [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")
    table.add_row("faithfulness", faith)
    table.add_row("completeness", _fmt(scores["completeness"]))
    table.add_row("AUROC", _fmt(scores["auroc"]) if gt else "n/a (no ground truth)")
    metric = results["metric"]["name"]
    table.add_row(
        f"metric ({metric})",
        f"full {circuit['metric_full']:.4g}, circuit {circuit['metric_circuit']:.4g}, "
        f"empty {circuit['metric_empty']:.4g}",
    )
    table.add_row("time", f"{seconds:.1f} s")
    table.add_row("report", escape(str(out / "report.html")))
    Console(soft_wrap=False).print(table)


def _record_effective(cfg: Any, inputs: Any) -> None:
    """Write the values a run actually used (metric, example count) into its options."""
    for key, value in (("metric", inputs.metric), ("per_position", inputs.per_position)):
        if cfg.sources[key] != "not used":  # an option of this command
            cfg.values[key] = value
    if inputs.source != "huggingface" or cfg["n_examples"] is not None:
        cfg.values["n_examples"] = inputs.n_examples  # a prompts file: all its lines


def _discover(session: _Session, cfg: Any) -> None:
    from meanablate.cli.inputs import load_inputs
    from meanablate.cli.pipeline import prepare_run_dir, run_discovery, write_run

    progress = not session.quiet
    t = time.perf_counter()
    inputs = load_inputs(cfg, session.log)
    load_s = time.perf_counter() - t
    out = _out_dir(cfg, inputs.name)
    _record_effective(cfg, inputs)
    unused = "target_faithfulness" if cfg["algorithm"] == "acdc" else "threshold"
    if cfg.sources[unused] != "default":
        session.log(
            f"note: {unused.replace('_', '-')} is ignored by --algorithm {cfg['algorithm']}"
        )
    cfg.values[unused] = None
    prepare_run_dir(out, cfg, session.command)
    session.log(f"{inputs.name}: {len(inputs.units)} units, {inputs.n_examples} examples -> {out}")
    results, means = run_discovery(
        cfg,
        inputs,
        progress=progress,
        log=session.log,
        command=session.command,
        timings={"load": load_s},
    )
    session.log("writing results.json and the report")
    write_run(out, results, means, on_results=lambda: setattr(session, "results_written", True))
    _summary(results, out, time.perf_counter() - session.started, inputs.ground_truth)


# -- commands ---------------------------------------------------------------------------------
def _version_callback(value: bool) -> None:
    if value:
        from meanablate import __version__

        print(f"meanablate {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option(
            "--version",
            "-V",
            help="print the version and exit",
            callback=_version_callback,
            is_eager=True,
        ),
    ] = False,
) -> None:
    """Mean ablation and circuit discovery for PyTorch models."""


@app.command()
def demo(
    organism: Organism = None,
    metric: Metric = None,
    per_position: PerPosition = None,
    n_examples: NExamples = None,
    batch_size: BatchSize = None,
    seed: Seed = None,
    method: Method = None,
    algorithm: Algorithm = None,
    threshold: Threshold = None,
    target_faithfulness: TargetFaith = None,
    attribution: Attribution = None,
    n_boot: NBoot = None,
    device: Device = None,
    threads: Threads = None,
    out: Out = None,
    config: Config = None,
    quiet: Quiet = None,
    debug: Debug = False,
) -> None:
    """Find, score and report the circuit of a built-in model whose true circuit is known.

    Loads the organism (default [bold]tracr-sort[/bold]), computes the mean activations,
    sweeps every unit, discovers the circuit (ACDC), scores it against the ground truth
    (faithfulness, completeness, minimality, AUROC), prints a summary and writes the run
    folder: results.json, means.safetensors, config.toml, plots and report.html.

    [bold]Examples[/bold]

      meanablate demo

      meanablate demo --organism tracr-reverse --out runs/reverse

      meanablate demo --algorithm sweep --target-faithfulness 0.99 --quiet
    """
    session = _Session("demo", debug)
    flags = _flags(dict(locals()))
    defaults = {"organism": "tracr-sort"}
    _guarded(session, lambda: _discover(session, session.resolve(flags, defaults)))


@app.command()
def discover(
    organism: Organism = None,
    model: Model = None,
    prompts: Prompts = None,
    units: Units = None,
    ground_truth: GroundTruth = None,
    means: MeansFile = None,
    metric: Metric = None,
    per_position: PerPosition = None,
    n_examples: NExamples = None,
    batch_size: BatchSize = None,
    seed: Seed = None,
    method: Method = None,
    algorithm: Algorithm = None,
    threshold: Threshold = None,
    target_faithfulness: TargetFaith = None,
    attribution: Attribution = None,
    n_boot: NBoot = None,
    device: Device = None,
    threads: Threads = None,
    out: Out = None,
    config: Config = None,
    quiet: Quiet = None,
    debug: Debug = False,
) -> None:
    """Find a circuit: means, sweep, discovery, scores, and a report in the run folder.

    The model is a built-in organism (--organism), a local Hugging Face model directory
    with a prompts file (--model DIR --prompts FILE), or your own Python function
    (--model module:function returning (model, batches[, units])).

    [bold]Examples[/bold]

      meanablate discover --organism induction --algorithm sweep

      meanablate discover --model ./gpt2 --prompts ioi.jsonl --units heads --metric logit_diff

      meanablate discover --model mymodels.py:build --units 'blocks.0.mlp.hook_post\\[neurons=3]'

      meanablate discover --config run.toml --threshold 0.01
    """
    session = _Session("discover", debug)
    flags = _flags(dict(locals()))
    _guarded(session, lambda: _discover(session, session.resolve(flags)))


def _scores_command(session: _Session, flags: dict[str, Any], kind: str) -> None:
    import meanablate as ma
    from meanablate.cli.inputs import load_inputs
    from meanablate.cli.pipeline import (
        compute_or_load_means,
        prepare_run_dir,
        scores_json,
        unit_cis,
        write_means,
    )
    from meanablate.report import write_json_atomic

    cfg = session.resolve(flags)
    inputs = load_inputs(cfg, session.log)
    out = _out_dir(cfg, inputs.name)
    _record_effective(cfg, inputs)
    prepare_run_dir(out, cfg, session.command)
    progress = not session.quiet
    means = compute_or_load_means(cfg, inputs, progress=progress, log=session.log)
    if kind == "means":
        if means is None:
            raise InputError("--method zero needs no means; nothing to compute")
        write_means(means, out / "means.safetensors")
        path = out / "means.safetensors"
        how = "per position, " if means.per_position else ""
        print(f"means of {len(means.keys())} sites ({how}{inputs.n_examples} examples): {path}")
        return
    if means is not None and not cfg["means"]:
        write_means(means, out / "means.safetensors")
    session.log(f"{kind}: {len(inputs.units)} units, metric {inputs.metric}")
    if kind == "sweep":
        scores = ma.sweep(
            inputs.model, inputs.batches, inputs.units, means,
            metric=inputs.metric, method=cfg["method"], progress=progress,
        )  # fmt: skip
    else:
        metric = "loss" if inputs.metric == "accuracy" else inputs.metric
        scores = ma.attribute(
            inputs.model, inputs.batches, inputs.units, means, metric=metric, method=cfg["method"]
        )
    cis = unit_cis(scores.per_example, cfg["n_boot"], cfg["seed"], progress)
    path = write_json_atomic(out / f"{kind}.json", scores_json(scores, cis, cfg))

    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=f"{kind}: top units by |effect| ({scores.metric})", title_justify="left")
    table.add_column("unit", overflow="fold")
    table.add_column("effect", justify="right")
    table.add_column("95% CI", justify="right")
    ci_of = dict(zip(scores.units, cis))
    for u in scores.ranking()[:10]:
        ci = ci_of[u]
        table.add_row(
            escape(u),
            f"{float(scores.values[scores.units.index(u)]):+.4g}",
            f"[{ci[0]:+.3g}, {ci[1]:+.3g}]" if ci else "",
        )
    Console(soft_wrap=False).print(table)
    print(f"{len(scores.units)} units in {scores.seconds:.1f} s: {path}")


@app.command()
def means(
    organism: Organism = None,
    model: Model = None,
    prompts: Prompts = None,
    units: Units = None,
    per_position: PerPosition = None,
    n_examples: NExamples = None,
    batch_size: BatchSize = None,
    seed: Seed = None,
    device: Device = None,
    threads: Threads = None,
    out: Out = None,
    config: Config = None,
    quiet: Quiet = None,
    debug: Debug = False,
) -> None:
    """Compute the dataset mean activation of every unit's site: RUN_DIR/means.safetensors.

    [bold]Examples[/bold]

      meanablate means --organism tracr-sort --out runs/sort

      meanablate means --model ./gpt2 --prompts corpus.txt --units heads --units mlps
    """
    session = _Session("means", debug)
    flags = _flags(dict(locals()))
    _guarded(session, lambda: _scores_command(session, flags, "means"))


@app.command()
def sweep(
    organism: Organism = None,
    model: Model = None,
    prompts: Prompts = None,
    units: Units = None,
    means: MeansFile = None,
    metric: Metric = None,
    per_position: PerPosition = None,
    n_examples: NExamples = None,
    batch_size: BatchSize = None,
    seed: Seed = None,
    method: Method = None,
    n_boot: NBoot = None,
    device: Device = None,
    threads: Threads = None,
    out: Out = None,
    config: Config = None,
    quiet: Quiet = None,
    debug: Debug = False,
) -> None:
    """The exact effect of mean-ablating each unit alone: RUN_DIR/sweep.json.

    [bold]Examples[/bold]

      meanablate sweep --organism tracr-reverse

      meanablate sweep --model ./gpt2 --prompts ioi.jsonl --units neurons:1 --means m.safetensors
    """
    session = _Session("sweep", debug)
    flags = _flags(dict(locals()))
    _guarded(session, lambda: _scores_command(session, flags, "sweep"))


@app.command()
def attribute(
    organism: Organism = None,
    model: Model = None,
    prompts: Prompts = None,
    units: Units = None,
    means: MeansFile = None,
    metric: Metric = None,
    per_position: PerPosition = None,
    n_examples: NExamples = None,
    batch_size: BatchSize = None,
    seed: Seed = None,
    method: Method = None,
    n_boot: NBoot = None,
    device: Device = None,
    threads: Threads = None,
    out: Out = None,
    config: Config = None,
    quiet: Quiet = None,
    debug: Debug = False,
) -> None:
    """Estimate every unit's effect from one backward pass (attribution): RUN_DIR/attribution.json.

    [bold]Examples[/bold]

      meanablate attribute --organism induction

      meanablate attribute --model ./gpt2 --prompts ioi.jsonl --units neurons --metric logit_diff
    """
    session = _Session("attribute", debug)
    flags = _flags(dict(locals()))
    _guarded(session, lambda: _scores_command(session, flags, "attribution"))


@app.command()
def organisms(
    quiet: Quiet = None,
    debug: Debug = False,
) -> None:
    """List the built-in model organisms: task, metric, units and ground-truth circuit.

    [bold]Example[/bold]

      meanablate organisms
    """
    from rich.console import Console
    from rich.markup import escape
    from rich.padding import Padding

    from meanablate.organisms import registry

    console = Console(soft_wrap=False, highlight=False)

    def indented(text: str) -> None:
        console.print(Padding(text, (0, 0, 0, 2), expand=False))

    console.print("[bold]Built-in organisms[/bold] (meanablate demo --organism NAME)\n")
    for name in registry.names():
        try:
            org = registry.load(name)
        except Exception as exc:
            if debug:
                raise
            reason = escape(" ".join(str(exc).split())[:200])
            console.print(
                f"[bold]{name}[/bold]  [dim]not available: {type(exc).__name__}: {reason}[/dim]\n"
            )
            continue
        means = "per-position means" if org.per_position_means else "means over all positions"
        console.print(f"[bold]{name}[/bold]  metric {org.metric}, {len(org.units)} units, {means}")
        task = org.description or str(org.card.get("task", ""))
        indented(escape(task))
        if org.ground_truth:
            gt = ", ".join(org.ground_truth)
            indented(f"ground truth ({len(org.ground_truth)}): " + escape(gt) + "\n")
        else:
            indented("ground truth: unknown\n")


@app.command()
def report(
    run_dir: Annotated[
        Path,
        typer.Argument(
            metavar="RUN_DIR", help="a run folder holding results.json", show_default=False
        ),
    ],
    quiet: Quiet = None,
    debug: Debug = False,
) -> None:
    """Rebuild the plots and report.html of a run folder from its results.json.

    [bold]Example[/bold]

      meanablate report runs/tracr-sort-20250101-120000
    """
    session = _Session("report", debug)

    def body() -> None:
        from meanablate.report import write_report

        if not run_dir.is_dir():
            raise InputError(f"{run_dir}: no such folder")
        if not (run_dir / "results.json").is_file():
            raise InputError(f"{run_dir}: no results.json in this folder")
        try:
            path = write_report(run_dir)
        except ValueError as exc:
            raise InputError(str(exc)) from None
        print(path)

    _guarded(session, body)


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``meanablate`` console script.

    Usage errors (an unknown flag, a value of the wrong type) print one line on stderr
    and exit with code 2, like every other bad input.
    """
    try:
        code = app(args=argv, prog_name="meanablate", standalone_mode=False)
    except KeyboardInterrupt:  # before a command started (inside one, it exits 130 itself)
        print("error: interrupted", file=sys.stderr)
        sys.exit(EXIT_INTERRUPTED)
    except Exception as exc:
        # click's exceptions (typer vendors click, so match them by what they have)
        name = type(exc).__name__
        if name == "Abort":  # Ctrl-C outside a command
            print("error: interrupted", file=sys.stderr)
            sys.exit(EXIT_INTERRUPTED)
        if not (hasattr(exc, "format_message") and hasattr(exc, "exit_code")):
            raise
        ctx = getattr(exc, "ctx", None)
        if name == "NoArgsIsHelpError" and ctx is not None:
            print(ctx.get_help())
            sys.exit(0)
        message = " ".join(exc.format_message().split())
        hint = f" (see `{ctx.command_path} --help`)" if ctx is not None else ""
        print(f"error: {message}{hint}", file=sys.stderr)
        code = exc.exit_code
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
