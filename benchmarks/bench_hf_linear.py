"""The linear-write routes of the sweep on Hugging Face families, as ratios (same run).

Per family of ``bench_families.py`` (HF GPT-2 and Llama: 4 layers, d 256, 32 prompts x 32
tokens, KL; all-MiniLM-L6-v2: 64 sentences, L2 of the embeddings), one torch thread,
process CPU time (the machine is shared): per-unit sweep cost / one plain forward for

- 16 heads (layers 0-3 on GPT-2/Llama; layers 2-3 on MiniLM): each finishes its block
  from the re-projected ablated input, no attention re-run;
- the layer-1 neurons (MiniLM: layer-2 neurons, post-LN: ``output.dense`` and the layer
  norm re-run on the ablated activation);
- nnsight's naive loop (one traced forward per neuron, if nnsight is installed), and the
  heads sweep's speed-up over it.

Run: ``PYTHONPATH=src python benchmarks/bench_hf_linear.py [--neurons N] [--minilm-neurons M]
[--families hf-gpt2 llama minilm]`` (defaults 512 / 1536 neurons, all three).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from bench_families import families, keys_of

import meanablate as ma
from meanablate.hooks import output_tensor, run_model


def cpu(fn: Callable[[], Any]) -> float:
    t0 = time.process_time()
    fn()
    return time.process_time() - t0


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--neurons", type=int, default=512)
    parser.add_argument("--minilm-neurons", type=int, default=1536)
    parser.add_argument("--naive", type=int, default=8, help="units in the naive loop")
    parser.add_argument(
        "--families", nargs="+", default=["hf-gpt2", "llama", "minilm"],
        choices=["hf-gpt2", "llama", "minilm"],
    )  # fmt: skip
    args = parser.parse_args()
    torch.set_num_threads(1)
    print("| family | forward | heads / fwd | neurons / fwd | nnsight naive / fwd | "
          "heads speed-up vs nnsight |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    for fam in families(args.families, args.neurons, args.minilm_neurons, 32):
        print(row(fam, args.naive), flush=True)


def row(fam: Any, n_naive: int) -> str:
    """One family's table row (see the module docstring)."""
    model, batch, metric = fam.model, fam.batch, fam.metric
    means = ma.compute_means(model, keys_of(fam.neurons + fam.heads), [batch])

    def forward() -> None:
        with torch.inference_mode():
            output_tensor(run_model(model, batch))

    forward()
    fwd = statistics.median(cpu(forward) for _ in range(7))
    heads = cpu(lambda: ma.sweep(model, [batch], fam.heads, means, metric=metric))
    heads /= len(fam.heads) * fwd
    neurons = cpu(lambda: ma.sweep(model, [batch], fam.neurons, means, metric=metric))
    neurons /= len(fam.neurons) * fwd
    naive, speed = "—", "—"
    loop = fam.naive.get("nnsight")
    if loop is not None:
        mean = means[ma.parse_site(fam.neurons[0]).key].float()
        t = cpu(lambda: loop(list(range(n_naive)), mean))
        per = (t - fwd) / n_naive / fwd  # the loop's clean forward taken out
        naive, speed = f"{per:.2f}", f"{per / heads:.2f}x"
    return (
        f"| {fam.name} | {1000 * fwd:.1f} ms | {heads:.2f} | {neurons:.2f} "
        f"({len(fam.neurons)}) | {naive} | {speed} |"
    )


if __name__ == "__main__":
    main()
