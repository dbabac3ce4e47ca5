"""The induction organism: a trained 2-layer attention-only transformer.

Task: each sequence is ``BOS, prefix, A, A`` where ``A`` is a segment of ``period``
distinct random tokens that repeats, and ``prefix`` is filler drawn from the tokens not in
``A``. The period varies per sequence (and with it where the repeat starts), so no
positional shortcut predicts the second copy: the model must find the earlier occurrence
of the current token and copy the token after it, i.e. the previous-token head (layer 0)
plus induction head (layer 1) circuit.

Batches (the convention shared by all organisms) are dicts with ``tokens``
``[batch, pos]`` and ``target`` ``[batch, pos]``: the correct next token at the scored
positions (inside the second copy of ``A``, from its first token up to the last but one
position, where induction predicts the next token) and ``-100`` elsewhere.

The ground truth is read off the forward pass, independently of any ablation: a head's
previous-token score is its mean attention from position ``i`` to ``i - 1``, its induction
score its mean attention from a token in the second copy to the position right after that
token's earlier occurrence, and its output ratio the mean norm of what it writes,
``||z_h W_O[h]||``, relative to the norm of the residual stream it reads. A head is in the
ground truth when it has a high previous-token or induction score *and* writes something
(output ratio above a threshold). See :func:`head_scores` and
:func:`ground_truth_from_scores`.
"""

from __future__ import annotations

import math
from importlib import resources
from typing import Any

import torch
from torch import Tensor, nn

from meanablate.organisms import registry
from meanablate.organisms.transformer import HookedTransformer, TransformerConfig, load_model

__all__ = [
    "BOS",
    "CARD_FILE",
    "D_VOCAB",
    "MAX_PERIOD",
    "MIN_PERIOD",
    "N_CTX",
    "WEIGHTS_FILE",
    "default_config",
    "evaluate",
    "ground_truth_from_scores",
    "head_output_ratio",
    "head_scores",
    "head_sites",
    "load_induction",
    "make_batches",
    "make_targets",
    "sample_sequences",
]

BOS = 0
D_VOCAB = 50
N_CTX = 32
MIN_PERIOD = 5
MAX_PERIOD = (N_CTX - 2) // 2  # 15: at least one prefix token
WEIGHTS_FILE = "induction.safetensors"
CARD_FILE = "induction.json"
IGNORE = -100

Batch = dict[str, Tensor]


def default_config() -> TransformerConfig:
    """The organism's architecture: 2 attention-only layers, 2 heads of 32, LayerNorm."""
    return TransformerConfig(
        n_layers=2,
        d_model=64,
        n_heads=2,
        d_head=32,
        d_vocab=D_VOCAB,
        n_ctx=N_CTX,
        d_mlp=None,
        normalization="LN",
    )


def sample_sequences(
    n: int,
    generator: torch.Generator,
    *,
    n_ctx: int = N_CTX,
    d_vocab: int = D_VOCAB,
    min_period: int = MIN_PERIOD,
    max_period: int = MAX_PERIOD,
) -> tuple[Tensor, Tensor]:
    """Draw ``n`` sequences ``BOS, prefix, A, A``.

    Returns ``tokens`` ``[n, n_ctx]`` (long) and ``period`` ``[n]`` (long, the length of
    ``A``, uniform in ``[min_period, max_period]``). ``A`` holds distinct tokens from
    ``1..d_vocab-1``; the prefix (length ``n_ctx - 1 - 2 * period`` >= 1) is drawn with
    replacement from the tokens not in ``A``, so every token of the second copy has exactly
    one earlier occurrence.
    """
    body = n_ctx - 1
    if not 1 <= min_period <= max_period or 2 * max_period > body - 1:
        raise ValueError(f"need 1 <= min_period <= max_period <= {(body - 1) // 2}")
    n_tokens = d_vocab - 1
    if n_tokens <= max_period:
        raise ValueError("d_vocab must exceed max_period + 1")
    period = torch.randint(min_period, max_period + 1, (n,), generator=generator)
    # A random permutation of 1..d_vocab-1 per row: A is its first `period` entries.
    perm = torch.rand(n, n_tokens, generator=generator).argsort(dim=1) + 1
    prefix_len = body - 2 * period  # [n]
    j = torch.arange(body).expand(n, body)  # position inside the body
    L, P = period[:, None], prefix_len[:, None]
    # Prefix: entries of perm[period:], chosen uniformly with replacement.
    u = torch.rand(n, body, generator=generator)
    prefix_idx = L + (u * (n_tokens - L)).long().clamp(max=n_tokens - 1)
    seg_idx = torch.where(j < P + L, j - P, j - P - L).clamp(min=0)
    idx = torch.where(j < P, prefix_idx, seg_idx)
    tokens = torch.cat([torch.full((n, 1), BOS), perm.gather(1, idx)], dim=1)
    return tokens, period


def _second_copy_start(tokens: Tensor, period: Tensor) -> Tensor:
    """Position of the first token of the second copy of ``A``: ``[batch]``."""
    return tokens.shape[1] - period


def make_targets(tokens: Tensor, period: Tensor) -> Tensor:
    """``target [batch, pos]``: the next token at scored positions, ``-100`` elsewhere.

    Scored positions run from the first token of the second copy to the last but one
    position (the last has no next token).
    """
    n, n_pos = tokens.shape
    target = torch.full_like(tokens, IGNORE)
    pos = torch.arange(n_pos).expand(n, n_pos)
    scored = (pos >= _second_copy_start(tokens, period)[:, None]) & (pos < n_pos - 1)
    nxt = torch.cat([tokens[:, 1:], torch.full((n, 1), IGNORE)], dim=1)
    target[scored] = nxt[scored]
    return target


def make_batches(n_examples: int, batch_size: int, seed: int) -> list[Batch]:
    """``n_examples`` fresh sequences in batches of ``batch_size`` (last may be smaller).

    Each batch: ``tokens`` ``[batch, 32]`` and ``target`` ``[batch, 32]`` (see module doc).
    """
    if n_examples < 1 or batch_size < 1:
        raise ValueError("n_examples and batch_size must be >= 1")
    gen = torch.Generator().manual_seed(int(seed))
    batches: list[Batch] = []
    for start in range(0, n_examples, batch_size):
        tokens, period = sample_sequences(min(batch_size, n_examples - start), gen)
        batches.append({"tokens": tokens, "target": make_targets(tokens, period)})
    return batches


def head_sites(n_layers: int, n_heads: int) -> list[str]:
    """Every head as a site string ``blocks.{L}.attn.hook_z[heads={h}]``."""
    return [
        f"blocks.{layer}.attn.hook_z[heads={h}]"
        for layer in range(n_layers)
        for h in range(n_heads)
    ]


def head_output_ratio(model: HookedTransformer, z: list[Tensor], resid: list[Tensor]) -> Tensor:
    """``||z_h W_O[h]|| / ||resid_pre||`` per head, averaged over positions ``i >= 1``.

    ``z[layer]`` is ``hook_z`` ``[batch, pos, head, d_head]`` and ``resid[layer]``
    ``hook_resid_pre`` ``[batch, pos, d_model]``; returns ``[n_layers, n_heads]`` (averaged
    over the batch too). Differentiable: training penalises it (see
    ``scripts/train_induction.py``).
    """
    rows = []
    for layer, block in enumerate(model.blocks):
        out = torch.einsum("bphe,hed->bphd", z[layer], block.attn.W_O).norm(dim=-1)
        ratio = out / resid[layer].norm(dim=-1, keepdim=True)
        rows.append(ratio[:, 1:].mean(dim=(0, 1)))
    return torch.stack(rows)


@torch.no_grad()
def _forward_parts(
    model: HookedTransformer, tokens: Tensor
) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
    """Per layer: attention patterns ``[batch, head, q, k]`` (``hook_pattern``), ``hook_z``
    and ``hook_resid_pre``."""
    pats: list[Tensor] = []
    zs: list[Tensor] = []
    resids: list[Tensor] = []
    from meanablate.hooks import attached

    planned = []
    for block in model.blocks:
        for hook, out in (
            (block.attn.hook_pattern, pats),
            (block.attn.hook_z, zs),
            (block.hook_resid_pre, resids),
        ):
            planned.append((hook, "forward", lambda _m, _i, o, out=out: out.append(o.detach())))
    with attached(planned):  # atomic against Ctrl-C
        model(tokens)
    return pats, zs, resids


@torch.no_grad()
def head_scores(
    model: HookedTransformer, n_examples: int = 512, seed: int = 1234, batch_size: int = 256
) -> dict[str, Tensor]:
    """Per-head previous-token and induction scores (attention patterns) and output ratio.

    Returns ``{"prev_token", "induction", "current_token", "output_ratio"}``, each
    ``[n_layers, n_heads]``:

    - ``prev_token``: mean over sequences and positions ``i >= 1`` of ``pattern[i, i-1]``;
    - ``induction``: mean over sequences and positions ``q`` of the second copy of ``A`` of
      ``pattern[q, q - period + 1]`` (the position after the earlier occurrence of the
      token at ``q``);
    - ``current_token`` (informational): mean over positions ``i >= 1`` of ``pattern[i, i]``;
    - ``output_ratio``: mean over sequences and positions ``i >= 1`` of
      ``||z_h W_O[h]|| / ||resid_pre||`` (see :func:`head_output_ratio`).

    Computed on fresh data from :func:`sample_sequences` (seeded with ``seed``).
    """
    gen = torch.Generator().manual_seed(int(seed))
    prev_sum = induction_sum = self_sum = None
    ratio_sum = torch.zeros(model.cfg.n_layers, model.cfg.n_heads)
    n_prev = n_ind = 0
    was_training = model.training
    model.eval()
    try:
        for start in range(0, n_examples, batch_size):
            tokens, period = sample_sequences(
                min(batch_size, n_examples - start),
                gen,
                n_ctx=model.cfg.n_ctx,
                d_vocab=model.cfg.d_vocab,
            )
            n, n_pos = tokens.shape
            pattern_list, zs, resids = _forward_parts(model, tokens)
            pats = torch.stack(pattern_list, dim=1)  # [batch, layer, head, q, k]
            ratio_sum += head_output_ratio(model, zs, resids) * n
            q = torch.arange(1, n_pos)
            prev = pats[..., q, q - 1].sum(dim=(0, -1))  # [layer, head]
            cur = pats[..., q, q].sum(dim=(0, -1))
            pos = torch.arange(n_pos).expand(n, n_pos)
            in_copy = pos >= _second_copy_start(tokens, period)[:, None]  # [batch, q]
            key = (pos - period[:, None] + 1).clamp(min=0)  # [batch, q]
            idx = key[:, None, None, :, None].expand(*pats.shape[:-1], 1)
            att = pats.gather(-1, idx).squeeze(-1)  # [batch, layer, head, q]
            ind = (att * in_copy[:, None, None, :]).sum(dim=(0, -1))
            prev_sum = prev if prev_sum is None else prev_sum + prev
            induction_sum = ind if induction_sum is None else induction_sum + ind
            self_sum = cur if self_sum is None else self_sum + cur
            n_prev += n * (n_pos - 1)
            n_ind += int(in_copy.sum())
    finally:
        model.train(was_training)
    assert prev_sum is not None and induction_sum is not None and self_sum is not None
    return {
        "prev_token": prev_sum / n_prev,
        "induction": induction_sum / n_ind,
        "current_token": self_sum / n_prev,
        "output_ratio": ratio_sum / n_examples,
    }


def ground_truth_from_scores(
    scores: dict[str, Tensor],
    prev_threshold: float,
    induction_threshold: float,
    output_threshold: float | None = None,
) -> dict[str, list[str]]:
    """Heads whose scores exceed the thresholds, as site strings.

    A head is a previous-token (induction) head when its ``prev_token`` (``induction``)
    score exceeds ``prev_threshold`` (``induction_threshold``) and, if ``output_threshold``
    is given, its ``output_ratio`` exceeds ``output_threshold`` (it writes to the residual
    stream). Returns ``{"prev_token": [...], "induction": [...], "all": [...]}``; ``all``
    is the union in site order (a head counted in both roles appears once).
    """
    n_layers, n_heads = scores["prev_token"].shape
    sites = head_sites(n_layers, n_heads)
    if output_threshold is None:
        writes = [True] * len(sites)
    else:
        writes = [v > output_threshold for v in scores["output_ratio"].flatten().tolist()]
    prev = [
        s
        for s, v, w in zip(sites, scores["prev_token"].flatten().tolist(), writes, strict=True)
        if v > prev_threshold and w
    ]
    ind = [
        s
        for s, v, w in zip(sites, scores["induction"].flatten().tolist(), writes, strict=True)
        if v > induction_threshold and w
    ]
    return {"prev_token": prev, "induction": ind, "all": [s for s in sites if s in {*prev, *ind}]}


@torch.no_grad()
def evaluate(model: nn.Module, batches: list[Batch]) -> dict[str, float]:
    """Mean cross-entropy and accuracy over the scored positions of ``batches``."""
    total_loss, correct, count = 0.0, 0, 0
    for batch in batches:
        logits = model(batch["tokens"])
        target = batch["target"]
        mask = target != IGNORE
        total_loss += float(
            nn.functional.cross_entropy(logits[mask], target[mask], reduction="sum")
        )
        correct += int((logits[mask].argmax(-1) == target[mask]).sum())
        count += int(mask.sum())
    return {"loss": total_loss / count, "accuracy": correct / count, "n_scored": float(count)}


def load_induction() -> registry.Organism:
    """The trained induction organism, from the package (offline, no pickle)."""
    card: dict[str, Any] = registry.card(CARD_FILE)
    with resources.as_file(registry.data_path(WEIGHTS_FILE)) as path:
        model = load_model(path)
    cfg = model.cfg
    return registry.Organism(
        name="induction",
        model=model,
        make_batches=make_batches,
        metric="loss",
        units=head_sites(cfg.n_layers, cfg.n_heads),
        ground_truth=list(card["ground_truth"]),
        card=card,
        description=(
            "2-layer attention-only transformer trained on repeated random tokens; "
            "a previous-token head in layer 0 feeds an induction head in layer 1 "
            f"(loss {card['metrics']['loss']:.3f} vs log(vocab) {math.log(D_VOCAB):.2f})."
        ),
    )
