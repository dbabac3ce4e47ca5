"""Sweep speed across model families, and how far the estimate before a run is from the run.

Families (one torch thread, random weights unless said):
- ``own``: our ``HookedTransformer``, the 4-layer GPT-2-style model of ``bench_discovery.py``
  (d_model 256, 4 heads, 512 MLP neurons, vocab 1000), 32 prompts x 32 tokens;
- ``hf-gpt2``: the same weights as a Hugging Face ``GPT2LMHeadModel`` (``to_hf_gpt2``);
- ``llama``: a ``LlamaForCausalLM`` of the same shape (4 layers, d 256, 4 heads, MLP 512);
- ``minilm``: all-MiniLM-L6-v2 (trained, shipped), 64 sentences, L2 of the embeddings
  (it has no logits: its "KL" columns are L2, and there is no last-token variant).

Per family, each ratio from one run:
- per-unit sweep cost / one plain forward: 512 layer-1 neurons (MiniLM: 1536 layer-2
  neurons) with KL over all positions (MiniLM: L2), KL at the last token, and 16 heads;
- the naive loops, one hooked forward per unit on a sample of the neurons: plain torch
  hooks, the TransformerLens 4 bridge's ``run_with_hooks`` (GPT-2; Llama if the bridge
  builds), an nnsight trace (if installed) — per unit / forward, and the sweep's speed-up
  over each (the own model's against the loops on its Hugging Face copy: same weights);
- ``ma.estimate`` against the real run: the neuron sweep's time and peak tensor memory
  (measured on a second run under the memory counter), and ACDC over the 16 heads
  (no certificate).

Run: ``python benchmarks/bench_families.py [--quick] [--families own hf-gpt2 ...]``
(``--quick``: 32 neurons, 64 on MiniLM, 4 naive units, 8 prompts, 16 sentences; for a
smoke test in a few minutes, its ratios are not the benchmark's).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from bench_discovery import build
from naive_loops import bridge_loop, nnsight_loop, torch_hook_loop
from torch import nn

import meanablate as ma
from meanablate.hooks import output_tensor, run_model
from meanablate.peakmem import PeakMemory

MIB = 2**20
AB_REPEATS = 0  # --ab-last: interleaved pairs of last-token sweeps (see ab_last)


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def forward_seconds(model: nn.Module, batch: dict, repeats: int = 7) -> float:
    """Median seconds of one plain forward (inference mode)."""
    times = []
    with torch.inference_mode():
        output_tensor(run_model(model, batch))
        for _ in range(repeats):
            times.append(timed(lambda: output_tensor(run_model(model, batch)))[0])
    return statistics.median(times)


@dataclass
class Family:
    name: str
    model: nn.Module
    batch: dict
    neurons: list[str]
    heads: list[str]
    metric: str
    # naive loops: name -> fn(list of neuron indices, mean vector) running one forward each
    naive: dict[str, Callable[[list[int], torch.Tensor], None]] = field(default_factory=dict)
    last: dict | None = None  # the batch with the metric read at the last token only


def _last_token(batch: dict, key: str) -> dict:
    tokens = batch[key]
    mask = torch.zeros(tokens.shape, dtype=torch.bool)
    mask[:, -1] = True
    return {**batch, "metric_mask": mask}


def families(names: list[str], n_neurons: int, n_minilm: int, n_prompts: int) -> list[Family]:
    from meanablate.adapters.transformer_lens import bridge_from_hf_gpt2, to_hf_gpt2

    out = []
    own, batch = build()
    tokens = batch["tokens"][:n_prompts]
    batch = {"tokens": tokens}
    if "own" in names:
        fam = Family(
            "own",
            own,
            batch,
            [f"blocks.1.mlp.hook_post[neurons={i}]" for i in range(n_neurons)],
            [f"blocks.{L}.attn.hook_z[heads={h}]" for L in range(4) for h in range(4)],
            "kl",
            last=_last_token(batch, "tokens"),
        )
        fam.naive["torch hooks"] = torch_hook_loop(
            own, own.blocks[1].mlp.hook_post, batch, False, "kl"
        )
        loop = nnsight_loop(own, ["blocks", 1, "mlp", "hook_post"], batch, False, "kl")
        if loop is not None:
            fam.naive["nnsight"] = loop
        out.append(fam)
    if "hf-gpt2" in names:
        hf = to_hf_gpt2(own).eval()
        hb = {"input_ids": tokens}
        fam = Family(
            "hf-gpt2",
            hf,
            hb,
            [f"transformer.h.1.mlp.act[neurons={i}]" for i in range(n_neurons)],
            [
                f"transformer.h.{L}.attn.c_proj@input[heads={h};n_heads=4]"
                for L in range(4)
                for h in range(4)
            ],
            "kl",
            last=_last_token(hb, "input_ids"),
        )
        fam.naive["torch hooks"] = torch_hook_loop(hf, hf.transformer.h[1].mlp.act, hb, False, "kl")
        try:
            fam.naive["TL bridge"] = bridge_loop(
                bridge_from_hf_gpt2(hf), "blocks.1.mlp.hook_post", tokens
            )
        except Exception as exc:  # report, do not fail the benchmark
            print(f"hf-gpt2: TL bridge skipped ({type(exc).__name__}: {exc})")
        loop = nnsight_loop(hf, ["transformer", "h", 1, "mlp", "act"], hb, False, "kl")
        if loop is not None:
            fam.naive["nnsight"] = loop
        out.append(fam)
    if "llama" in names:
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        cfg = LlamaConfig(
            vocab_size=1000,
            hidden_size=256,
            intermediate_size=512,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=4,
            max_position_embeddings=64,
        )
        llama = LlamaForCausalLM(cfg).eval()
        with torch.no_grad():  # weights as large as the GPT-2's, so ablations matter
            for p in llama.parameters():
                if p.ndim > 1:
                    p.normal_(0, 0.08)
        lb = {"input_ids": tokens}
        fam = Family(
            "llama",
            llama,
            lb,
            [f"model.layers.1.mlp.down_proj@input[neurons={i}]" for i in range(n_neurons)],
            [
                f"model.layers.{L}.self_attn.o_proj@input[heads={h};n_heads=4]"
                for L in range(4)
                for h in range(4)
            ],
            "kl",
            last=_last_token(lb, "input_ids"),
        )
        down = llama.model.layers[1].mlp.down_proj
        fam.naive["torch hooks"] = torch_hook_loop(llama, down, lb, True, "kl")
        loop = nnsight_loop(llama, ["model", "layers", 1, "mlp", "down_proj"], lb, True, "kl")
        if loop is not None:
            fam.naive["nnsight"] = loop
        out.append(fam)
    if "minilm" in names:
        try:
            org = ma.organisms.load("minilm")
        except ImportError as exc:
            print(f"minilm: skipped ({exc})")
            return out
        model = org.model
        mb = org.make_batches(2 * n_prompts, 2 * n_prompts, 0)[0]
        fam = Family(
            "minilm",
            model,
            mb,
            [f"encoder.layer.2.intermediate[neurons={i}]" for i in range(n_minilm)],
            [
                f"encoder.layer.{L}.attention.output.dense@input[heads={h};n_heads=12]"
                for L, h in [(2, h) for h in range(12)] + [(3, h) for h in range(4)]
            ],
            "l2",
        )
        fam.naive["torch hooks"] = torch_hook_loop(
            model, model.encoder.layer[2].intermediate, mb, False, "l2"
        )
        loop = nnsight_loop(model, ["encoder", "layer", 2, "intermediate"], mb, False, "l2")
        if loop is not None:
            fam.naive["nnsight"] = loop
        out.append(fam)
    return out


def keys_of(units: list[str]) -> list[str]:
    return sorted({s.key for s in ma.sites.as_sites(units)})


def measure(fam: Family, n_naive: int, sweeps_only: bool = False) -> dict[str, Any]:
    """Every number of one family (see the module docstring); ``sweeps_only``: the
    per-unit sweep ratios only (no estimates, ACDC or naive loops)."""
    model, batch, metric = fam.model, fam.batch, fam.metric
    r: dict[str, Any] = {"name": fam.name, "n_neurons": len(fam.neurons)}
    means = ma.compute_means(model, keys_of(fam.neurons + fam.heads), [batch])
    r["forward"] = fwd = forward_seconds(model, batch)
    if sweeps_only:
        return _sweeps(fam, means, r)
    r["calibration"], est = timed(
        lambda: ma.estimate(model, [batch], fam.neurons, means, metric=metric, warn=False)
    )
    r["estimate"] = est
    t, _ = timed(lambda: ma.sweep(model, [batch], fam.neurons, means, metric=metric))
    r["sweep"], r["per_unit_all"] = t, t / len(fam.neurons) / fwd
    # the peak from a second run: the memory counter's Python call per operation would
    # slow the timed one (up to 1.5x on small batches)
    with PeakMemory() as mem:
        ma.sweep(model, [batch], fam.neurons, means, metric=metric)
    r["peak"] = mem.bytes
    if fam.last is not None:
        t, _ = timed(lambda: ma.sweep(model, [fam.last], fam.neurons, means, metric=metric))
        r["per_unit_last"] = t / len(fam.neurons) / fwd
    t, _ = timed(lambda: ma.sweep(model, [batch], fam.heads, means, metric=metric))
    r["per_unit_heads"] = t / len(fam.heads) / fwd
    # ACDC over the heads (relative threshold 1%, without the certificate, whose cost
    # depends on the circuit found): estimated, then run
    kw: dict[str, Any] = {"metric": metric, "threshold": 0.01, "minimize": False, "force": True}
    r["acdc_calibration"], r["acdc_estimate"] = timed(
        lambda: ma.estimate(model, [batch], fam.heads, means, algorithm="acdc", warn=False, **kw)
    )
    r["acdc"], _ = timed(
        lambda: ma.discover(model, [batch], means, units=fam.heads, algorithm="acdc", **kw)
    )
    with PeakMemory() as mem:
        ma.discover(model, [batch], means, units=fam.heads, algorithm="acdc", **kw)
    r["acdc_peak"] = mem.bytes
    # naive loops on a sample of the neurons
    site = ma.parse_site(fam.neurons[0])
    mean = means[site.key].float()
    idx = [ma.parse_site(u).neurons[0] for u in fam.neurons[:: max(1, len(fam.neurons) // n_naive)]]
    idx = idx[:n_naive]
    r["naive"] = {}
    for name, loop in fam.naive.items():
        try:
            t, _ = timed(lambda loop=loop: loop(idx, mean))
        except Exception as exc:  # a framework that cannot run this model: say so
            print(f"{fam.name}: {name} loop failed ({type(exc).__name__}: {exc})")
            continue
        r["naive"][name] = (t - fwd) / len(idx)  # the loop's one clean forward taken out
    return r


def _sweeps(fam: Family, means: Any, r: dict[str, Any]) -> dict[str, Any]:
    model, batch, metric, fwd = fam.model, fam.batch, fam.metric, r["forward"]
    t, _ = timed(lambda: ma.sweep(model, [batch], fam.neurons, means, metric=metric))
    r["sweep"], r["per_unit_all"] = t, t / len(fam.neurons) / fwd
    if fam.last is not None:
        t, _ = timed(lambda: ma.sweep(model, [fam.last], fam.neurons, means, metric=metric))
        r["per_unit_last"] = t / len(fam.neurons) / fwd
    t, _ = timed(lambda: ma.sweep(model, [batch], fam.heads, means, metric=metric))
    r["per_unit_heads"] = t / len(fam.heads) / fwd
    r["naive"] = {}
    if fam.last is not None and AB_REPEATS:
        r["ab_last"] = ab_last(fam, means, AB_REPEATS)
    return r


def ab_last(fam: Family, means: Any, repeats: int) -> tuple[float, float]:
    """KL at the last token, per unit / forward, without and with the positions-only last
    block, interleaved in this process: the median of ``repeats`` pairs. "Without" is
    the sweep with the metric's positions not restricted (``restrict_positions`` patched
    to keep every position: the whole last block and tail, as before the route existed);
    on our own model that also turns off the fast path's own cut last block."""
    import importlib

    sweep_mod = importlib.import_module("meanablate.discovery.sweep")  # not the function
    model, metric = fam.model, fam.metric
    original = sweep_mod.restrict_positions
    before, after = [], []
    for _ in range(repeats):
        fwd = forward_seconds(model, fam.batch, repeats=3)
        for restrict, out in ((False, before), (True, after)):
            if not restrict:
                sweep_mod.restrict_positions = lambda batch, logits: (None, dict(batch))
            try:
                t, _ = timed(lambda: ma.sweep(model, [fam.last], fam.neurons, means, metric=metric))
            finally:
                sweep_mod.restrict_positions = original
            out.append(t / len(fam.neurons) / fwd)
    return statistics.median(before), statistics.median(after)


def err(estimated: float, real: float) -> str:
    return f"{100 * (estimated - real) / real:+.0f}%" if real > 0 else "n/a"


def report(results: list[dict[str, Any]]) -> None:
    loops = ["torch hooks", "TL bridge", "nnsight"]
    by_name = {r["name"]: r for r in results}
    print("\n## Per-unit sweep cost / one plain forward (one torch thread)\n")
    print(
        "| family | forward | neurons | KL all | KL last | 16 heads | "
        + " | ".join(f"naive: {x}" for x in loops)
        + " | speed-up vs "
        + " / ".join(loops)
        + " |"
    )
    print("|---" * (7 + len(loops)) + "|")
    for r in results:
        fwd = r["forward"]
        unit_s = r["sweep"] / r["n_neurons"]
        # the own model's loops: those of its Hugging Face copy (same weights), if run
        ref = by_name.get("hf-gpt2", r) if r["name"] == "own" else r
        naive = [r["naive"].get(x) for x in loops]
        ref_naive = [ref["naive"].get(x) for x in loops]
        cells = [f"{v / fwd:.2f}" if v is not None else "—" for v in naive]
        speed = [f"{v / unit_s:.2f}x" if v is not None else "—" for v in ref_naive]
        last = f"{r['per_unit_last']:.2f}" if "per_unit_last" in r else "—"
        print(
            f"| {r['name']} | {1000 * fwd:.1f} ms | {r['n_neurons']} | {r['per_unit_all']:.2f} "
            f"| {last} | {r['per_unit_heads']:.2f} | "
            + " | ".join(cells)
            + " | "
            + " / ".join(speed)
            + " |"
        )
    if any("ab_last" in r for r in results):
        print("\n## KL at the last token, per unit / forward: whole last block vs positions only")
        print(f"(interleaved in one process, median of {AB_REPEATS} pairs)\n")
        print("| family | whole last block + tail | positions only | ratio |")
        print("|---|---|---|---|")
        for r in results:
            if "ab_last" in r:
                b, a = r["ab_last"]
                print(f"| {r['name']} | {b:.2f} | {a:.2f} | {b / a:.2f}x |")
    if not all("estimate" in r for r in results):
        return
    print("\n## Estimate before the run vs the run\n")
    print(
        "| family | run | estimated | real | time error | est. peak | real peak | "
        "memory error | calibration |"
    )
    print("|---" * 9 + "|")
    for r in results:
        for what, est, real, peak, cal in (
            (f"sweep {r['n_neurons']} neurons", r["estimate"], r["sweep"], r["peak"],
             r["calibration"]),
            ("ACDC 16 heads, no certificate", r["acdc_estimate"], r["acdc"], r["acdc_peak"],
             r["acdc_calibration"]),
        ):  # fmt: skip
            print(
                f"| {r['name']} | {what} | {est.seconds:.2f} s | {real:.2f} s "
                f"| {err(est.seconds, real)} | {est.peak_bytes / MIB:.1f} MiB "
                f"| {peak / MIB:.1f} MiB | {err(est.peak_bytes, peak)} | {cal:.2f} s |"
            )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="smaller sizes (a few minutes)")
    parser.add_argument(
        "--families", nargs="+", default=["own", "hf-gpt2", "llama", "minilm"],
        choices=["own", "hf-gpt2", "llama", "minilm"],
    )  # fmt: skip
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--sweeps-only",
        action="store_true",
        help="the sweep ratios only (no estimates, ACDC, loops)",
    )
    parser.add_argument("--neurons", type=int, help="layer-1 neurons (default 512; quick 32)")
    parser.add_argument(
        "--minilm-neurons", type=int, help="MiniLM layer-2 neurons (default 1536; quick 64)"
    )
    parser.add_argument(
        "--ab-last", type=int, default=0, metavar="N",
        help="with --sweeps-only: N interleaved pairs of last-token sweeps, without and with "
        "the positions-only last block",
    )  # fmt: skip
    args = parser.parse_args()
    global AB_REPEATS
    AB_REPEATS = args.ab_last
    torch.set_num_threads(args.threads)
    n_neurons, n_minilm, n_naive, n_prompts = (32, 64, 4, 8) if args.quick else (512, 1536, 32, 32)
    n_neurons = args.neurons or n_neurons
    n_minilm = args.minilm_neurons or n_minilm
    t0 = time.perf_counter()
    results = []
    for fam in families(args.families, n_neurons, n_minilm, n_prompts):
        t = time.perf_counter()
        results.append(measure(fam, n_naive, args.sweeps_only))
        print(f"{fam.name}: measured in {time.perf_counter() - t:.0f} s", flush=True)
    report(results)
    print(f"\n(total {time.perf_counter() - t0:.0f} s, torch threads {args.threads})")


if __name__ == "__main__":
    main()
