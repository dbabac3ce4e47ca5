"""One-line errors and exit codes: a command's session (its options, a stderr logger) and
:func:`guarded`, which turns what a command raises into one line on stderr and an exit code."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import typer

from meanablate.config import OPTIONS, InputError, load_config, resolve

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


def guarded(session: Session, body: Callable[[], Any]) -> None:
    """Run ``body()``: bad input exits 2, Ctrl-C 130, anything else 1, each one line."""
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


def flags_of(local: dict[str, Any]) -> dict[str, Any]:
    """A command's option values from its ``locals()`` (the options and ``config``)."""
    return {k: v for k, v in local.items() if k in OPTIONS or k == "config"}
