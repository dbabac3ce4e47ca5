"""The Ray workers: actors holding a model replica, the pool of them, and their errors."""

from __future__ import annotations

import contextlib
import copy
import gc
import os
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

import torch
from torch import nn

from meanablate.executors.base import progress_bar, total_of
from meanablate.hooks import model_device

__all__ = ["RayPool", "WorkerError", "WorkerSetupError"]

T = TypeVar("T")
R = TypeVar("R")


class WorkerError(RuntimeError):
    """A worker died and could not be recovered within its retries."""


class WorkerSetupError(RuntimeError):
    """A worker could not load the model (missing code or dependencies on its node)."""


def cause_of(exc: BaseException) -> BaseException:
    return getattr(exc, "cause", None) or exc


def load_error_message(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    # Ray's deserialization errors end with the original traceback: keep its last line.
    last = next((line.strip() for line in reversed(text) if line.strip()), repr(exc))
    return last


class Replica:
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
                    f"{load_error_message(exc)}. Every node needs the model's code and "
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


def cpu_copy(model: Any) -> Any:
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
        bar = progress_bar(progress, desc, total_of(items, total))
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
                            f"{load_error_message(exc)}"
                        ) from None
                    except ray.exceptions.RayTaskError as exc:
                        cause = cause_of(exc)
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
