"""compute_means and Executor.map on a local Ray cluster (2 CPUs) started by this module.

Agreement with the local run, reading a JSONL file shard by shard, a worker killed
mid-run (its shard retried, result identical), retries exhausted, mismatched shapes
across shards, and a worker that cannot import the model's code.
"""

from __future__ import annotations

import json
import os
import sys
import time

import pytest
import torch

ray = pytest.importorskip("ray")

from meanablate import compute_means  # noqa: E402
from meanablate.data import stream_batches  # noqa: E402
from meanablate.executors import RayExecutor, WorkerError, WorkerSetupError  # noqa: E402
from meanablate.organisms import HookedTransformer, TransformerConfig  # noqa: E402

CFG = TransformerConfig(
    n_layers=2, d_model=16, n_heads=2, d_head=8, d_vocab=40, n_ctx=16, d_mlp=32, normalization="LN"
)
SITES = ["blocks.0.attn.hook_z", "blocks.0.hook_resid_post", "blocks.1.mlp.hook_post"]


@pytest.fixture(scope="module")
def cluster():
    if ray.is_initialized():
        pytest.skip("Ray is already initialized in this process")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    # Workers cannot import this test module: send its classes and functions by value.
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    yield
    ray.cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
    ray.shutdown()


@pytest.fixture(scope="module")
def ex(cluster):
    """Two workers shared by the tests (they start once: a fresh one imports torch)."""
    executor = RayExecutor(num_workers=2, chunk_batches=2, shards_per_worker=3, max_retries=2)
    yield executor
    executor.shutdown()


def make_model(seed: int = 0, cls=HookedTransformer, **kw) -> HookedTransformer:
    torch.manual_seed(seed)
    return cls(CFG, **kw).eval()


def make_batches(n: int = 12, seed: int = 1) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        b, p = 3 + i % 3, 6 + i % 5
        mask = torch.ones(b, p, dtype=torch.long)
        mask[0, p - 2 :] = 0  # padding, excluded from the means
        out.append(
            {"tokens": torch.randint(0, CFG.d_vocab, (b, p), generator=g), "attention_mask": mask}
        )
    return out


def assert_means_close(got, want, rtol=1e-9):
    assert got.keys() == want.keys()
    for k in want.tensors:
        scale = want[k].abs().max().clamp_min(1e-300)
        assert float((got[k] - want[k]).abs().max() / scale) <= rtol, k
        assert torch.equal(got.counts[k], want.counts[k]), k
    assert got.metadata == want.metadata


class DyingModel(HookedTransformer):
    """Exits its worker process in forward: once (``marker`` file absent) or always."""

    def __init__(self, cfg, marker: str | None = None, always: bool = False):
        super().__init__(cfg)
        self.marker, self.always = marker, always

    def forward(self, tokens, attention_mask=None):
        if self.always:
            os._exit(1)
        if self.marker is not None:
            try:
                fd = os.open(self.marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                pass
            else:  # first attempt anywhere: die without cleanup, as a crash would
                os.close(fd)
                os._exit(1)
        return super().forward(tokens, attention_mask)


def test_means_equal_local_run_list_generator_per_position(ex):
    model, batches = make_model(), make_batches()
    want = compute_means(model, SITES, batches)
    got = compute_means(model, SITES, batches, executor=ex, progress=True)
    assert_means_close(got, want)
    assert got.metadata["batches"] == len(batches)
    # a generator is read lazily and sent in chunks; per-position means too
    want_pp = compute_means(model, SITES, batches, per_position=True)
    got_pp = compute_means(model, SITES, iter(batches), per_position=True, executor=ex)
    assert_means_close(got_pp, want_pp)


def test_means_from_jsonl_shards_equal_local(ex, tmp_path):
    path = tmp_path / "data.jsonl"
    with open(path, "w") as f:
        for i in range(200):
            words = [str((7 * i + 3 * j) % CFG.d_vocab) for j in range(2 + i % 9)]
            f.write(json.dumps({"text": " ".join(words), "target": i % 5}) + "\n")
    source = stream_batches(
        path,
        lambda t: [int(w) for w in t.split()],
        batch_size=8,
        fields=("target",),
        ids_key="tokens",
    )
    # float64: shards batch lines differently from one pass; keep forward rounding out of it
    model = make_model().double()
    want = compute_means(model, SITES, source)
    got = compute_means(model, SITES, source, executor=ex)
    counts = {k: float(c) for k, c in got.counts.items()}
    assert set(counts.values()) == {float(sum(2 + i % 9 for i in range(200)))}
    for k in want.tensors:
        assert float((got[k] - want[k]).abs().max() / want[k].abs().max()) <= 1e-9
        assert torch.equal(got.counts[k], want.counts[k])


def slow_square(model, x):
    time.sleep(0.05 * (x % 3))
    return (x * x, type(model).__name__)


def test_map_keeps_order_and_reuses_replicas(ex):
    assert ex.map(slow_square, range(9), model=make_model()) == [
        (x * x, "HookedTransformer") for x in range(9)
    ]
    with ex.replicas(make_model()) as pool:
        pids = {info["pid"] for info in pool.info}
        assert len(pids) == 2
        assert list(pool.imap(slow_square, iter(range(5)), progress=True)) == [
            (x * x, "HookedTransformer") for x in range(5)
        ]
        assert [r[0] for r in pool.imap(slow_square, [3, 1])] == [9, 1]


def test_killed_worker_has_its_shard_retried(ex, tmp_path):
    batches = make_batches(8)
    clean = make_model()
    marker = tmp_path / "died-once"
    dying = make_model(cls=DyingModel, marker=str(marker))
    dying.load_state_dict(clean.state_dict())
    want = compute_means(clean, SITES, batches, executor=ex)
    got = compute_means(dying, SITES, batches, executor=ex)
    assert marker.exists()  # a worker process did die mid-run
    for k in want.tensors:  # the same shards merged in the same order: bit for bit
        assert torch.equal(got[k], want[k]), k
    local = compute_means(clean, SITES, batches)
    for k in local.tensors:
        assert float((got[k] - local[k]).abs().max() / local[k].abs().max()) <= 1e-9


def test_worker_dying_beyond_retries_is_an_error(cluster):
    model = make_model(cls=DyingModel, always=True)
    # num_cpus_per_worker=0: the shared executor holds both CPUs
    fragile = RayExecutor(num_workers=1, max_retries=0, num_cpus_per_worker=0)
    try:
        with pytest.raises(WorkerError, match="died"):
            compute_means(model, SITES, make_batches(2), executor=fragile)
    finally:
        fragile.shutdown()


def test_mismatched_shapes_across_shards_are_an_error(ex):
    # hook_pattern is [batch, head, q, k]: its mean's shape follows the sequence length,
    # so shards of length-6 and length-8 batches cannot be merged.
    g = torch.Generator().manual_seed(0)
    batches = [{"tokens": torch.randint(0, CFG.d_vocab, (2, p), generator=g)} for p in (6, 6, 8, 8)]
    with pytest.raises(ValueError, match=r"shard 1 gave activation shape .* but shard 0"):
        compute_means(make_model(), ["blocks.0.attn.hook_pattern"], batches, executor=ex)


def test_worker_without_model_code_is_a_clear_error(ex, tmp_path, monkeypatch):
    (tmp_path / "driver_only_models.py").write_text(
        "from meanablate.organisms import HookedTransformer\n\n"
        "class DriverOnlyModel(HookedTransformer):\n    pass\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))  # on the driver only, not on the workers
    from driver_only_models import DriverOnlyModel

    with pytest.raises(WorkerSetupError, match="No module named 'driver_only_models'"):
        compute_means(make_model(cls=DriverOnlyModel), SITES, make_batches(2), executor=ex)
    # the workers survive it
    assert ex.map(slow_square, [2], model=make_model()) == [(4, "HookedTransformer")]


def test_more_workers_than_the_cluster_holds_is_an_error(cluster):
    with pytest.raises(ValueError, match="need 3 CPUs; the cluster has 2"):
        RayExecutor(num_workers=3).map(slow_square, [1], model=make_model())


def test_bad_line_read_on_a_worker_is_the_same_error(ex, tmp_path):
    path = tmp_path / "bad.jsonl"
    lines = [json.dumps({"text": f"{i % 7} 1 2"}) for i in range(40)]
    lines[33] = '{"text": '
    path.write_text("\n".join(lines) + "\n")
    source = stream_batches(path, lambda t: [int(w) for w in t.split()], ids_key="tokens")
    with pytest.raises(ValueError, match=r"bad.jsonl, line 34: invalid JSON"):
        compute_means(make_model(), SITES, source, executor=ex)


def test_sweep_and_attribute_on_ray_equal_local(ex) -> None:
    from meanablate.discovery import attribute, sweep, transformer_units

    model = make_model(3)
    batches = make_batches(4, seed=5)
    for b in batches:
        b["target"] = torch.where(b["attention_mask"].bool(), b["tokens"], -100)
    units = transformer_units(model, "components") + ["blocks.1.mlp.hook_post[neurons=3]"]
    keys = sorted({u.split("[")[0] for u in units})
    means = compute_means(model, keys, batches)
    local = sweep(model, batches, units, means, metric="loss")
    remote = sweep(model, batches, units, means, metric="loss", executor=ex)
    assert remote.units == local.units
    torch.testing.assert_close(remote.per_example, local.per_example, rtol=0, atol=1e-6)
    a_local = attribute(model, batches, units, means, metric="loss")
    a_remote = attribute(model, batches, units, means, metric="loss", executor=ex)
    torch.testing.assert_close(a_remote.per_example, a_local.per_example, rtol=0, atol=1e-6)
