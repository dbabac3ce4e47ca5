"""Train the induction organism and write its weights and card.

    python scripts/train_induction.py [--out-dir src/meanablate/organisms/data] [--seed 0]

Trains a 2-layer attention-only :class:`~meanablate.organisms.transformer.HookedTransformer`
with 2 heads per layer (see :func:`meanablate.organisms.induction.default_config`) on
``BOS, prefix, A, A`` sequences with a varying period, with the loss on the second copy of
``A`` only, plus a sparsity penalty ``penalty * sum_h sqrt(r_h + 1e-4)`` on each head's output
ratio ``r_h = mean ||z_h W_O[h]|| / ||resid_pre||`` (ramped in over the first 30% of the
steps). The square root (concave, unlike a plain L1 on the norms, which is indifferent
between one head and two aligned copies) kills redundant copies: one previous-token head
and one induction head survive and the other heads write (almost) nothing, so each circuit
head matters alone under mean ablation and the rest do not. Then reads the circuit off the
forward pass (previous-token and induction attention scores and output ratio per head, no
ablation), and writes ``induction.safetensors`` (via ``save_model``) and ``induction.json``.
Bit-reproducible for a given seed and ``--threads`` (default 1; about 75 s on one CPU thread).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn

from meanablate.organisms import induction
from meanablate.organisms.transformer import HookedTransformer, load_model, save_model

PREV_THRESHOLD = 0.4
INDUCTION_THRESHOLD = 0.4
OUTPUT_THRESHOLD = 0.05  # output ratio: the head writes to the residual stream
PENALTY_EPS, PENALTY_RAMP = 1e-4, 0.3
EVAL_EXAMPLES, EVAL_SEED = 2048, 10_000
SCORE_EXAMPLES, SCORE_SEED = 2048, 20_000
ABLATION_SEED = 30_000


def train(
    seed: int, steps: int, batch_size: int, lr: float, penalty: float, log_every: int
) -> HookedTransformer:
    """Train from ``torch.manual_seed(seed)``; AdamW with linear warm-up and cosine decay;
    cross-entropy plus ``penalty * sum_h sqrt(output_ratio_h + eps)`` (ramped in)."""
    torch.manual_seed(seed)
    model = HookedTransformer(induction.default_config())
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    warmup = max(1, steps // 20)

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    gen = torch.Generator().manual_seed(seed + 1)
    zs: dict[int, torch.Tensor] = {}
    resids: dict[int, torch.Tensor] = {}
    handles = []
    for layer, block in enumerate(model.blocks):
        handles.append(
            block.attn.hook_z.register_forward_hook(
                lambda _m, _i, out, layer=layer: zs.__setitem__(layer, out)
            )
        )
        handles.append(
            block.hook_resid_pre.register_forward_hook(
                lambda _m, _i, out, layer=layer: resids.__setitem__(layer, out)
            )
        )
    model.train()
    for step in range(steps):
        tokens, period = induction.sample_sequences(batch_size, gen)
        target = induction.make_targets(tokens, period)
        logits = model(tokens)
        ce = nn.functional.cross_entropy(
            logits.flatten(0, 1), target.flatten(), ignore_index=induction.IGNORE
        )
        ratio = induction.head_output_ratio(
            model, [zs[i] for i in range(len(zs))], [resids[i] for i in range(len(resids))]
        )
        weight = penalty * min(1.0, step / max(1, PENALTY_RAMP * steps))
        loss = ce + weight * (ratio + PENALTY_EPS).sqrt().sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if log_every and (step % log_every == 0 or step == steps - 1):
            print(
                f"step {step:5d}  loss {ce.item():.4f}  output ratio "
                f"{ratio.detach().numpy().round(3).tolist()}",
                flush=True,
            )
    for h in handles:
        h.remove()
    return model.eval()


@torch.no_grad()
def mean_ablation_losses(model: HookedTransformer, truth: list[str]) -> dict[str, dict[str, float]]:
    """Diagnostics only (not the ground truth): loss and accuracy when one head's ``hook_z``
    is replaced by its mean over reference data (global: over examples and positions, as the
    organism's ``per_position_means`` is False); also all of ``truth`` and all the rest."""
    ref = induction.make_batches(1024, 256, ABLATION_SEED)
    evals = induction.make_batches(1024, 256, ABLATION_SEED + 1)
    acts: dict[int, list[torch.Tensor]] = {}
    hooks = [
        block.attn.hook_z.register_forward_hook(
            lambda _m, _i, out, layer=layer: acts.setdefault(layer, []).append(out)
        )
        for layer, block in enumerate(model.blocks)
    ]
    for batch in ref:
        model(batch["tokens"])
    for h in hooks:
        h.remove()
    means = {layer: torch.cat(v).flatten(0, 1).mean(dim=0) for layer, v in acts.items()}

    def loss_without(heads: list[tuple[int, int]]) -> dict[str, float]:
        hooks = []
        for layer in {layer for layer, _ in heads}:
            sel = [h for lay, h in heads if lay == layer]

            def replace(_m, _i, out, layer=layer, sel=sel):
                out = out.clone()
                out[:, :, sel] = means[layer][sel]
                return out

            hooks.append(model.blocks[layer].attn.hook_z.register_forward_hook(replace))
        try:
            metrics = induction.evaluate(model, evals)
            return {
                "loss": float(f"{metrics['loss']:.4g}"),
                "accuracy": round(metrics["accuracy"], 5),
            }
        finally:
            for h in hooks:
                h.remove()

    cfg = model.cfg
    heads = [(layer, h) for layer in range(cfg.n_layers) for h in range(cfg.n_heads)]
    sites = induction.head_sites(cfg.n_layers, cfg.n_heads)
    out = {"none": loss_without([])}
    out.update({site: loss_without([head]) for site, head in zip(sites, heads, strict=True)})
    out["ground_truth"] = loss_without(
        [hd for hd, s in zip(heads, sites, strict=True) if s in truth]
    )
    out["all_but_ground_truth"] = loss_without(
        [hd for hd, s in zip(heads, sites, strict=True) if s not in truth]
    )
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default_out = Path(__file__).resolve().parents[1] / "src/meanablate/organisms/data"
    parser.add_argument("--out-dir", type=Path, default=default_out)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=4000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument(
        "--penalty", type=float, default=0.01, help="weight of the head-output sparsity penalty"
    )
    parser.add_argument("--log-every", type=int, default=1000)
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (the result depends on it)"
    )
    args = parser.parse_args(argv)
    # One thread: bit-reproducible (the reduction order depends on the thread count) and,
    # for a model this small, as fast as more threads.
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)

    t0, c0 = time.perf_counter(), time.process_time()
    model = train(args.seed, args.steps, args.batch_size, args.lr, args.penalty, args.log_every)
    train_seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - c0

    metrics = induction.evaluate(model, induction.make_batches(EVAL_EXAMPLES, 256, EVAL_SEED))
    scores = induction.head_scores(model, n_examples=SCORE_EXAMPLES, seed=SCORE_SEED)
    truth = induction.ground_truth_from_scores(
        scores, PREV_THRESHOLD, INDUCTION_THRESHOLD, OUTPUT_THRESHOLD
    )
    cfg = model.cfg
    print(
        f"trained in {train_seconds:.1f}s ({cpu_seconds:.1f}s CPU): loss {metrics['loss']:.3g} "
        f"accuracy {metrics['accuracy']:.4f} (log vocab {math.log(cfg.d_vocab):.3f})"
    )
    for name, s in scores.items():
        print(f"{name} scores [layer, head]:\n{s.numpy().round(3)}")
    print("ground truth:", truth)
    ablation = mean_ablation_losses(model, truth["all"])
    print("mean ablation per head (diagnostics):", json.dumps(ablation, indent=1))

    card = {
        "name": "induction",
        "description": (
            "2-layer attention-only transformer (2 heads per layer) trained on BOS, prefix, "
            "A, A sequences (A: `period` distinct random tokens, repeated), with a sparsity "
            "penalty on the heads' outputs. A previous-token head in layer 0 and an induction "
            "head in layer 1 predict the second copy of A; the other two heads write almost "
            "nothing."
        ),
        "vocab": {
            "d_vocab": cfg.d_vocab,
            "bos": induction.BOS,
            "tokens": f"1..{cfg.d_vocab - 1} (random; no meaning)",
        },
        "input_length": cfg.n_ctx,
        "task": {
            "layout": "BOS, prefix, A, A; len(prefix) = n_ctx - 1 - 2 * period >= 1",
            "period": [induction.MIN_PERIOD, induction.MAX_PERIOD],
            "A": "distinct tokens; prefix drawn with replacement from tokens not in A",
            "target": "next token at positions from the start of the second copy of A to "
            "n_ctx - 2; -100 elsewhere",
        },
        "config": asdict(cfg),
        "metric": "loss",
        "units": induction.head_sites(cfg.n_layers, cfg.n_heads),
        "training": {
            "seed": args.seed,
            "steps": args.steps,
            "batch_size": args.batch_size,
            "lr": args.lr,
            "optimizer": "AdamW(weight_decay=0.01, betas=(0.9, 0.98)), warm-up + cosine, "
            "grad clip 1.0",
            "loss": "cross-entropy on scored positions only + penalty * "
            "sum over heads of sqrt(output_ratio + eps), the weight ramped linearly from 0 "
            "over the first ramp * steps steps (output_ratio: see scores.definition)",
            "penalty": args.penalty,
            "eps": PENALTY_EPS,
            "ramp": PENALTY_RAMP,
            "seconds": round(train_seconds, 1),
            "cpu_seconds": round(cpu_seconds, 1),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
        },
        "metrics": {
            "loss": float(f"{metrics['loss']:.4g}"),
            "accuracy": round(metrics["accuracy"], 5),
            "log_vocab": round(math.log(cfg.d_vocab), 5),
            "n_examples": EVAL_EXAMPLES,
            "seed": EVAL_SEED,
            "note": "on scored positions (the repeated half), from make_batches(n, 256, seed)",
        },
        "scores": {
            "definition": {
                "prev_token": "mean attention from position i to i-1 (i >= 1), hook_pattern",
                "induction": "mean attention from a token q of the second copy of A to the "
                "position after its earlier occurrence (q - period + 1)",
                "current_token": "mean attention from position i to itself (i >= 1); "
                "informational, not used for the ground truth",
                "output_ratio": "mean over examples and positions i >= 1 of "
                "||z_h W_O[h]|| / ||resid_pre|| (the norm of what the head writes relative to "
                "the residual stream it reads)",
            },
            "n_examples": SCORE_EXAMPLES,
            "seed": SCORE_SEED,
            "prev_token": [[round(v, 4) for v in row] for row in scores["prev_token"].tolist()],
            "induction": [[round(v, 4) for v in row] for row in scores["induction"].tolist()],
            "current_token": [
                [round(v, 4) for v in row] for row in scores["current_token"].tolist()
            ],
            "output_ratio": [[round(v, 4) for v in row] for row in scores["output_ratio"].tolist()],
        },
        "thresholds": {
            "prev_token": PREV_THRESHOLD,
            "induction": INDUCTION_THRESHOLD,
            "output_ratio": OUTPUT_THRESHOLD,
        },
        "previous_token_heads": truth["prev_token"],
        "induction_heads": truth["induction"],
        "ground_truth": truth["all"],
        "notes": (
            "Ground truth = heads with a prev_token or induction score above its threshold "
            "that also write to the residual stream (output_ratio above its threshold), read "
            "off the clean forward pass, independently of ablation. Scores are layer-major "
            "[layer][head]. The sparsity penalty leaves one head per role, so the circuit is "
            "not redundant: mean-ablating either circuit head alone destroys the task, and "
            "mean-ablating both other heads together leaves the loss and accuracy at the "
            "clean model's; see diagnostics.mean_ablation."
        ),
        "diagnostics": {
            "mean_ablation": ablation,
            "definition": "loss and accuracy on make_batches(1024, 256, seed + 1) when the "
            "head's hook_z is replaced by its mean over examples and positions of "
            "make_batches(1024, 256, seed); "
            "'none' = clean; 'ground_truth' / 'all_but_ground_truth' = those heads together. "
            "Not used to define the ground truth.",
            "seed": ABLATION_SEED,
        },
    }

    args.out_dir.mkdir(parents=True, exist_ok=True)
    weights = args.out_dir / induction.WEIGHTS_FILE
    save_model(model, weights, extra={"card": induction.CARD_FILE, "seed": args.seed})
    (args.out_dir / induction.CARD_FILE).write_text(json.dumps(card, indent=2) + "\n")
    reloaded = load_model(weights)
    tokens = induction.make_batches(8, 8, 0)[0]["tokens"]
    assert torch.equal(reloaded(tokens), model(tokens)), "reloaded model differs"
    print(f"wrote {weights} ({weights.stat().st_size / 1e3:.0f} kB) and {induction.CARD_FILE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
