"""Sweep cost on a Hugging Face model, as a ratio to one plain forward (same run).

Model: HF ``GPT2LMHeadModel`` with random weights, 4 layers, d_model 256, 4 heads, 1024
MLP neurons, vocab 1000; batch 32 prompts x 32 tokens. Sweeps 64 neurons of layer 1
(``transformer.h.1.mlp.act``) with KL and prints per-unit time / one plain forward, for
``fast=True`` (resumed from the unit's block) and ``fast=False`` (full hooked forward).

Run: ``python benchmarks/bench_hf_sweep.py [--neurons N] [--repeats R]``.
"""

from __future__ import annotations

import argparse
import time

import torch

import meanablate as ma


def build() -> tuple[torch.nn.Module, dict]:
    import transformers

    torch.manual_seed(0)
    cfg = transformers.GPT2Config(
        n_layer=4, n_embd=256, n_head=4, n_inner=1024, vocab_size=1000, n_positions=64
    )
    model = transformers.GPT2LMHeadModel(cfg).eval()
    ids = torch.randint(0, 1000, (32, 32), generator=torch.Generator().manual_seed(1))
    return model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def cpu_time(fn) -> float:  # type: ignore[no-untyped-def]
    # CPU time of this (single-threaded) process: the machine is shared, and wall time
    # there mostly measures the neighbours.
    t0 = time.process_time()
    fn()
    return time.process_time() - t0


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--neurons", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    model, batch = build()
    units = [f"transformer.h.1.mlp.act[neurons={i}]" for i in range(args.neurons)]
    means = ma.compute_means(model, ["transformer.h.1.mlp.act"], [batch])

    def forward() -> None:
        with torch.inference_mode():
            model(**batch)

    forward()
    for fast in (True, False):
        ratios = []
        for _ in range(args.repeats):  # a forward measured next to each sweep
            t_fwd = min(cpu_time(forward) for _ in range(3))
            t = cpu_time(
                lambda fast=fast: ma.sweep(model, [batch], units, means, metric="kl", fast=fast)
            )
            ratios.append(t / len(units) / t_fwd)
        ratios.sort()
        print(
            f"HF GPT-2 sweep of {len(units)} layer-1 neurons, fast={fast}: "
            f"{ratios[len(ratios) // 2]:.2f} x one plain forward per unit "
            f"(median of {args.repeats}; range {ratios[0]:.2f}-{ratios[-1]:.2f})"
        )


if __name__ == "__main__":
    main()
