"""The typer application: ``demo``, ``organisms``, ``means``, ``sweep``, ``attribute``,
``discover`` and ``report`` (see :mod:`meanablate.cli` for an overview)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from meanablate.cli.errors import EXIT_INTERRUPTED, Session, flags_of, guarded
from meanablate.cli.options import (
    AbsThreshold,
    Algorithm,
    Attribution,
    BatchSize,
    Command,
    Config,
    Debug,
    Device,
    DryRun,
    Force,
    ForceDiscovery,
    GroundTruth,
    Group,
    KeepPositions,
    MaxExhaustive,
    MeanKind,
    MeansFile,
    Method,
    Metric,
    Model,
    NBoot,
    NExamples,
    Organism,
    Out,
    PerPosition,
    Prompts,
    Quiet,
    Ray,
    RayWorkers,
    Seed,
    TargetFaith,
    Threads,
    Threshold,
    Units,
)
from meanablate.config import InputError

__all__ = ["app", "main"]

app = typer.Typer(
    name="meanablate",
    cls=Group,
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


def _run(command: str, debug: bool, local: dict[str, Any], defaults: Any = None) -> None:
    """Resolve a run command's options (``local``: its ``locals()``) and run it, guarded."""
    from meanablate.cli.runs import run_discover, run_scores

    session = Session(command, debug)
    body = run_discover if command in ("demo", "discover") else run_scores
    if command == "edges":
        from meanablate.cli.edges import run_edges_command as body
    flags = flags_of(local)
    guarded(session, lambda: body(session, session.resolve(flags, defaults)))


# -- commands ---------------------------------------------------------------------------------
@app.command(cls=Command)
def demo(
    organism: Organism = None,
    metric: Metric = None,
    per_position: PerPosition = None,
    mean_kind: MeanKind = None,
    keep_positions: KeepPositions = None,
    n_examples: NExamples = None,
    batch_size: BatchSize = None,
    seed: Seed = None,
    method: Method = None,
    algorithm: Algorithm = None,
    threshold: Threshold = None,
    target_faithfulness: TargetFaith = None,
    abs_threshold: AbsThreshold = None,
    force_discovery: ForceDiscovery = None,
    max_exhaustive: MaxExhaustive = None,
    attribution: Attribution = None,
    n_boot: NBoot = None,
    device: Device = None,
    threads: Threads = None,
    ray: Ray = None,
    ray_workers: RayWorkers = None,
    out: Out = None,
    force: Force = None,
    config: Config = None,
    quiet: Quiet = None,
    dry_run: DryRun = None,
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
    _run("demo", debug, dict(locals()), {"organism": "tracr-sort"})


@app.command(cls=Command)
def discover(
    organism: Organism = None,
    model: Model = None,
    prompts: Prompts = None,
    units: Units = None,
    ground_truth: GroundTruth = None,
    means: MeansFile = None,
    metric: Metric = None,
    per_position: PerPosition = None,
    mean_kind: MeanKind = None,
    keep_positions: KeepPositions = None,
    n_examples: NExamples = None,
    batch_size: BatchSize = None,
    seed: Seed = None,
    method: Method = None,
    algorithm: Algorithm = None,
    threshold: Threshold = None,
    target_faithfulness: TargetFaith = None,
    abs_threshold: AbsThreshold = None,
    force_discovery: ForceDiscovery = None,
    max_exhaustive: MaxExhaustive = None,
    attribution: Attribution = None,
    n_boot: NBoot = None,
    device: Device = None,
    threads: Threads = None,
    ray: Ray = None,
    ray_workers: RayWorkers = None,
    out: Out = None,
    force: Force = None,
    config: Config = None,
    quiet: Quiet = None,
    dry_run: DryRun = None,
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
    _run("discover", debug, dict(locals()))


@app.command(cls=Command)
def edges(
    organism: Organism = None,
    model: Model = None,
    prompts: Prompts = None,
    metric: Metric = None,
    per_position: PerPosition = None,
    n_examples: NExamples = None,
    batch_size: BatchSize = None,
    seed: Seed = None,
    method: Method = None,
    algorithm: Algorithm = None,
    threshold: Threshold = None,
    target_faithfulness: TargetFaith = None,
    device: Device = None,
    threads: Threads = None,
    out: Out = None,
    config: Config = None,
    quiet: Quiet = None,
    debug: Debug = False,
) -> None:
    """Find an edge circuit (component -> component edges, q/k/v split): RUN_DIR/edges.json,
    circuit.dot and mib_circuit.json (MIB's circuit format).

    --algorithm acdc (ACDC over edges), sweep (exact edge sweep, then prune), attribution
    (EAP), attribute_verify; --method mean, zero or resample (corrupted inputs).

    [bold]Examples[/bold]

      meanablate edges --organism tracr-reverse --metric kl --threshold 1e-4

      meanablate edges --organism induction --algorithm attribution --method resample
    """
    _run("edges", debug, dict(locals()))


@app.command(cls=Command)
def means(
    organism: Organism = None,
    model: Model = None,
    prompts: Prompts = None,
    units: Units = None,
    per_position: PerPosition = None,
    mean_kind: MeanKind = None,
    keep_positions: KeepPositions = None,
    n_examples: NExamples = None,
    batch_size: BatchSize = None,
    seed: Seed = None,
    device: Device = None,
    threads: Threads = None,
    ray: Ray = None,
    ray_workers: RayWorkers = None,
    out: Out = None,
    force: Force = None,
    config: Config = None,
    quiet: Quiet = None,
    debug: Debug = False,
) -> None:
    """Compute the dataset mean activation of every unit's site: RUN_DIR/means.safetensors.

    [bold]Examples[/bold]

      meanablate means --organism tracr-sort --out runs/sort

      meanablate means --model ./gpt2 --prompts corpus.txt --units heads --units mlps
    """
    _run("means", debug, dict(locals()))


def _scores_command(command: str) -> Any:
    """The command function of ``sweep`` or ``attribute``: they take the same options."""

    def run_command(
        organism: Organism = None,
        model: Model = None,
        prompts: Prompts = None,
        units: Units = None,
        means: MeansFile = None,
        metric: Metric = None,
        per_position: PerPosition = None,
        mean_kind: MeanKind = None,
        keep_positions: KeepPositions = None,
        n_examples: NExamples = None,
        batch_size: BatchSize = None,
        seed: Seed = None,
        method: Method = None,
        n_boot: NBoot = None,
        device: Device = None,
        threads: Threads = None,
        ray: Ray = None,
        ray_workers: RayWorkers = None,
        out: Out = None,
        force: Force = None,
        config: Config = None,
        quiet: Quiet = None,
        dry_run: DryRun = None,
        debug: Debug = False,
    ) -> None:
        _run(command, debug, dict(locals()))

    return run_command


_SWEEP_HELP = """The exact effect of mean-ablating each unit alone: RUN_DIR/sweep.json.

[bold]Examples[/bold]

  meanablate sweep --organism tracr-reverse

  meanablate sweep --model ./gpt2 --prompts ioi.jsonl --units neurons:1 --means m.safetensors
"""
_ATTRIBUTE_HELP = """Estimate every unit's effect from one backward pass (attribution): \
RUN_DIR/attribution.json.

[bold]Examples[/bold]

  meanablate attribute --organism induction

  meanablate attribute --model ./gpt2 --prompts ioi.jsonl --units neurons --metric logit_diff
"""
sweep = app.command("sweep", cls=Command, help=_SWEEP_HELP)(_scores_command("sweep"))
attribute = app.command("attribute", cls=Command, help=_ATTRIBUTE_HELP)(
    _scores_command("attribute")
)


@app.command(cls=Command)
def tracr(
    program: Annotated[str, typer.Argument(help="module:name or file.py:name (a RASP SOp)")],
    vocab: Annotated[str, typer.Option("--vocab", help="input values, comma-separated")],
    max_seq_len: Annotated[int, typer.Option("--max-seq-len", min=1, help="input length")],
    out: Annotated[Path, typer.Option("--out", "-o", help="folder for the organism")] = Path("."),
    name: Annotated[str | None, typer.Option("--name", help="organism name")] = None,
    causal: Annotated[bool, typer.Option("--causal", help="compile causally")] = False,
    sample: Annotated[
        int | None, typer.Option("--sample", min=1, help="use N random inputs")
    ] = None,
    max_inputs: Annotated[
        int, typer.Option("--max-inputs", min=1, help="most inputs to enumerate")
    ] = 20_000,
    target_faithfulness: Annotated[
        float,
        typer.Option("--target-faithfulness", help="what a minimal circuit must reach, in (0, 1]"),
    ] = 0.95,
    metric: Annotated[
        str | None,
        typer.Option(
            "--metric",
            help="the organism's metric: kl (categorical default), accuracy, loss; mse (numerical)",
        ),
    ] = None,
    quiet: Quiet = None,
    debug: Debug = False,
) -> None:
    """Compile your own tracr RASP program into an organism with a computed ground truth.

    Checks the compiled model against tracr on every input, computes the minimal circuits
    for every mean kind by brute force, and writes OUT/NAME.safetensors and OUT/NAME.json.

    [bold]Example[/bold]

      meanablate tracr tracr.compiler.lib:make_hist --vocab a,b,c --max-seq-len 5 -o hist
    """
    from meanablate.cli.tracr import run_tracr

    session = Session("tracr", debug)
    session.quiet = bool(quiet)
    guarded(
        session,
        lambda: run_tracr(
            program, vocab, max_seq_len, out=out, name=name, causal=causal, sample=sample,
            max_inputs=max_inputs, target_faithfulness=target_faithfulness, metric=metric,
            log=session.log,
        ),
    )  # fmt: skip


@app.command(cls=Command)
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


@app.command(cls=Command)
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
    session = Session("report", debug)

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

    guarded(session, body)


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
