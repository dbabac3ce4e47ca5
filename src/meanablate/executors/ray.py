"""Running items on a Ray cluster: :class:`RayExecutor`."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, TypeVar

from meanablate.executors.base import Executor
from meanablate.executors.probe import AUTH_HINT, probe
from meanablate.executors.workers import (
    RayPool,
    Replica,
    WorkerError,
    WorkerSetupError,
    cause_of,
    cpu_copy,
    load_error_message,
)

__all__ = ["RayExecutor"]

T = TypeVar("T")
R = TypeVar("R")

RAY_INSTALL_HINT = "RayExecutor needs Ray: pip install 'meanablate[ray]'"


def _import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise ImportError(RAY_INSTALL_HINT) from None
    return ray


class RayExecutor(Executor):
    """Runs items on a Ray cluster: one model replica per worker, items retried on failure.

    ``address``: ``None`` (Ray's default: ``RAY_ADDRESS``, else a new local instance),
    ``"auto"`` (the cluster this node belongs to, from ``ray start``), ``"host:6379"`` or
    ``"ray://host:10001"`` (Ray Client). An unreachable address is a ``ConnectionError``
    within ``connect_timeout`` seconds. If Ray is already initialized in this process, its
    connection is used.

    ``num_workers``: actors to start (default: one per GPU when the cluster has GPUs, else
    one per CPU). ``num_gpus_per_worker``: default 1 when the cluster has GPUs, else 0.
    ``max_retries``: restarts of a worker process that dies (its item is retried each
    time). The workers start on first use and stay up, holding no model between calls,
    until :meth:`shutdown` (or the executor is garbage collected). For ``compute_means``:
    a shardable source is split into ``shards_per_worker`` shards per worker; a plain
    iterable of batches is sent in items of ``chunk_batches`` batches.
    """

    in_process = False

    def __init__(
        self,
        address: str | None = None,
        *,
        num_workers: int | None = None,
        num_cpus_per_worker: float = 1,
        num_gpus_per_worker: float | None = None,
        max_retries: int = 3,
        shards_per_worker: int = 4,
        chunk_batches: int = 8,
        connect_timeout: float = 10.0,
        startup_timeout: float = 300.0,
        runtime_env: Mapping[str, Any] | None = None,
        init_kwargs: Mapping[str, Any] | None = None,
    ) -> None:
        if num_workers is not None and num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {num_workers}")
        if max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {max_retries}")
        if shards_per_worker < 1 or chunk_batches < 1:
            raise ValueError("shards_per_worker and chunk_batches must be >= 1")
        self.address = address
        self._num_workers = num_workers
        self.num_cpus_per_worker = num_cpus_per_worker
        self.num_gpus_per_worker = num_gpus_per_worker
        self.max_retries = max_retries
        self.shards_per_worker = shards_per_worker
        self.chunk_batches = chunk_batches
        self.connect_timeout = connect_timeout
        self.startup_timeout = startup_timeout
        self.runtime_env = dict(runtime_env) if runtime_env is not None else None
        self.init_kwargs = dict(init_kwargs or {})
        self._ray: Any = None
        self._started_ray = False
        self._gpus_per_worker: float = 0
        self._actors: list[Any] = []
        self._dropping: list[Any] = []

    def __repr__(self) -> str:
        return f"RayExecutor(address={self.address!r}, num_workers={self._num_workers})"

    # -- connection ----------------------------------------------------------------------

    def connect(self) -> RayExecutor:
        """Connect to (or start) the cluster now; otherwise the first use does it."""
        ray = _import_ray()
        if self.address not in (None, "auto", "local"):
            probe(self.address, self.connect_timeout)
        if not ray.is_initialized():
            try:
                ray.init(address=self.address, **self.init_kwargs)
            except ConnectionError as exc:
                raise ConnectionError(
                    f"cannot connect to the Ray cluster at {self.address!r}: {exc}. {AUTH_HINT}"
                ) from None
            self._started_ray = True
        self._ray = ray
        gpus = float(ray.cluster_resources().get("GPU", 0))
        if self.num_gpus_per_worker is not None:
            self._gpus_per_worker = self.num_gpus_per_worker
        else:  # a GPU per worker where the cluster has GPUs (Ray found CUDA devices)
            self._gpus_per_worker = 1 if gpus >= 1 else 0
        if self._gpus_per_worker > gpus:
            raise ValueError(
                f"num_gpus_per_worker={self._gpus_per_worker} but the cluster has {gpus:g} GPUs"
            )
        return self

    def _connected(self) -> Any:
        if self._ray is None or not self._ray.is_initialized():
            self._actors = []
            self.connect()
        return self._ray

    @property
    def num_workers(self) -> int:
        if self._num_workers is not None:
            return self._num_workers
        resources = self._connected().cluster_resources()
        if self._gpus_per_worker:
            n = resources.get("GPU", 0) // self._gpus_per_worker
        else:
            n = resources.get("CPU", 1) // max(self.num_cpus_per_worker, 1e-9)
        return max(1, int(n))

    @property
    def num_shards(self) -> int:
        """Shards a shardable source is split into for ``compute_means``."""
        return self.num_workers * self.shards_per_worker

    def shutdown(self) -> None:
        """Stop the workers, and Ray itself if this executor started it."""
        ray, self._ray = self._ray, None
        if ray is not None and self._dropping:
            with contextlib.suppress(Exception):
                ray.wait(self._dropping, num_returns=len(self._dropping), timeout=5)
        self._dropping = []
        for actor in self._actors:
            with contextlib.suppress(Exception):
                ray.kill(actor, no_restart=True)
        self._actors = []
        if self._started_ray and ray is not None:
            ray.shutdown()
        self._started_ray = False

    def __enter__(self) -> RayExecutor:
        return self.connect()

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    # -- workers -------------------------------------------------------------------------

    def _new_actor(self) -> Any:
        options: dict[str, Any] = {
            "num_cpus": self.num_cpus_per_worker,
            "num_gpus": self._gpus_per_worker,
            "max_restarts": self.max_retries,
            "max_task_retries": self.max_retries,
        }
        if self.runtime_env is not None:
            options["runtime_env"] = self.runtime_env
        return self._ray.remote(Replica).options(**options).remote()

    def _load_everywhere(self, box: list[Any]) -> list[dict[str, Any]]:
        """Start missing workers, replace dead ones, and load the model on each."""
        ray = self._ray
        n = self.num_workers
        total = ray.cluster_resources()
        for name, each in (("CPU", self.num_cpus_per_worker), ("GPU", self._gpus_per_worker)):
            if each and n * each > total.get(name, 0):
                raise ValueError(
                    f"{n} workers with {each:g} {name} each need {n * each:g} {name}s; the "
                    f"cluster has {total.get(name, 0):g}. Ask for fewer workers (or "
                    f"num_{name.lower()}s_per_worker=...), or add nodes."
                )
        while len(self._actors) < n:
            self._actors.append(self._new_actor())
        for attempt in range(2):
            refs = [a.ready.remote(box) for a in self._actors]
            ray.wait(refs, num_returns=len(refs), timeout=self.startup_timeout)
            info: list[dict[str, Any]] = []
            dead = []
            for i, ref in enumerate(refs):
                try:
                    info.append(ray.get(ref, timeout=0))
                except ray.exceptions.GetTimeoutError:
                    raise TimeoutError(
                        f"could not start {n} Ray workers (num_cpus={self.num_cpus_per_worker},"
                        f" num_gpus={self._gpus_per_worker} each) within "
                        f"{self.startup_timeout:g} s; available: {ray.available_resources()}."
                        " Ask for fewer workers or add nodes."
                    ) from None
                except ray.exceptions.RayActorError:
                    dead.append(i)
                except Exception as exc:
                    cause = cause_of(exc)
                    msg = (
                        str(cause)
                        if isinstance(cause, WorkerSetupError)
                        else (f"a Ray worker could not start: {load_error_message(exc)}")
                    )
                    raise WorkerSetupError(msg) from None
            if not dead:
                return info
            if attempt == 0:  # workers that died for good in an earlier run: replace them
                for i in dead:
                    self._actors[i] = self._new_actor()
        raise WorkerError(f"{len(dead)} Ray workers died while loading the model")

    @contextlib.contextmanager
    def replicas(self, model: Any) -> Iterator[RayPool]:
        """The workers, each holding a replica of ``model``, for several ``imap`` calls::

        with ex.replicas(model) as pool:
            a = pool.map(fn, items)
            b = pool.map(fn, more_items)

        The model is sent once (``ray.put``) and loaded once per worker; on leaving the
        block the workers drop it.
        """
        ray = self._connected()
        box = [ray.put(cpu_copy(model))]
        try:
            info = self._load_everywhere(box)
            pool = RayPool(ray, list(self._actors), box, self.max_retries)
            pool.info = info
            yield pool
        finally:
            for actor in self._actors:
                with contextlib.suppress(Exception):
                    self._dropping.append(actor.drop.remote())

    def imap(
        self,
        fn: Callable[[Any, T], R],
        items: Iterable[T],
        *,
        model: Any = None,
        progress: bool = False,
        desc: str = "shards",
        total: int | None = None,
    ) -> Iterator[R]:
        """``fn(model, item)`` on the workers, yielded in the items' order.

        ``items`` is consumed lazily (a bounded number in flight); ``fn`` and the items
        must pickle. A failure raises here and stops the run: no partial results.
        """
        with self.replicas(model) as pool:
            yield from pool.imap(fn, items, progress=progress, desc=desc, total=total)
