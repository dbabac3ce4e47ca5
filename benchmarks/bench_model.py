"""A trained version of the discovery benchmark's transformer, cached on disk.

``bench_discovery.py`` times sweeps and attribution on a 4-layer GPT-2-style
:class:`~meanablate.organisms.HookedTransformer` (d_model 256, 4 heads of 64, 512 GELU
neurons per layer, vocab 1000, n_ctx 32, LayerNorm). With random weights the timings are
fine, but the attribution-vs-sweep correlations and the size of the discovered circuit say
little: a random network has no structure to find. This module trains that same
architecture on a small synthetic language so the benchmark can also be run on a model
with learned structure (bigram statistics in the embeddings and MLPs, and copying of
repeated spans, which needs previous-token and induction heads).

The language (vocab 1000, 32 tokens, token 0 = BOS at position 0):

- a sparse random bigram Markov chain over tokens 1..999: every token has ``N_SUCCESSORS``
  likely successors with Zipf weights, plus a little uniform noise so no transition is
  impossible (and the stationary distribution is far from uniform, which makes the
  unigram baseline a fair, not a strawman, comparison);
- in a fraction ``P_COPY`` of the sequences a span of ``COPY_LEN`` tokens from earlier in
  the sequence is repeated verbatim later on, after which the chain resumes.

Training is deterministic (fixed seeds, deterministic algorithms, a fixed thread count)
and cached: the first call trains and writes safetensors weights (no pickle) to
``benchmarks/.cache/`` under a name that encodes the config, steps and ``VERSION``;
later calls load them. Bump ``VERSION`` whenever the language or the recipe changes.

Run ``python benchmarks/bench_model.py [--steps N] [--cache-dir DIR]`` to train (or load)
and print the training time, the final train loss, the held-out loss and the loss of a
unigram baseline.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

import torch
from torch import Tensor, nn

from meanablate.organisms import HookedTransformer, TransformerConfig
from meanablate.organisms.transformer import load_model, save_model

__all__ = ["CONFIG", "VERSION", "evaluate", "sample_sequences", "trained_model"]

# Part of the cache file name: bump it when the language, the seeds or the recipe change,
# so that stale weights are never loaded silently.
VERSION = 1

CONFIG = TransformerConfig(
    n_layers=4,
    d_model=256,
    n_heads=4,
    d_head=64,
    d_vocab=1000,
    n_ctx=32,
    d_mlp=512,
    act_fn="gelu",
    normalization="LN",
)
DEFAULT_CACHE_DIR = Path(__file__).resolve().parent / ".cache"
DEFAULT_STEPS = 800

BOS = 0
N_SUCCESSORS = 4  # likely successors per token: enough to need context, few to be learnable
ZIPF_EXPONENT = 1.0
NOISE = 0.1  # probability mass spread uniformly over all tokens 1..999
P_COPY = 0.8
COPY_LEN = (6, 12)  # inclusive range of the repeated span's length

# Separate streams so that the held-out and benchmark batches never share a generator
# state with training (a 32-token sequence repeating across streams is vanishingly rare).
LANGUAGE_SEED = 1234
INIT_SEED = 0
TRAIN_SEED = 1
HELDOUT_SEED = 2
BENCH_SEED = 3

BATCH_SIZE = 64
LR = 2e-3
TRAIN_THREADS = 2  # the weights are bit-reproducible only for a fixed thread count
HELDOUT_SEQUENCES = 2048


def _transition_matrix() -> Tensor:
    """Row ``t`` = distribution of the token after ``t`` (``[d_vocab, d_vocab]``, float64)."""
    v = CONFIG.d_vocab
    gen = torch.Generator().manual_seed(LANGUAGE_SEED)
    ranks = torch.arange(1, N_SUCCESSORS + 1, dtype=torch.float64)
    zipf = ranks**-ZIPF_EXPONENT
    zipf = zipf / zipf.sum()
    probs = torch.zeros(v, v, dtype=torch.float64)
    for t in range(v):
        succ = torch.randperm(v - 1, generator=gen)[:N_SUCCESSORS] + 1
        probs[t, succ] = zipf
    probs = (1 - NOISE) * probs
    probs[:, 1:] += NOISE / (v - 1)
    # BOS never appears after position 0, so it is never a target.
    return probs


_TRANSITIONS: Tensor | None = None


def _transitions() -> Tensor:
    global _TRANSITIONS
    if _TRANSITIONS is None:
        _TRANSITIONS = _transition_matrix()
    return _TRANSITIONS


def sample_sequences(n: int, gen: torch.Generator) -> Tensor:
    """``n`` sequences ``[n, n_ctx]`` (int64) of the synthetic language, from ``gen``."""
    return _sample(n, gen)[0]


def _sample(n: int, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    """Sequences ``[n, n_ctx]`` and, per position, the earlier position it copies (-1: a
    Markov step), which is where an induction head has something to gain."""
    probs = _transitions().float()
    length = CONFIG.n_ctx
    tokens = torch.empty(n, length, dtype=torch.long)
    tokens[:, 0] = BOS
    # The first real token is uniform, so every row of the chain gets seen in training.
    tokens[:, 1] = torch.randint(1, CONFIG.d_vocab, (n,), generator=gen)

    # Copy plan: positions dst..dst+L-1 repeat src..src+L-1 with src+L <= dst, both spans
    # inside 1..length-1. Drawn up front so the main loop stays a single vectorized pass.
    lo, hi = COPY_LEN
    copy = torch.rand(n, generator=gen) < P_COPY
    span = torch.randint(lo, hi + 1, (n,), generator=gen)
    src = 1 + (torch.rand(n, generator=gen) * (length - 2 * span)).long()
    dst_lo = src + span
    dst = dst_lo + (torch.rand(n, generator=gen) * (length - span - dst_lo + 1)).long()
    source_pos = torch.full((n, length), -1, dtype=torch.long)
    offs = torch.arange(length)
    in_copy = copy[:, None] & (offs >= dst[:, None]) & (offs < (dst + span)[:, None])
    source_pos[in_copy] = (offs[None, :] - dst[:, None] + src[:, None]).expand(n, -1)[in_copy]

    rows = torch.arange(n)
    for p in range(2, length):
        nxt = torch.multinomial(probs[tokens[:, p - 1]], 1, generator=gen).squeeze(1)
        copied = tokens[rows, source_pos[:, p].clamp(min=0)]
        tokens[:, p] = torch.where(source_pos[:, p] >= 0, copied, nxt)
    return tokens, source_pos


def _cache_path(cache_dir: Path, steps: int) -> Path:
    c = CONFIG
    name = (
        f"bench_lm_L{c.n_layers}_d{c.d_model}_h{c.n_heads}x{c.d_head}_mlp{c.d_mlp}"
        f"_v{c.d_vocab}_ctx{c.n_ctx}_{c.act_fn}_{c.normalization}"
        f"_steps{steps}_v{VERSION}.safetensors"
    )
    return cache_dir / name


def _lm_loss(model: HookedTransformer, tokens: Tensor) -> Tensor:
    """Mean next-token cross-entropy over positions 1..n_ctx-1 (BOS is never a target)."""
    logits = model(tokens[:, :-1])
    return nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())


@torch.no_grad()
def evaluate(model: HookedTransformer, n: int = HELDOUT_SEQUENCES) -> dict[str, float]:
    """Held-out next-token losses (nats) on ``n`` sequences from a stream training never
    draws from, for the model and two reference predictors:

    - ``unigram``: the best context-free predictor (frequencies counted on a training-stream
      sample, add-one smoothed), what a model that learned nothing about context reaches;
    - ``chain``: the true Markov chain, which knows nothing about copying, so a model below
      it has learned to copy repeated spans.

    ``*_copy`` are the same losses restricted to copy positions whose previous token was
    copied too, where an induction head can predict the token exactly (``copy_fraction``:
    their share of all scored positions).
    """
    tokens, source = _sample(n, torch.Generator().manual_seed(HELDOUT_SEED))
    targets = tokens[:, 1:]
    model.eval()
    logits = torch.cat([model(chunk[:, :-1]) for chunk in tokens.split(256)])
    model_nll = -torch.log_softmax(logits.double(), -1).gather(-1, targets[..., None])[..., 0]

    train = sample_sequences(8192, torch.Generator().manual_seed(TRAIN_SEED))
    counts = torch.bincount(train[:, 1:].flatten(), minlength=CONFIG.d_vocab).double() + 1
    unigram_nll = -(counts / counts.sum()).log()[targets]

    chain_nll = -_transitions().log()[tokens[:, :-1], targets]
    # Position 1 follows BOS and is uniform by construction (the chain's BOS row is unused).
    chain_nll[:, 0] = math.log(CONFIG.d_vocab - 1)

    copy = (source[:, 1:] >= 0) & (source[:, :-1] >= 0)
    out = {"copy_fraction": copy.double().mean().item()}
    for name, nll in (("model", model_nll), ("unigram", unigram_nll), ("chain", chain_nll)):
        out[name] = nll.mean().item()
        out[f"{name}_copy"] = nll[copy].mean().item()
    return out


def _train(steps: int, log: bool) -> tuple[HookedTransformer, float]:
    """Train from fixed seeds; returns the model and the mean loss of the last 5% of steps
    (a single batch's loss is too noisy to report)."""
    torch.manual_seed(INIT_SEED)
    model = HookedTransformer(CONFIG)
    # Decay only the matrices, as GPT-2-style recipes do: decaying LayerNorm gains and
    # biases pulls them towards 0 for no regularization benefit.
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=LR,
        betas=(0.9, 0.98),
    )
    warmup = max(1, steps // 20)

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    gen = torch.Generator().manual_seed(TRAIN_SEED)
    tail = max(1, steps // 20)
    tail_losses: list[float] = []
    log_every = max(1, steps // 10)
    model.train()
    for step in range(steps):
        loss = _lm_loss(model, sample_sequences(BATCH_SIZE, gen))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step >= steps - tail:
            tail_losses.append(loss.item())
        if log and (step % log_every == 0 or step == steps - 1):
            print(f"step {step:5d}  loss {loss.item():.4f}", flush=True)
    return model.eval(), sum(tail_losses) / len(tail_losses)


def _save_atomic(model: HookedTransformer, path: Path, extra: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # Same directory, so the rename is atomic: a concurrent or killed run never leaves a
    # half-written file under the final name.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        save_model(model, tmp, extra=extra)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def trained_model(
    cache_dir: Path | None = None, steps: int = DEFAULT_STEPS, log: bool = True
) -> tuple[HookedTransformer, dict]:
    """The benchmark transformer trained for ``steps`` steps, in eval mode, and a benchmark
    batch ``{"tokens": LongTensor[32, 32]}`` of held-out sequences from the same language.

    Loads the weights from ``cache_dir`` (default ``benchmarks/.cache/``) when present;
    otherwise trains (deterministically, about 3-4 minutes on 2 CPU cores for the default
    steps) and writes them there. The caller's thread count and determinism setting are
    restored afterwards.
    """
    path = _cache_path(Path(cache_dir) if cache_dir is not None else DEFAULT_CACHE_DIR, steps)
    if path.exists():
        model = load_model(path)
        if log:
            print(f"loaded {path}")
    else:
        threads = torch.get_num_threads()
        deterministic = torch.are_deterministic_algorithms_enabled()
        torch.set_num_threads(TRAIN_THREADS)
        torch.use_deterministic_algorithms(True)
        try:
            t0 = time.perf_counter()
            model, train_loss = _train(steps, log)
            seconds = time.perf_counter() - t0
        finally:
            torch.set_num_threads(threads)
            torch.use_deterministic_algorithms(deterministic)
        extra = {
            "version": VERSION,
            "steps": steps,
            "batch_size": BATCH_SIZE,
            "lr": LR,
            "train_loss": round(train_loss, 5),
            "train_seconds": round(seconds, 1),
            "threads": TRAIN_THREADS,
            "torch": torch.__version__,
        }
        _save_atomic(model, path, extra)
        if log:
            print(f"trained in {seconds:.1f} s; wrote {path}")
    tokens = sample_sequences(32, torch.Generator().manual_seed(BENCH_SEED))
    return model.eval(), {"tokens": tokens}


def _training_info(path: Path) -> dict:
    """The training record that :func:`trained_model` stored in the file's metadata."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    return json.loads(meta.get("extra", "{}"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE_DIR)
    args = parser.parse_args()
    t0 = time.perf_counter()
    model, batch = trained_model(args.cache_dir, args.steps)
    wall = time.perf_counter() - t0
    path = _cache_path(args.cache_dir, args.steps)
    info = _training_info(path)
    print(f"trained_model(): {wall:.2f} s wall this run; cache file {path.stat().st_size:,} bytes")
    print(
        f"training: {info.get('train_seconds')} s on {info.get('threads')} threads, "
        f"{info.get('steps')} steps x {info.get('batch_size')} x {CONFIG.n_ctx} tokens"
    )
    print(f"final train loss (mean of last 5% of steps): {info.get('train_loss'):.4f}")
    ev = evaluate(model)
    print(f"held-out loss:            {ev['model']:.4f}")
    print(f"unigram baseline loss:    {ev['unigram']:.4f}")
    print(f"Markov-chain oracle loss: {ev['chain']:.4f}  (true bigram chain, blind to copying)")
    print(f"uniform loss (log 999):   {math.log(CONFIG.d_vocab - 1):.4f}")
    print(
        f"on copy positions ({ev['copy_fraction']:.1%} of targets): model "
        f"{ev['model_copy']:.4f}, chain oracle {ev['chain_copy']:.4f}, unigram "
        f"{ev['unigram_copy']:.4f}, perfect copying 0"
    )
    print(f"benchmark batch: tokens {tuple(batch['tokens'].shape)} {batch['tokens'].dtype}")


if __name__ == "__main__":
    main()
