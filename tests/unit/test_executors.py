"""LocalExecutor, the shard-and-merge path of compute_means (without Ray), and RayExecutor's
errors that need no cluster: Ray missing, an unreachable address."""

from __future__ import annotations

import json
import random
import sys
import time

import pytest
import torch

from meanablate import MeanAccumulator, compute_means
from meanablate.data import stream_batches
from meanablate.executors import (
    Executor,
    LocalExecutor,
    RayExecutor,
    _host_port,
    merge_shards,
    shard_means,
)
from meanablate.organisms import HookedTransformer, TransformerConfig

CFG = TransformerConfig(n_layers=2, d_model=12, n_heads=3, d_head=4, d_vocab=30, n_ctx=16, d_mlp=24)
SITES = ["blocks.0.attn.hook_z", "blocks.1.hook_resid_mid", "blocks.1.mlp.hook_post"]


class OutOfProcess(LocalExecutor):
    """Runs here, but as if remote: compute_means takes the shard-and-merge path."""

    in_process = False
    num_shards = 3
    chunk_batches = 2


def make_model(double: bool = False) -> HookedTransformer:
    torch.manual_seed(0)
    model = HookedTransformer(CFG).eval()
    return model.double() if double else model


def make_batches(n: int = 9) -> list[dict]:
    g = torch.Generator().manual_seed(3)
    out = []
    for i in range(n):
        b, p = 2 + i % 3, 5 + i % 4
        mask = torch.ones(b, p, dtype=torch.long)
        mask[-1, p - 1 - i % 3 :] = 0
        out.append(
            {"tokens": torch.randint(0, CFG.d_vocab, (b, p), generator=g), "attention_mask": mask}
        )
    return out


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def test_local_executor_maps_in_order_with_the_model():
    ex = LocalExecutor()
    assert isinstance(ex, Executor)
    assert ex.in_process and ex.num_workers == 1
    got = ex.map(lambda m, x: (m, x * x), range(5), model="M", progress=True)
    assert got == [("M", x * x) for x in range(5)]
    it = ex.imap(lambda m, x: x, iter([3, 1, 2]))
    assert next(it) == 3 and list(it) == [1, 2]


def test_compute_means_with_local_executor_is_the_default_path_bit_for_bit():
    model, batches = make_model(), make_batches()
    want = compute_means(model, SITES, batches)
    got = compute_means(model, SITES, batches, executor=LocalExecutor())
    for k in want.tensors:
        assert torch.equal(got[k], want[k])
    assert got.metadata == want.metadata


@pytest.mark.parametrize("per_position", [False, True])
def test_sharded_path_equals_local_run(per_position):
    model, batches = make_model(), make_batches()
    want = compute_means(model, SITES, batches, per_position=per_position)
    got = compute_means(
        model, SITES, iter(batches), per_position=per_position, executor=OutOfProcess()
    )
    assert got.keys() == want.keys()
    assert got.metadata == want.metadata
    for k in want.tensors:
        assert rel_err(got[k], want[k]) <= 1e-12, k
        assert torch.equal(got.counts[k], want.counts[k])


def test_sharded_path_reads_a_shardable_source_shard_by_shard(tmp_path):
    path = tmp_path / "d.jsonl"
    with open(path, "w") as f:
        for i in range(60):
            f.write(
                json.dumps({"text": " ".join(str((3 * i + j) % 30) for j in range(1 + i % 8))})
                + "\n"
            )
    source = stream_batches(
        path, lambda t: [int(w) for w in t.split()], batch_size=4, ids_key="tokens"
    )
    model = make_model(double=True)
    want = compute_means(model, SITES, source)
    seen = []

    class Recording(OutOfProcess):
        def imap(self, fn, items, **kw):
            items = list(items)
            seen.extend((s.shard_index, s.num_shards) for s in items)
            return super().imap(fn, items, **kw)

    got = compute_means(model, SITES, source, executor=Recording())
    assert seen == [(0, 3), (1, 3), (2, 3)]
    for k in want.tensors:
        assert rel_err(got[k], want[k]) <= 1e-12
        assert torch.equal(got.counts[k], want.counts[k])


def shard_results(model, batches, keys, per_position=False):
    return [shard_means(model, [b], keys=keys, per_position=per_position) for b in batches]


def test_merge_is_independent_of_order():
    model, batches = make_model(), make_batches(12)
    parts = shard_results(model, batches, SITES)
    ref, n = merge_shards(parts, SITES)
    assert n == 12
    for seed in range(3):
        shuffled = parts[:]
        random.Random(seed).shuffle(shuffled)
        acc, _ = merge_shards(shuffled, SITES)
        for k in SITES:
            assert rel_err(acc.sums[k], ref.sums[k]) <= 1e-14
            assert torch.equal(acc.counts[k], ref.counts[k])


def test_merge_rejects_mismatched_sites_and_shapes():
    model, batches = make_model(), make_batches(3)
    parts = shard_results(model, batches, SITES)
    other = shard_results(model, batches[:1], SITES[:2])[0]
    with pytest.raises(ValueError, match=r"shard 3 returned sums for sites .* expected"):
        merge_shards([*parts, other], SITES)
    bad = MeanAccumulator()
    for k in SITES:
        bad.sums[k] = torch.zeros(7, dtype=torch.float64)
        bad.counts[k] = torch.tensor(3.0, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"shard 1 gave activation shape \(7,\) but shard 0"):
        merge_shards([parts[0], (bad, 1)], SITES)
    pp = shard_results(model, batches[:1], SITES, per_position=True)[0]
    with pytest.raises(ValueError, match="per_position"):
        merge_shards([parts[0], pp], SITES)
    with pytest.raises(TypeError, match="not a MeanAccumulator"):
        merge_shards([({"x": 1}, 1)], SITES)
    # empty shards (a worker whose byte range held no line) are fine
    _, n = merge_shards([(MeanAccumulator(), 0), *parts], SITES)
    assert n == 3


def test_sharded_path_errors_like_the_local_one():
    model = make_model()
    with pytest.raises(ValueError, match="got no batches"):
        compute_means(model, SITES, [], executor=OutOfProcess())
    with pytest.raises(ValueError, match="has no module"):
        compute_means(model, ["blocks.9.nope"], make_batches(1), executor=OutOfProcess())


def test_sharded_path_adds_into_a_given_accumulator():
    model, batches = make_model(), make_batches(6)
    acc = MeanAccumulator()
    compute_means(model, SITES, batches[:3], accumulator=acc)
    got = compute_means(model, SITES, batches[3:], accumulator=acc, executor=OutOfProcess())
    want = compute_means(model, SITES, batches)
    for k in SITES:
        assert rel_err(got[k], want[k]) <= 1e-12


def test_ray_missing_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(ImportError, match=r"pip install 'meanablate\[ray\]'"):
        RayExecutor().connect()


@pytest.mark.parametrize(
    ("address", "want"),
    [
        ("10.0.0.1:6379", ("10.0.0.1", 6379)),
        ("head", ("head", 6379)),
        ("ray://head:10001", ("head", 10001)),
        ("ray://head", ("head", 10001)),
        ("[::1]:7000", ("::1", 7000)),
    ],
)
def test_host_port(address, want):
    assert _host_port(address) == want


@pytest.mark.parametrize("address", ["127.0.0.1:1", "ray://127.0.0.1:1", "10.255.255.1:6379"])
def test_unreachable_address_fails_fast_and_clearly(address):
    ray = pytest.importorskip("ray")
    was_initialized = ray.is_initialized()
    t0 = time.perf_counter()
    with pytest.raises(ConnectionError, match="cannot reach the Ray cluster"):
        RayExecutor(address, connect_timeout=1.0).map(lambda m, x: x, [1])
    assert time.perf_counter() - t0 < 5
    assert ray.is_initialized() == was_initialized  # nothing was started


def test_bad_arguments():
    with pytest.raises(ValueError, match="num_workers"):
        RayExecutor(num_workers=0)
    with pytest.raises(ValueError, match="max_retries"):
        RayExecutor(max_retries=-1)
    with pytest.raises(ValueError, match="port"):
        _host_port("head:abc")
