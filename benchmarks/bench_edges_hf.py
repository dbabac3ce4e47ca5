"""Edges on a Llama-style and a Pythia-style Hugging Face model of the benchmark's size.

Models: ``LlamaForCausalLM`` and ``GPTNeoXForCausalLM`` shaped like the discovery
benchmark's transformer (4 layers, hidden 256, 4 query heads, 512 MLP; Llama with 2
key/value heads), random weights, batch 32 x 32, next-token loss.

Prints, per model:
- the edge forward with nothing ablated / the model's own forward;
- EAP over all edges in forward-equivalents (EAP time / one forward of the model);
- the exact edge sweep: time / (sum over edges of one edge forward resumed at the edge's
  destination layer, each timed alone) — what an edge costs beyond the forward it needs —
  for the sweep as it was (each edge reruns its destination's whole layer) and as it is
  (only the changed head, MLP or unembedding, then the blocks after it; also with
  ``stack=8``), and per edge in plain Hugging Face forwards. Both sweeps must agree.

Times are CPU seconds of this process (one thread), best of ``--repeats``.

Measured 2026-11-30, two runs (2 shared cores, one thread, noisy: the baseline itself
moved 25-31 s): Llama 479 edges, NeoX 463 edges; the edge forward 0.95-1.42x the model's
own forward (every head reads its own normalised q/k/v inputs); EAP 3.4-5.3
forward-equivalents; exact sweep, whole layer rerun (before): ratio 1.17, 0.87 (Llama) /
1.43, 1.14 (NeoX); only the changed head (after): 0.84, 0.69 / 0.75, 0.70 — sweep time
after/before 0.71-0.79 (Llama), 0.53-0.61 (NeoX); per edge 0.42-0.56 (Llama) and
0.31-0.43 (NeoX) plain HF forwards; stack=8 is slower on a CPU (0.77-1.03 / 0.76-0.89).

Run: ``python benchmarks/bench_edges_hf.py [--repeats N]``.
"""

from __future__ import annotations

import argparse
import time

import torch
import transformers

from meanablate.discovery import EdgeData, eap, edge_sweep
from meanablate.discovery.edge_sweep import _sweep_item_resumed
from meanablate.metrics import get_metric


def timed(fn, repeats: int = 1):  # type: ignore[no-untyped-def]
    best, out = float("inf"), None
    for _ in range(repeats):
        t0 = time.process_time()
        out = fn()
        best = min(best, time.process_time() - t0)
    return best, out


def models() -> dict:
    common = dict(
        hidden_size=256,
        intermediate_size=512,
        num_attention_heads=4,
        num_hidden_layers=4,
        vocab_size=1000,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    llama = transformers.LlamaForCausalLM(
        transformers.LlamaConfig(num_key_value_heads=2, **common)
    ).eval()
    neox = transformers.GPTNeoXForCausalLM(transformers.GPTNeoXConfig(**common)).eval()
    return {"Llama (GQA 4/2)": llama, "Pythia-style NeoX (parallel)": neox}


def bench(name: str, model: torch.nn.Module, repeats: int) -> None:
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 1000, (32, 32), generator=gen)
    target = torch.full_like(tokens, -100)
    target[:, :-1] = tokens[:, 1:]
    batch = {"tokens": tokens, "target": target}
    data = EdgeData(model, [batch], "mean")
    fam, graph, item = data.family, data.graph, data.items[0]
    with torch.inference_mode():
        t_hf, _ = timed(lambda: model(input_ids=tokens), repeats)
        t_edge, _ = timed(lambda: fam.run(graph, tokens, None), repeats)
        states: list = []
        fam.run(graph, tokens, None, states=states)
        mask = torch.zeros(len(graph))
        per_layer = {
            layer: timed(
                lambda layer=layer: fam.run(
                    graph, tokens, None, item.ablated, mask, start=states[layer]
                ),
                repeats,
            )[0]
            for layer in range(graph.n_layers + 1)
        }
    t_eap, _ = timed(lambda: eap(model, data, metric="loss"), repeats)
    baseline = sum(per_layer[graph.dst_layer[e.dst_index]] for e in graph.edges)
    t_sweep, got = timed(lambda: edge_sweep(model, data, metric="kl"))
    t_stack, stacked = timed(lambda: edge_sweep(model, data, metric="kl", stack=8))
    t_old, old = timed(lambda: resumed_sweep(data))
    assert torch.allclose(got.per_example, old, atol=1e-5, rtol=1e-4)
    assert torch.allclose(stacked.per_example, old, atol=1e-5, rtol=1e-4)
    n = len(graph)
    print(
        f"{name}: {n} edges; edge forward / HF forward {t_edge / t_hf:.2f}; "
        f"EAP {t_eap / t_hf:.2f} forward-equivalents; edges x one forward from the "
        f"destination's layer {baseline:.2f} s\n"
        f"  exact sweep, whole layer rerun (before): {t_old:.2f} s, ratio "
        f"{t_old / baseline:.2f}, per edge {t_old / n / t_hf:.2f} HF forwards\n"
        f"  exact sweep, changed head only (after):  {t_sweep:.2f} s, ratio "
        f"{t_sweep / baseline:.2f}, per edge {t_sweep / n / t_hf:.2f} HF forwards\n"
        f"  the same with stack=8:                   {t_stack:.2f} s, ratio "
        f"{t_stack / baseline:.2f}, per edge {t_stack / n / t_hf:.2f} HF forwards"
    )


def resumed_sweep(data: EdgeData) -> torch.Tensor:
    """The sweep as it was: each edge resumes the edge forward at its destination's layer
    and reruns that whole layer (per-example effects ``[n_edges, n_examples]``)."""
    graph = data.graph
    by_dst: dict = {}
    for e in graph.edges:
        by_dst.setdefault(e.dst_index, []).append(e)
    rows: dict = {e.index: [] for e in graph.edges}
    with torch.inference_mode():
        for item in data.items:
            _sweep_item_resumed(data, item, by_dst, get_metric("kl"), rows)
    return torch.stack([torch.cat(rows[e.index]) for e in graph.edges])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    for name, model in models().items():
        bench(name, model, args.repeats)


if __name__ == "__main__":
    main()
