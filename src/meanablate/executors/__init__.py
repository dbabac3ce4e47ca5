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

Modules: :mod:`~meanablate.executors.base` (the protocol, :class:`LocalExecutor`),
:mod:`~meanablate.executors.ray` (:class:`RayExecutor`), :mod:`~meanablate.executors.workers`
(the Ray actors and :class:`RayPool`), :mod:`~meanablate.executors.probe` (checking a Ray
address), :mod:`~meanablate.executors.shards` (means from shards).
"""

from meanablate.executors.base import Executor, LocalExecutor
from meanablate.executors.probe import host_port as _host_port
from meanablate.executors.ray import RayExecutor
from meanablate.executors.shards import merge_shards, shard_means, sharded_means
from meanablate.executors.workers import RayPool, WorkerError, WorkerSetupError

__all__ = [
    "Executor",
    "LocalExecutor",
    "RayExecutor",
    "RayPool",
    "WorkerError",
    "WorkerSetupError",
    "_host_port",
    "merge_shards",
    "shard_means",
    "sharded_means",
]
