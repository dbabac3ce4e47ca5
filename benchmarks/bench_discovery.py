"""Discovery speed, as ratios against baselines measured in the same run.

Model: a 4-layer GPT-2-style HookedTransformer (d_model 256, 4 heads, 512 MLP neurons per
layer, vocab 1000, LayerNorm, GELU), batch 32 prompts x 32 tokens, sweeping the 512
neurons of layer 1 with a KL metric (all positions, and last token only). Discovery runs
on it with random weights and on the copy trained on a synthetic language in
``bench_model.py`` (trained on the first run, about 3 minutes, then cached).

Prints:
- exact sweep vs the naive loop (one hooked full forward per neuron, the way a
  TransformerLens user writes it), and vs N x one plain forward of the downstream layers;
- what exactness at ties costs: a sweep with a discrete metric (accuracy: every block
  replayed as the hooked forward runs it) vs the same metric through the linear shortcut;
- attribution time vs one plain forward, and its Spearman correlation with the sweep;
- discovery: attribute-then-verify vs the full exact sweep at several faithfulness
  targets, with whether both reach the same circuit;
- per organism: discovery wall time, by sweep and by attribute-then-verify;
- with the minilm extra: the exact sweep over all-MiniLM-L6-v2's intermediate neurons.

Run: ``python benchmarks/bench_discovery.py [--neurons N] [--no-trained]
[--target-faithfulness T ...] [--minilm-neurons N]``.
"""

from __future__ import annotations

import argparse
import time

import torch
from bench_model import CONFIG, trained_model

import meanablate as ma
from meanablate.discovery import attribute, discover, spearman, sweep, transformer_units
from meanablate.hooks import hooked
from meanablate.organisms import HookedTransformer


def timed(fn, repeats: int = 1):  # type: ignore[no-untyped-def]
    best, out = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def build() -> tuple[HookedTransformer, dict]:
    torch.manual_seed(0)
    cfg = CONFIG  # shared with the trained copy in bench_model.py
    model = HookedTransformer(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim > 1:
                p.normal_(0, 0.08)
    tokens = torch.randint(0, 1000, (32, 32), generator=torch.Generator().manual_seed(1))
    return model, {"tokens": tokens}


def downstream_loop(model: HookedTransformer, resid: torch.Tensor, n: int) -> None:
    """``n`` plain forwards of layers 2-3 and the unembedding (outputs dropped as made)."""
    for _ in range(n):
        model.run_from(resid, 2)


def naive_loop(
    model: HookedTransformer, batch: dict, means: ma.Means, n: int, last_only: bool
) -> torch.Tensor:
    """One full forward per neuron with a hand-written hook, TransformerLens style."""
    mean = means["blocks.1.mlp.hook_post"].float()
    out = torch.empty(n, batch["tokens"].shape[0], dtype=torch.float64)
    with torch.inference_mode():
        clean = model(batch["tokens"])
        if last_only:
            clean = clean[:, -1:]
        lq = torch.log_softmax(clean.double(), -1)
        for i in range(n):

            def hook(act: torch.Tensor, i: int = i) -> torch.Tensor:
                act = act.clone()
                act[..., i] = mean[i]
                return act

            with hooked(model, {"blocks.1.mlp.hook_post": hook}):
                logits = model(batch["tokens"])
            if last_only:
                logits = logits[:, -1:]
            lp = torch.log_softmax(logits.double(), -1)
            out[i] = (lq.exp() * (lq - lp)).sum(-1).mean(-1)
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--neurons", type=int, default=512)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (1: steady timings on a shared machine)",
    )
    parser.add_argument(
        "--minilm-neurons",
        type=int,
        default=9216,
        help="how many of MiniLM's 6 x 1536 neurons to sweep (0: skip)",
    )
    parser.add_argument(
        "--target-faithfulness",
        type=float,
        nargs="+",
        default=[0.5, 0.8, 0.95],
        help="discovery targets (the circuit's size, and so what verifying costs, grows with it)",
    )
    parser.add_argument(
        "--no-trained",
        dest="trained",
        action="store_false",
        help="skip the trained copy of the model (its first run trains it for ~4 min)",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, batch = build()
    n = args.neurons
    units = transformer_units(model, "neurons", layers=[1])[:n]
    means = ma.compute_means(model, ["blocks.1.mlp.hook_post"], [batch])
    with torch.inference_mode():
        t_fwd, _ = timed(lambda: model(batch["tokens"]), 5)
        resid = model.embed(batch["tokens"])
        for blk in model.blocks[:2]:
            resid = blk(resid)
        t_down, _ = timed(lambda: model.run_from(resid, 2), 5)
        # The sweep's yardstick, N plain downstream forwards, timed as a loop like the
        # sweep itself (a best-of-5 single forward would skip the cache and allocator
        # churn that any N-forward loop pays).
        t_down_n, _ = timed(lambda: downstream_loop(model, resid, n))
    print(
        f"one plain forward: {t_fwd * 1e3:.1f} ms; downstream layers 2-3 + unembed: "
        f"{t_down * 1e3:.1f} ms (best of 5), {t_down_n / n * 1e3:.1f} ms (mean over a "
        f"loop of {n})"
    )

    for last_only in (False, True):
        b = dict(batch)
        label = "all positions"
        if last_only:
            mask = torch.zeros_like(batch["tokens"], dtype=torch.bool)
            mask[:, -1] = True
            b["metric_mask"] = mask
            label = "last token"
        t_naive, ref = timed(lambda: naive_loop(model, batch, means, n, last_only))  # noqa: B023
        t_sweep, scores = timed(lambda: sweep(model, [b], units, means, metric="kl"))  # noqa: B023
        err = (scores.per_example - ref).abs().max().item()
        print(
            f"[KL, {label}] sweep {t_sweep:.2f} s, naive loop {t_naive:.2f} s: "
            f"{t_naive / t_sweep:.2f}x faster (target >= 1.5x); sweep / (N x downstream "
            f"forward) = {t_sweep / t_down_n:.2f} (target <= 1.1; against best-of-5 x N: "
            f"{t_sweep / (n * t_down):.2f}); max |diff| {err:.1e}"
        )

    exact_at_ties(model, batch, units, means)

    t_attr, attr = timed(lambda: attribute(model, [batch], units, means, metric="kl"), 3)
    rho = spearman(attr.values, scores.values)
    print(
        f"attribution: {t_attr * 1e3:.0f} ms (best of 3) = {t_attr / t_fwd:.2f} x one "
        f"forward (best of 5) "
        f"(target <= 3); Spearman with the exact sweep {rho:.3f}"
    )

    compare_discovery(model, batch, units, means, "random weights", args.target_faithfulness)
    if args.trained:
        tmodel, tbatch = trained_model()
        tmeans = ma.compute_means(tmodel, ["blocks.1.mlp.hook_post"], [tbatch])
        t_attr, tattr = timed(lambda: attribute(tmodel, [tbatch], units, tmeans, metric="kl"), 3)
        tscores = sweep(tmodel, [tbatch], units, tmeans, metric="kl")
        print(
            f"[trained] attribution Spearman with the exact sweep "
            f"{spearman(tattr.values, tscores.values):.3f}"
        )
        compare_discovery(tmodel, tbatch, units, tmeans, "trained", args.target_faithfulness)

    for name in ma.organisms.names():
        try:
            org = ma.organisms.load(name)
        except Exception as exc:  # an optional extra may be missing
            print(f"organism {name}: skipped ({exc})")
            continue
        batches = org.make_batches(64, 32, 0)
        t0 = time.perf_counter()
        per_pos = org.per_position_means
        keys = sorted({ma.parse_site(u).key for u in org.units})
        om = ma.compute_means(org.model, keys, batches, per_position=per_pos)
        t_means = time.perf_counter() - t0
        runs = {}
        for algorithm in ("sweep", "attribute_verify"):
            t1 = time.perf_counter()
            circ = discover(
                org.model, batches, om, units=org.units, metric=org.metric, algorithm=algorithm
            )
            runs[algorithm] = (time.perf_counter() - t1, circ)
        (t_s, c_s), (t_av, c_av) = runs["sweep"], runs["attribute_verify"]
        print(
            f"organism {name} ({len(org.units)} units): means {t_means:.2f} s; discovery by "
            f"sweep {t_s:.3f} s ({len(c_s.kept)} kept), attribute-then-verify {t_av:.3f} s "
            f"({len(c_av.kept)} kept): {t_s / t_av:.2f}x; same circuit: "
            f"{sorted(c_s.kept) == sorted(c_av.kept)}"
        )
    if args.minilm_neurons:
        bench_minilm(args.minilm_neurons)


def exact_at_ties(model: HookedTransformer, batch: dict, units: list[str], means: ma.Means) -> None:
    """What faithfulness at exact ties costs: a discrete metric (accuracy) takes the
    replay, bit for bit the hooked forward (every block in full, no stacking); the same
    metric marked continuous would take the linear shortcut with the cut last block."""
    from meanablate.metrics import Metric, accuracy

    shortcut = Metric("accuracy", accuracy, discrete=False)  # what a tie would break
    target = batch["tokens"].roll(-1, 1)
    target[:, -1] = -100
    last = torch.full_like(target, -100)
    last[:, -2] = target[:, -2]
    for label, tgt in (("all positions", target), ("last token", last)):
        b = dict(batch, target=tgt)
        t_exact, exact = timed(lambda b=b: sweep(model, [b], units, means, metric="accuracy"))
        t_short, short = timed(lambda b=b: sweep(model, [b], units, means, metric=shortcut))
        differ = int((exact.per_example != short.per_example).sum())
        print(
            f"[accuracy, {label}] exact sweep {t_exact:.2f} s vs linear shortcut "
            f"{t_short:.2f} s: exactness costs {t_exact / t_short:.2f}x ({differ} of "
            f"{exact.per_example.numel()} per-example values differ)"
        )


def compare_discovery(
    model: HookedTransformer,
    batch: dict,
    units: list[str],
    means: ma.Means,
    label: str,
    targets: list[float],
) -> None:
    """Discovery over ``units``: rank by the full exact sweep, or attribute and verify the
    top units exactly; both prune to the same faithfulness target."""
    b_last = dict(batch)
    b_last["metric_mask"] = torch.zeros_like(batch["tokens"], dtype=torch.bool)
    b_last["metric_mask"][:, -1] = True
    cases = [
        (t, w, b) for t in targets for w, b in (("all positions", batch), ("last token", b_last))
    ]
    for target, where, b in cases:
        runs = {}
        for algorithm in ("sweep", "attribute_verify"):
            runs[algorithm] = timed(
                lambda b=b, a=algorithm, t=target: discover(  # type: ignore[misc]
                    model,
                    [b],
                    means,
                    units=units,
                    metric="kl",
                    algorithm=a,
                    target_faithfulness=t,
                    verify_top=16 if a == "attribute_verify" else None,
                )
            )
        (t_full, c_full), (t_av, c_av) = runs["sweep"], runs["attribute_verify"]
        exact = int(c_av.unit_scores.exact.sum()) if c_av.unit_scores is not None else 0
        same = sorted(c_full.kept) == sorted(c_av.kept)
        print(
            f"[{label}] discovery ({len(units)} neurons, KL {where}, faithfulness {target}): "
            f"sweep-ranked {t_full:.2f} s ({len(c_full.kept)} kept), attribute-then-verify "
            f"{t_av:.2f} s ({len(c_av.kept)} kept, {exact} verified, faithfulness "
            f"{c_av.faithfulness:.3f}): {t_full / t_av:.1f}x faster (target >= 10x); same "
            f"circuit: {same}"
            + (
                ""
                if same
                else f" ({len(set(c_full.kept) - set(c_av.kept))} of the sweep's units not kept)"
            )
        )


def bench_minilm(n_neurons: int) -> None:
    """Exact sweep over all-MiniLM-L6-v2's intermediate neurons, vs the naive loop."""
    try:
        org = ma.organisms.load("minilm")
    except ImportError as exc:
        print(f"minilm: skipped ({exc})")
        return
    model = org.model
    batches = org.make_batches(64, 64, 0)
    layers = model.config.num_hidden_layers
    width = model.config.intermediate_size
    units = [
        f"encoder.layer.{L}.intermediate[neurons={i}]" for L in range(layers) for i in range(width)
    ]
    units = units[:: max(1, len(units) // n_neurons)][:n_neurons]  # spread over all layers
    keys = sorted({u.split("[")[0] for u in units})
    means = ma.compute_means(model, keys, batches)
    t_sweep, _ = timed(lambda: sweep(model, batches, units, means, metric="l2"))
    # Naive loop on a sample of the units (the same work per unit), scaled to all of them.
    sample = units[:: max(1, len(units) // 64)]
    mean_of = {k: means[k].float() for k in keys}

    def naive() -> None:
        with torch.inference_mode():
            clean = model(**batches[0]).last_hidden_state
            for u in sample:
                site = ma.parse_site(u)
                idx = site.neurons[0]

                def hook(act: torch.Tensor, key: str = site.key, i: int = idx) -> torch.Tensor:
                    act = act.clone()
                    act[..., i] = mean_of[key][i]
                    return act

                with hooked(model, {site.key: hook}):
                    out = model(**batches[0]).last_hidden_state
                (out - clean).pow(2).sum((1, 2)).sqrt()

    t_naive_sample, _ = timed(naive)
    t_naive = t_naive_sample * len(units) / len(sample)
    print(
        f"minilm: exact sweep of {len(units)} intermediate neurons on 64 sentences "
        f"{t_sweep:.1f} s; naive loop {t_naive:.1f} s (timed on {len(sample)} units, "
        f"scaled): ratio {t_naive / t_sweep:.2f}x (hooked path; the layers before each "
        f"unit's own are skipped)"
    )


if __name__ == "__main__":
    main()
