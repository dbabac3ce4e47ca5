"""Where the work runs: in this process (:class:`LocalExecutor`) or on a Ray cluster.

An executor maps ``fn(model, item)`` over items (shards of data, chunks of a sweep) and
returns the results in the items' order::

    ex = RayExecutor("auto")                  # or RayExecutor() for a local Ray instance
    results = ex.map(fn, items, model=model)  # one model replica per worker

:class:`RayExecutor` ships the model once (``ray.put``) to ``num_workers`` actors, each
holding one replica (on its own GPU when the cluster has GPUs), hands items to whichever
worker is free, and reports progress across workers with tqdm. A worker process that dies
is restarted and its item retried (``max_retries``); nothing partial is ever returned.

``compute_means(model, sites, batches, executor=RayExecutor(...))`` sends data shards to
workers that each return float64 sums and token counts (a :class:`MeanAccumulator`); the
driver merges them in shard order, so the result does not depend on which worker finished
first, and equals the local run to float64 rounding. ``batches`` is either a shardable
source (``meanablate.data.stream_batches(...)``: each worker reads its own byte range of
the file) or any iterable of batches, sent to the workers in chunks as it is read.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import gc
import itertools
import os
import socket
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, Protocol, TypeVar, runtime_checkable

import torch
from torch import Tensor, nn

from meanablate.hooks import capture, model_device, run_model, to_device
from meanablate.stats import MeanAccumulator, Means

__all__ = [
    "Executor",
    "LocalExecutor",
    "RayExecutor",
    "RayPool",
    "WorkerError",
    "WorkerSetupError",
    "merge_shards",
    "shard_means",
]

T = TypeVar("T")
R = TypeVar("R")

RAY_INSTALL_HINT = "RayExecutor needs Ray: pip install 'meanablate[ray]'"


AUTH_HINT = (
    "Clusters started with token authentication (the default of recent Ray) need "
    "RAY_AUTH_MODE=token and the cluster's token (RAY_AUTH_TOKEN, or the file "
    "~/.ray/auth_token copied from the head node) in the driver's environment."
)


class _AuthError(ConnectionError):
    pass


class WorkerError(RuntimeError):
    """A worker died and could not be recovered within its retries."""


class WorkerSetupError(RuntimeError):
    """A worker could not load the model (missing code or dependencies on its node)."""


@runtime_checkable
class Executor(Protocol):
    """Maps ``fn(model, item)`` over items, returning results in the items' order.

    ``in_process``: whether ``fn`` runs in this process (then callers may take a direct
    path); ``num_workers``: how many items run at once.
    """

    in_process: bool
    num_workers: int

    def imap(
        self,
        fn: Callable[[Any, T], R],
        items: Iterable[T],
        *,
        model: Any = None,
        progress: bool = False,
        desc: str = "shards",
        total: int | None = None,
    ) -> Iterator[R]: ...

    def map(
        self,
        fn: Callable[[Any, T], R],
        items: Iterable[T],
        *,
        model: Any = None,
        progress: bool = False,
        desc: str = "shards",
        total: int | None = None,
    ) -> list[R]: ...


def _progress_bar(progress: bool, desc: str, total: int | None) -> Any:
    if not progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="shard")


def _total(items: Iterable[Any], total: int | None) -> int | None:
    if total is not None:
        return total
    try:
        return len(items)  # type: ignore[arg-type]
    except TypeError:
        return None


class LocalExecutor:
    """Runs everything in this process, one item after another (the default)."""

    in_process = True
    num_workers = 1

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
        bar = _progress_bar(progress, desc, _total(items, total))
        try:
            for item in items:
                yield fn(model, item)
                if bar is not None:
                    bar.update(1)
        finally:
            if bar is not None:
                bar.close()

    def map(
        self,
        fn: Callable[[Any, T], R],
        items: Iterable[T],
        *,
        model: Any = None,
        progress: bool = False,
        desc: str = "shards",
        total: int | None = None,
    ) -> list[R]:
        return list(self.imap(fn, items, model=model, progress=progress, desc=desc, total=total))

    def __repr__(self) -> str:
        return "LocalExecutor()"


# -- Ray ----------------------------------------------------------------------------------


def _import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise ImportError(RAY_INSTALL_HINT) from None
    return ray


def _host_port(address: str) -> tuple[str, int]:
    """``host:port`` of a Ray address (GCS ``host:6379`` or client ``ray://host:10001``)."""
    client = address.startswith("ray://")
    rest = address[len("ray://") :] if client else address
    rest = rest.split("/", 1)[0]
    host, sep, port = rest.rpartition(":")
    if not sep:
        return rest, 10001 if client else 6379
    if not port.isdigit():
        raise ValueError(f"bad Ray address {address!r}: the port must be a number")
    return host.strip("[]"), int(port)


def _unreachable(
    address: str, host: str, port: int, reason: str, timeout: float
) -> ConnectionError:
    return ConnectionError(
        f"cannot reach the Ray cluster at {address!r} ({host}:{port}: {reason}; gave up after "
        f"at most {timeout:g} s). Start one with `ray start --head` on the head node and pass "
        "its address (host:6379, or ray://host:10001 for Ray Client), or 'auto' on a node of "
        "the cluster."
    )


def _ask_ray(address: str, host: str, port: int, timeout: float) -> None:
    """One request to the GCS (or the Ray Client server): ``Exception`` if it is not Ray.

    Uses Ray's own clients where this Ray version has them; otherwise it does nothing.
    """
    if address.startswith("ray://"):
        try:
            import grpc
            from ray.core.generated import ray_client_pb2, ray_client_pb2_grpc
        except ImportError:  # Ray without the [client] extra: ray.init will say so
            return
        with grpc.insecure_channel(f"{host}:{port}") as channel:
            stub = ray_client_pb2_grpc.RayletDriverStub(channel)
            request = ray_client_pb2.ClusterInfoRequest(type=ray_client_pb2.ClusterInfoType.PING)
            try:
                stub.ClusterInfo(request, timeout=timeout)
            except grpc.RpcError as exc:
                if exc.code() != grpc.StatusCode.UNAUTHENTICATED:  # a Ray server all the same
                    raise RuntimeError(f"{exc.code().name}: {exc.details()}") from None
        return
    try:
        from ray._raylet import InnerGcsClient
    except ImportError:
        return
    standalone = getattr(InnerGcsClient, "standalone", None)
    if standalone is None:
        return
    try:
        standalone(f"{host}:{port}", None, max(1, int(timeout * 1000)))
    except Exception as exc:
        text = str(exc).lower()
        if "authentication" in text or "authtoken" in text:
            raise _AuthError(
                f"the Ray cluster at {address!r} refused this driver's authentication token. "
                f"{AUTH_HINT}"
            ) from None
        raise


def _probe(address: str, timeout: float) -> None:
    """``ConnectionError`` within about ``timeout`` s unless a Ray cluster answers there.

    A TCP connect first (refused, unroutable); then one request in Ray's protocol, since
    something else may listen on the port. Nothing is initialized by either.
    """
    host, port = _host_port(address)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            pass
    except OSError as exc:
        reason = "timed out" if isinstance(exc, TimeoutError) else str(exc) or type(exc).__name__
        raise _unreachable(address, host, port, reason, timeout) from None
    outcome: list[BaseException | None] = []

    def ask() -> None:
        try:
            _ask_ray(address, host, port, timeout)
            outcome.append(None)
        except BaseException as exc:  # reported to the caller below
            outcome.append(exc)

    thread = threading.Thread(target=ask, name="meanablate-ray-probe", daemon=True)
    thread.start()
    thread.join(timeout + 1.0)
    if not outcome:
        raise _unreachable(address, host, port, "no answer in Ray's protocol", timeout)
    if isinstance(outcome[0], _AuthError):
        raise ConnectionError(str(outcome[0])) from None
    if outcome[0] is not None:
        reason = f"something answers, but not a Ray cluster: {str(outcome[0]).strip()[:200]}"
        raise _unreachable(address, host, port, reason, timeout)


def _cause(exc: BaseException) -> BaseException:
    return getattr(exc, "cause", None) or exc


def _load_error_message(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    # Ray's deserialization errors end with the original traceback: keep its last line.
    last = next((line.strip() for line in reversed(text) if line.strip()), repr(exc))
    return last


class _Replica:
    """A Ray actor (wrapped by ``ray.remote`` lazily) holding one model replica at a time.

    The model comes as ``[ObjectRef]`` with every call: a nested ref is not resolved by
    Ray on the way in and costs nothing to send; the actor loads it on first use and keeps
    it until another model comes or :meth:`drop`. A restarted actor reloads it on retry.
    """

    def __init__(self) -> None:
        self._key: str | None = None
        self._model: Any = None

    def _get_model(self, model_box: list[Any]) -> Any:
        import ray

        key = model_box[0].hex()
        if self._key != key:
            self.drop()
            try:
                model = ray.get(model_box[0])
            except Exception as exc:
                node = ray.util.get_node_ip_address()
                raise WorkerSetupError(
                    f"a Ray worker on node {node} could not load the model: "
                    f"{_load_error_message(exc)}. Every node needs the model's code and "
                    "dependencies (and meanablate) installed in the Python that Ray runs; "
                    "install them there, or pass RayExecutor(runtime_env={'pip': [...], "
                    "'py_modules': [...]})."
                ) from None
            if isinstance(model, nn.Module) and ray.get_gpu_ids() and torch.cuda.is_available():
                model = model.to("cuda")
            self._key, self._model = key, model
        return self._model

    def ready(self, model_box: list[Any]) -> dict[str, Any]:
        import ray

        model = self._get_model(model_box)
        device = str(model_device(model)) if isinstance(model, nn.Module) else "cpu"
        return {"pid": os.getpid(), "node": ray.util.get_node_ip_address(), "device": device}

    def run(self, model_box: list[Any], fn: Callable[[Any, Any], Any], item: Any) -> Any:
        return fn(self._get_model(model_box), item)

    def drop(self) -> None:
        if self._model is not None:
            self._key = self._model = None
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()


def _cpu_copy(model: Any) -> Any:
    # A CUDA model would unpickle onto CUDA (absent on CPU workers): ship a CPU copy.
    if isinstance(model, nn.Module) and model_device(model).type != "cpu":
        return copy.deepcopy(model).to("cpu")
    return model


class RayPool:
    """The executor's workers, each holding a replica of one model (see ``replicas``)."""

    def __init__(self, ray: Any, actors: list[Any], box: list[Any], max_retries: int) -> None:
        self._ray, self.actors, self._box, self._max_retries = ray, actors, box, max_retries
        self.info: list[dict[str, Any]] = []

    def imap(
        self,
        fn: Callable[[Any, T], R],
        items: Iterable[T],
        *,
        progress: bool = False,
        desc: str = "shards",
        total: int | None = None,
    ) -> Iterator[R]:
        """``fn(model, item)`` on whichever worker is free; results in the items' order."""
        ray = self._ray
        window = 2 * len(self.actors)  # items dispatched but not yet yielded, at most
        idle = list(self.actors)
        pending: dict[Any, tuple[int, Any]] = {}  # ref -> (item index, actor)
        done: dict[int, Any] = {}
        it = iter(items)
        exhausted = False
        dispatched = next_out = 0
        bar = _progress_bar(progress, desc, _total(items, total))
        try:
            while True:
                while idle and not exhausted and dispatched - next_out < window:
                    try:
                        item = next(it)
                    except StopIteration:
                        exhausted = True
                        break
                    actor = idle.pop()
                    pending[actor.run.remote(self._box, fn, item)] = (dispatched, actor)
                    dispatched += 1
                while next_out in done:
                    yield done.pop(next_out)
                    next_out += 1
                if not pending:
                    if exhausted:
                        return
                    continue
                ready, _ = ray.wait(list(pending), num_returns=1)
                for ref in ready:
                    i, actor = pending.pop(ref)
                    try:
                        done[i] = ray.get(ref)
                    except ray.exceptions.RayActorError as exc:
                        raise WorkerError(
                            f"a Ray worker died running item {i} and could not be recovered "
                            f"within max_retries={self._max_retries}: "
                            f"{_load_error_message(exc)}"
                        ) from None
                    except ray.exceptions.RayTaskError as exc:
                        cause = _cause(exc)
                        if isinstance(cause, WorkerSetupError):
                            raise WorkerSetupError(str(cause)) from None
                        raise
                    idle.append(actor)
                    if bar is not None:
                        bar.update(1)
        finally:
            for ref in pending:  # stop what is queued; nothing partial is returned
                with contextlib.suppress(Exception):
                    ray.cancel(ref)
            if bar is not None:
                bar.close()

    def map(
        self,
        fn: Callable[[Any, T], R],
        items: Iterable[T],
        *,
        progress: bool = False,
        desc: str = "shards",
        total: int | None = None,
    ) -> list[R]:
        return list(self.imap(fn, items, progress=progress, desc=desc, total=total))


class RayExecutor:
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
            _probe(self.address, self.connect_timeout)
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
        return self._ray.remote(_Replica).options(**options).remote()

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
                    cause = _cause(exc)
                    msg = (
                        str(cause)
                        if isinstance(cause, WorkerSetupError)
                        else (f"a Ray worker could not start: {_load_error_message(exc)}")
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
        box = [ray.put(_cpu_copy(model))]
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

    def map(
        self,
        fn: Callable[[Any, T], R],
        items: Iterable[T],
        *,
        model: Any = None,
        progress: bool = False,
        desc: str = "shards",
        total: int | None = None,
    ) -> list[R]:
        return list(self.imap(fn, items, model=model, progress=progress, desc=desc, total=total))


# -- means on shards ----------------------------------------------------------------------


def shard_means(
    model: nn.Module,
    batches: Iterable[Tensor | Mapping[str, Any]],
    *,
    keys: Sequence[str],
    per_position: bool = False,
) -> tuple[MeanAccumulator, int]:
    """Float64 sums and token counts at ``keys`` over ``batches`` (runs on a worker).

    Returns the accumulator and the number of batches (0 for an empty shard).
    """
    acc = MeanAccumulator(per_position)
    device = model_device(model)
    n = 0
    with torch.inference_mode(), capture(model, list(keys)) as store:
        for batch in batches:
            batch = to_device(batch, device)
            mask = batch.get("attention_mask") if isinstance(batch, Mapping) else None
            store.clear()
            run_model(model, batch)
            for key in keys:
                if key not in store:
                    raise ValueError(f"site {key} did not run during the forward pass")
                acc.add(key, store[key], mask)
            n += 1
    return acc, n


def _shape_of(acc: MeanAccumulator, key: str) -> tuple[int, ...]:
    shape = tuple(acc.sums[key].shape)
    return shape[1:] if acc.per_position else shape


def merge_shards(
    results: Iterable[tuple[MeanAccumulator, int]],
    keys: Sequence[str],
    *,
    per_position: bool = False,
    into: MeanAccumulator | None = None,
) -> tuple[MeanAccumulator, int]:
    """Merge workers' ``(accumulator, n_batches)`` in order, checking sites and shapes.

    A shard with other sites, or another activation shape than the first non-empty shard,
    is a ``ValueError`` naming both shards.
    """
    acc = into if into is not None else MeanAccumulator(per_position)
    if acc.per_position != per_position:
        raise ValueError("the accumulator's per_position differs from compute_means's")
    want = set(keys)
    first: dict[str, tuple[int, tuple[int, ...]]] = {}
    n_batches = 0
    for i, (part, n) in enumerate(results):
        if not isinstance(part, MeanAccumulator):
            raise TypeError(f"shard {i} returned {type(part).__name__}, not a MeanAccumulator")
        if part.per_position != per_position:
            raise ValueError(
                f"shard {i}: per_position={part.per_position}, expected {per_position}"
            )
        got = set(part.sums)
        if n and got != want:
            raise ValueError(
                f"shard {i} returned sums for sites {sorted(got)}, expected {sorted(want)}: "
                "every worker must run the same model and sites"
            )
        for key in sorted(got):
            shape = _shape_of(part, key)
            j, seen = first.setdefault(key, (i, shape))
            if seen != shape:
                raise ValueError(
                    f"site {key}: shard {i} gave activation shape {shape} but shard {j} gave "
                    f"{seen}; every worker must run the same model, and the site's shape must "
                    "not depend on the data (e.g. on the sequence length)"
                )
        acc.merge(part)
        n_batches += n
    return acc, n_batches


def _chunks(batches: Iterable[Any], size: int) -> Iterator[list[Any]]:
    cpu = torch.device("cpu")
    it = iter(batches)
    while chunk := list(itertools.islice(it, size)):
        yield [to_device(b, cpu) if isinstance(b, (Tensor, Mapping)) else b for b in chunk]


def sharded_means(
    executor: Executor,
    model: nn.Module,
    keys: Sequence[str],
    batches: Iterable[Tensor | Mapping[str, Any]],
    *,
    per_position: bool = False,
    progress: bool = False,
    accumulator: MeanAccumulator | None = None,
) -> Means:
    """``compute_means`` through ``executor``: shard sums on workers, merged here.

    A source with ``.shard(i, k)`` (see :mod:`meanablate.data`) is split into
    ``executor.num_shards`` parts that the workers read themselves; any other iterable is
    read here and sent in chunks of ``executor.chunk_batches`` batches.
    """
    fn = functools.partial(shard_means, keys=tuple(keys), per_position=per_position)
    shard = getattr(batches, "shard", None)
    total: int | None
    if callable(shard) and getattr(batches, "num_shards", 1) == 1:
        k = int(getattr(executor, "num_shards", executor.num_workers))
        items: Iterable[Any] = [shard(i, k) for i in range(k)]
        total = k
    else:
        size = int(getattr(executor, "chunk_batches", 8))
        items = _chunks(batches, size)
        n = _total(batches, None)
        total = None if n is None else -(-n // size)
    results = executor.imap(fn, items, model=model, progress=progress, desc="means", total=total)
    acc, n_batches = merge_shards(results, keys, per_position=per_position, into=accumulator)
    if n_batches == 0:
        raise ValueError("compute_means got no batches")
    meta = {
        "model_class": type(model).__name__,
        "activation_shapes": {k: list(_shape_of(acc, k)) for k in keys},
        "batches": n_batches,
    }
    return acc.result(meta)
