"""One-line errors and exit codes: a command's session (its options, a stderr logger) and
:func:`guarded`, which turns what a command raises into one line on stderr and an exit code."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import typer

from meanablate.config import OPTIONS, InputError, load_config, resolve
from meanablate.errors import MeanAblateError

__all__ = ["EXIT_INPUT", "EXIT_INTERRUPTED", "Session", "flags_of", "guarded", "one_line"]

EXIT_INPUT = 2
EXIT_INTERRUPTED = 130


def one_line(exc: BaseException) -> str:
    """An exception's message on one line."""
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


class Session:
    """Resolved options, a stderr logger, and one-line error handling."""

    def __init__(self, command: str, debug: bool) -> None:
        self.command = command
        self.debug = debug
        self.quiet = False
        self.results_written = False
        self.started = time.perf_counter()
        # What the run changed in process-wide state (third-party logging), undone on exit.
        self.cleanup = contextlib.ExitStack()

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
        if self.quiet:
            self.cleanup.enter_context(quiet_libraries())
        for item in cfg.ignored:
            self.log(f"note: {item} is not an option of `meanablate {self.command}`; ignored")
        return cfg

    def fail(self, message: str, code: int) -> typer.Exit:
        print(f"error: {' '.join(message.split())}", file=sys.stderr, flush=True)
        return typer.Exit(code)


def guarded(session: Session, body: Callable[[], Any]) -> None:
    """Run ``body()``: bad input exits 2, Ctrl-C 130, anything else 1, each one line."""
    import torch

    # A run changes process-wide state (torch threads, third-party logging): restore it,
    # so that calling the app in process (tests, notebooks) leaves no trace.
    threads = torch.get_num_threads()
    try:
        body()
    except typer.Exit:
        raise
    except (InputError, MeanAblateError) as exc:  # bad input, ours or the library's contract
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
        session.cleanup.close()


# Libraries whose own logs, warnings and progress bars ``-q`` silences.
_LIBRARIES = ("transformers", "transformer_lens", "huggingface_hub", "datasets", "accelerate")
_QUIET_ENV = {"TRANSFORMERS_VERBOSITY": "error", "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1"}


@contextlib.contextmanager
def quiet_libraries() -> Iterator[None]:
    """Silence transformers', TransformerLens' (and the HF hub's) messages and progress bars.

    Their loggers go to ERROR, their Python warnings are ignored, and transformers'
    progress bars are switched off — each put back as it was on exit. Progress bars are
    re-enabled only if they were on before: enabling them when ``HF_HUB_DISABLE_PROGRESS_BARS``
    is set makes huggingface_hub print a warning after the run.
    """
    levels = {name: logging.getLogger(name).level for name in _LIBRARIES}
    env = {k: os.environ.get(k) for k in _QUIET_ENV}
    tf = sys.modules.get("transformers")
    bars_were_on = tf is not None and tf.utils.logging.is_progress_bar_enabled()
    with warnings.catch_warnings():
        for name in _LIBRARIES:
            warnings.filterwarnings("ignore", module=rf"{name}(\..*)?$")
        os.environ.update(_QUIET_ENV)  # read by transformers if it is imported during the run
        for name in _LIBRARIES:
            logging.getLogger(name).setLevel(logging.ERROR)
        if tf is not None:
            tf.utils.logging.disable_progress_bar()
        else:
            os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
            env.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", None)
        try:
            yield
        finally:
            for name, level in levels.items():
                logging.getLogger(name).setLevel(level)
            for key, value in env.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
            if bars_were_on:
                tf.utils.logging.enable_progress_bar()  # type: ignore[union-attr]


def flags_of(local: dict[str, Any]) -> dict[str, Any]:
    """A command's option values from its ``locals()`` (the options and ``config``)."""
    return {k: v for k, v in local.items() if k in OPTIONS or k == "config"}
