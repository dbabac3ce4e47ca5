"""Resample (counterfactual) node sweeps: the fast path against the per-unit route.

Model and data as ``bench_discovery.py`` (4-layer HookedTransformer, d_model 256, 512 MLP
neurons per layer, batch 32 x 32 tokens); each clean example is paired with another
example's tokens as its counterfactual (``corrupt``). Sweeps the neurons of layer 1.

Prints, per unit, in units of one plain forward of the model (same run):
- before: ``fast=False``, the route resample sweeps took before the fast path (one hooked
  forward plus one corrupted forward per unit);
- after: ``fast=True`` (the corrupted input runs once per batch; each neuron resumes with
  ``clean + (fill - act) @ W`` for KL, and replays its block exactly for accuracy);
- for reference, the mean-ablation sweep on the same units;
and the largest difference between the two resample routes.

Run: ``python benchmarks/bench_resample.py [--neurons N] [--threads T]``.
"""

from __future__ import annotations

import argparse
import time

import torch
from bench_discovery import build, timed

import meanablate as ma
from meanablate.discovery import sweep, transformer_units


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--neurons", type=int, default=512)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, batch = build()
    batch["corrupt"] = batch["tokens"].roll(1, 0)
    n = args.neurons
    units = transformer_units(model, "neurons", layers=[1])[:n]
    means = ma.compute_means(model, ["blocks.1.mlp.hook_post"], [batch])
    with torch.inference_mode():
        t_fwd, _ = timed(lambda: model(batch["tokens"]), 5)
    print(f"one plain forward: {t_fwd * 1e3:.1f} ms; {n} neurons of layer 1")

    def per_unit(t: float) -> str:
        return f"{t:.2f} s = {t / n / t_fwd:.3f} forwards per unit"

    for metric in ("kl", "accuracy"):
        b = dict(batch)
        if metric == "accuracy":
            b["target"] = batch["tokens"].roll(-1, 1)
        t_before, before = timed(
            lambda: sweep(model, [b], units, None, metric=metric, method="resample", fast=False)  # noqa: B023
        )
        t_after, after = timed(
            lambda: sweep(model, [b], units, None, metric=metric, method="resample")  # noqa: B023
        )
        t_mean, _ = timed(lambda: sweep(model, [b], units, means, metric=metric))  # noqa: B023
        diff = (after.per_example - before.per_example).abs().max().item()
        print(
            f"[{metric}] resample before (fast=False): {per_unit(t_before)}; after: "
            f"{per_unit(t_after)} ({t_before / t_after:.1f}x); mean ablation: "
            f"{per_unit(t_mean)}; max |after - before| {diff:.1e}"
        )


if __name__ == "__main__":
    t0 = time.perf_counter()
    main()
    print(f"total {time.perf_counter() - t0:.0f} s")
