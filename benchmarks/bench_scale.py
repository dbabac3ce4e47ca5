"""Scaling compute_means: flat memory when streaming, local vs Ray, and the merge cost.

(a) peak RSS of ``compute_means`` streaming a JSONL file of N and 10N lines, each run in a
    fresh subprocess (``resource.getrusage`` of the child); the ratio of the two peaks is
    what counts (target: about 1.0, i.e. memory does not grow with the file);
(b) wall time of ``compute_means`` on a JSONL file locally (one process, torch's default
    threads, and 1 thread) and through ``RayExecutor`` on a local 2-worker Ray cluster
    (workers warm; each reads its own shards of the file); ratio ray / local measured in
    the same run, the first (cold: workers start and import torch) Ray call reported apart,
    and the agreement of the two means. Timings on a loaded machine are noisy: the load
    average is printed with them;
(c) the merge: driver-side time to check and merge the workers' float64 sums, absolute
    and as a fraction of the Ray run;
(d) the same exact sweep locally and on the 2 Ray workers (units split in chunks).

Run: ``python benchmarks/bench_scale.py [--small]`` (needs ``pip install 'meanablate[ray]'``
for (b) and (c); (a) runs without Ray).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from meanablate import compute_means
from meanablate.data import stream_batches
from meanablate.organisms import HookedTransformer, TransformerConfig

CFG = TransformerConfig(
    n_layers=4, d_model=128, n_heads=4, d_head=32, d_vocab=500, n_ctx=64, d_mlp=512,
    normalization="LN",
)  # fmt: skip
SITES = [
    f"blocks.{i}.{s}" for i in range(CFG.n_layers) for s in ("hook_resid_post", "mlp.hook_post")
]
# (a) measures the data path: a small model keeps it quick without changing what grows
TINY = TransformerConfig(n_layers=1, d_model=32, n_heads=2, d_head=16, d_vocab=500, n_ctx=64)
TINY_SITES = ["blocks.0.hook_resid_post", "blocks.0.attn.hook_z"]


def tokenize(text: str) -> list[int]:
    return [int(w) for w in text.split()]


def write_jsonl(path: Path, n_lines: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n_lines):
            n = rng.randint(8, CFG.n_ctx)
            f.write(
                json.dumps({"text": " ".join(str(rng.randrange(CFG.d_vocab)) for _ in range(n))})
            )
            f.write("\n")


def make_model(cfg: TransformerConfig = CFG) -> HookedTransformer:
    torch.manual_seed(0)
    return HookedTransformer(cfg).eval()


def source(path: Path, batch_size: int = 32):
    return stream_batches(path, tokenize, batch_size=batch_size, ids_key="tokens")


def child_memory(path: str) -> None:
    """In a fresh process: RSS before and after compute_means over ``path`` (KiB)."""
    model = make_model(TINY)
    compute_means(model, TINY_SITES, source(Path(path)).shard(0, 1000))  # warm up torch
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    means = compute_means(model, TINY_SITES, source(Path(path)))
    seconds = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    tokens = float(means.counts[TINY_SITES[0]])
    print(json.dumps({"before_kib": before, "peak_kib": after, "tokens": tokens, "s": seconds}))


def measure_memory(path: Path) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--child-memory", str(path)],
        check=True,
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")},
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def best_of(fn, repeats: int) -> tuple[float, object]:
    best, result = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - t0)
    return best, result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--small", action="store_true", help="smaller files (smoke run)")
    parser.add_argument("--child-memory", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_memory:
        child_memory(args.child_memory)
        return

    n_mem = 1000 if args.small else 5000
    n = 200 if args.small else 1000
    with tempfile.TemporaryDirectory() as tmp:
        small, big, data_file = (Path(tmp) / name for name in ("n.jsonl", "10n.jsonl", "b.jsonl"))
        write_jsonl(small, n_mem)
        write_jsonl(big, 10 * n_mem, seed=1)
        write_jsonl(data_file, n, seed=2)

        # (a) memory
        m1, m10 = measure_memory(small), measure_memory(big)
        d1 = (m1["peak_kib"] - m1["before_kib"]) / 1024
        d10 = (m10["peak_kib"] - m10["before_kib"]) / 1024
        print(
            f"(a) streaming {n_mem} vs {10 * n_mem} lines ({small.stat().st_size / 1e6:.1f} vs "
            f"{big.stat().st_size / 1e6:.1f} MB; {m1['tokens']:.0f} vs {m10['tokens']:.0f} "
            f"tokens): peak RSS {m1['peak_kib'] / 1024:.0f} vs {m10['peak_kib'] / 1024:.0f} MiB, "
            f"ratio {m10['peak_kib'] / m1['peak_kib']:.3f} (target ~1.0); growth during the "
            f"run {d1:.1f} vs {d10:.1f} MiB"
        )

        try:
            import ray
        except ImportError:
            print("(b), (c) skipped: pip install 'meanablate[ray]'")
            return
        from meanablate.executors import RayExecutor, merge_shards, shard_means

        # (b) local vs Ray
        model = make_model()
        data = source(data_file)
        repeats = 2 if args.small else 3
        t_local, local = best_of(lambda: compute_means(model, SITES, data), repeats)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        t_local1, _ = best_of(lambda: compute_means(model, SITES, data), repeats)
        torch.set_num_threads(threads)
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        try:
            ex = RayExecutor(num_workers=2, shards_per_worker=4)
            t0 = time.perf_counter()
            compute_means(model, SITES, data, executor=ex)
            t_cold = time.perf_counter() - t0
            t_ray, remote = best_of(lambda: compute_means(model, SITES, data, executor=ex), repeats)
            agree = max(
                float((remote[k] - local[k]).abs().max() / local[k].abs().max()) for k in SITES
            )
            print(
                f"(b) {n} lines, {CFG.n_layers} layers d_model={CFG.d_model}, {len(SITES)} "
                f"sites, {os.cpu_count()} CPUs (load average {os.getloadavg()[0]:.1f}): local "
                f"{t_local:.2f} s ({threads} threads; {t_local1:.2f} s with 1), Ray 2 workers "
                f"{t_ray:.2f} s (cold first call {t_cold:.2f} s); ratio ray/local "
                f"{t_ray / t_local:.2f} ({t_ray / t_local1:.2f} vs 1 thread); max relative "
                f"difference of the means {agree:.1e} (target <= 1e-9)"
            )

            # (c) merge cost: the worker results of one run, merged again on the driver
            parts = [
                shard_means(model, data.shard(i, ex.num_shards), keys=SITES)
                for i in range(ex.num_shards)
            ]
            t_merge, _ = best_of(lambda: merge_shards(parts, SITES), 5)
            size = sum(p[0].sums[k].numel() for p in parts[:1] for k in SITES)
            print(
                f"(c) merging {len(parts)} shards x {size} float64 sums: {t_merge * 1e3:.2f} ms "
                f"({t_merge / t_ray * 100:.3f}% of the Ray run)"
            )

            # (d) the same sweep locally and on the 2 workers (unit chunks, one replica each)
            from meanablate.discovery import sweep, transformer_units

            batches = list(data)[:2]
            units = transformer_units(model, "neurons", layers=[1])[: 64 if args.small else 256]
            sweep_means = compute_means(model, ["blocks.1.mlp.hook_post"], batches)
            t_sl, s_local = best_of(lambda: sweep(model, batches, units, sweep_means), 1)
            sweep(model, batches, units[:8], sweep_means, executor=ex)  # warm the replicas
            t_sr, s_ray = best_of(lambda: sweep(model, batches, units, sweep_means, executor=ex), 1)
            diff = float((s_ray.per_example - s_local.per_example).abs().max())
            print(
                f"(d) sweep of {len(units)} neurons (KL) locally {t_sl:.2f} s, on Ray 2 workers "
                f"{t_sr:.2f} s: ratio ray/local {t_sr / t_sl:.2f}; max |difference| {diff:.1e}"
            )
            ex.shutdown()
        finally:
            ray.shutdown()


if __name__ == "__main__":
    main()
