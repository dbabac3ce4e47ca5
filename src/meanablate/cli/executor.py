"""``--ray ADDRESS`` (and ``--ray-workers N``): the executor that a command's means, sweep and
attribution run on (:class:`meanablate.executors.RayExecutor`), or ``None`` to run here."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from meanablate.cli.errors import one_line
from meanablate.cli.records import Log, quiet_log
from meanablate.config import InputError, Resolved, subject

__all__ = ["RAY_HINT", "ray_executor"]

RAY_HINT = "pip install 'meanablate[ray]'"


@contextlib.contextmanager
def ray_executor(cfg: Resolved, log: Log = quiet_log) -> Iterator[Any]:
    """The Ray executor the options ask for, connected (``None`` without ``--ray``).

    Connects before anything is loaded, so that an unreachable address or a missing Ray is
    one line (an :class:`InputError`) at once. ``local`` starts a Ray instance on this
    machine (with ``--ray-workers N``: N CPUs); the workers and any Ray instance started
    here are stopped on leaving the block.
    """
    address, workers = cfg["ray"], cfg["ray_workers"]
    if address is None:
        if workers is not None:
            who = subject("ray_workers", cfg.sources["ray_workers"])
            raise InputError(f"{who} needs --ray ADDRESS (a Ray cluster, auto or local)")
        yield None
        return
    who = subject("ray", cfg.sources["ray"])
    from meanablate.executors import RayExecutor

    init: dict[str, Any] = {}
    if cfg["quiet"]:
        init["log_to_driver"] = False
    if address == "local":
        init["include_dashboard"] = False
        if workers is not None:
            init["num_cpus"] = workers
    executor = RayExecutor(address, num_workers=workers, init_kwargs=init)
    try:
        executor.connect()
        log(f"ray: {address}, {executor.num_workers} workers")
    except ImportError:
        raise InputError(f"{who} needs Ray, which is not installed: {RAY_HINT}") from None
    except (ConnectionError, ValueError) as exc:
        executor.shutdown()
        raise InputError(f"{who} {address}: {one_line(exc)}") from None
    try:
        yield executor
    finally:
        executor.shutdown()
