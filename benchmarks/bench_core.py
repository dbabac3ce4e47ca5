"""Speed of the seed API, as ratios against baselines measured in the same run.

(a) list path / the seed's reference loop, 512 x 3072 lists, 10% of neurons ablated
    (target <= 1.0);
(b) array path / ``x.copy()`` (numpy) and / ``x.clone()`` (torch) on a 65536 x 4096
    float32 array (target <= 1.3: one read and one write of memory is the limit).

Run: ``python benchmarks/bench_core.py [--small]``.
"""

from __future__ import annotations

import argparse
import random
import time
from collections.abc import Callable

import numpy as np
import torch

from meanablate import mean_ablation


def best_of(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def reference_loop(acts: list[list[float]], means: list[float], ablate: list[int]) -> list:
    # The seed's algorithm: a Python loop over every entry with a set lookup.
    ablate_set = set(ablate)
    n = len(acts[0])
    return [[round(means[j], 6) if j in ablate_set else row[j] for j in range(n)] for row in acts]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--small", action="store_true", help="smaller arrays (smoke run)")
    args = parser.parse_args()
    rng = random.Random(0)

    b, n = 512, 3072
    acts = [[rng.random() for _ in range(n)] for _ in range(b)]
    means = [rng.random() for _ in range(n)]
    ablate = rng.sample(range(n), n // 10)
    assert mean_ablation(acts, means, ablate) == reference_loop(acts, means, ablate)
    t_ref = best_of(lambda: reference_loop(acts, means, ablate), 5)
    t_list = best_of(lambda: mean_ablation(acts, means, ablate), 5)
    print(
        f"(a) lists {b}x{n}, 10% ablated: ours {t_list * 1e3:.1f} ms, "
        f"reference {t_ref * 1e3:.1f} ms, ratio {t_list / t_ref:.2f} (target <= 1.0)"
    )

    rows, n = (4096, 4096) if args.small else (65536, 4096)
    x = np.random.default_rng(0).standard_normal((rows, n), dtype=np.float32)
    means_np = x[:1024].mean(axis=0, dtype=np.float64)
    ablate = rng.sample(range(n), n // 10)
    t_copy = best_of(lambda: x.copy(), 5)
    t_np = best_of(lambda: mean_ablation(x, means_np, ablate), 5)
    print(
        f"(b) numpy {rows}x{n} float32: ours {t_np * 1e3:.1f} ms, x.copy() "
        f"{t_copy * 1e3:.1f} ms, ratio {t_np / t_copy:.2f} (target <= 1.3)"
    )
    xt = torch.from_numpy(x)
    means_t = torch.from_numpy(means_np)
    t_clone = best_of(lambda: xt.clone(), 5)
    t_t = best_of(lambda: mean_ablation(xt, means_t, ablate), 5)
    print(
        f"(b) torch {rows}x{n} float32: ours {t_t * 1e3:.1f} ms, x.clone() "
        f"{t_clone * 1e3:.1f} ms, ratio {t_t / t_clone:.2f} (target <= 1.3)"
    )


if __name__ == "__main__":
    main()
