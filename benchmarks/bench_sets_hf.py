"""Set evaluation (``SetMetric``, behind ACDC / pruning) on Hugging Face GPT-2: one full
hooked forward per set vs resuming from the set's earliest block.

The benchmark model of ``bench_discovery.py`` as a ``GPT2LMHeadModel``, 32 prompts, its
16 heads; 18 random sets of 1-8 heads, KL over all positions and at the last token.
Both routes run in this process, interleaved (median of 3 rounds), with
``SetMetric.resumed`` set to ``None`` for the full-forward route; the largest difference
between the two routes' values is printed too.

Run: ``python benchmarks/bench_sets_hf.py`` (one torch thread).
"""

from __future__ import annotations

import random
import statistics
import time

import torch
from bench_discovery import build

import meanablate as ma
from meanablate.adapters.transformer_lens import to_hf_gpt2
from meanablate.discovery import SetMetric


def main() -> None:
    torch.set_num_threads(1)
    own, batch = build()
    hf = to_hf_gpt2(own).eval()
    tokens = batch["tokens"][:32]
    hb = {"input_ids": tokens}
    mask = torch.zeros(tokens.shape, dtype=torch.bool)
    mask[:, -1] = True
    last = {**hb, "metric_mask": mask}
    heads = [
        f"transformer.h.{L}.attn.c_proj@input[heads={h};n_heads=4]"
        for L in range(4)
        for h in range(4)
    ]
    means = ma.compute_means(hf, sorted({ma.parse_site(u).key for u in heads}), [hb])
    random.seed(0)
    sets = [random.sample(heads, k) for k in (1, 2, 3, 4, 6, 8) for _ in range(3)]
    print("| metric | sets | full forward | resumed | speed-up | max abs difference |")
    print("|---|---|---|---|---|---|")
    for name, b in (("KL all", hb), ("KL last", last)):
        scorer = SetMetric(hf, [b], heads, means, "kl")
        resumed = scorer.resumed
        full_t, resumed_t = [], []
        for _ in range(3):
            for route, out in ((None, full_t), (resumed, resumed_t)):
                scorer.resumed = route
                t0 = time.perf_counter()
                for s in sets:
                    scorer(s)
                out.append(time.perf_counter() - t0)
        scorer.resumed = None
        want = [scorer(s) for s in sets]
        scorer.resumed = resumed
        diff = max(float((scorer(s) - w).abs().max()) for s, w in zip(sets, want))
        a, b_ = statistics.median(full_t), statistics.median(resumed_t)
        print(f"| {name} | {len(sets)} | {a:.2f} s | {b_:.2f} s | {a / b_:.2f}x | {diff:.1e} |")


if __name__ == "__main__":
    main()
