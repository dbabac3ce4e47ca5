"""Hand-written references for tracr organisms: means, mean ablation, metrics, brute force.

Independent of the library: means are averaged from activations caught by plain forward
hooks (per position; over all positions; over positions 1.. with BOS keeping its own),
every subset is ablated by plain forward hooks that overwrite the unit's output, and the
metric is computed from its definition.
"""

from __future__ import annotations

import itertools
import math
import re

import torch

_UNIT = re.compile(r"^(blocks\.\d+\.attn\.hook_z)\[heads=(\d+)\]$|^(blocks\.\d+\.hook_mlp_out)$")


def parse(unit: str) -> tuple[str, int | None]:
    m = _UNIT.match(unit)
    assert m, unit
    return (m.group(1), int(m.group(2))) if m.group(1) else (m.group(3), None)


def hand_means(model, tokens, units, kind: str) -> dict[str, torch.Tensor]:
    """[pos, ...] float64 means of each unit's module output, for ``kind``."""
    seen: dict[str, torch.Tensor] = {}
    keys = {parse(u)[0] for u in units}
    handles = [
        model.get_submodule(k).register_forward_hook(
            lambda _m, _a, out, k=k: seen.__setitem__(k, out.detach().double())
        )
        for k in keys
    ]
    try:
        with torch.no_grad():
            model(tokens)
    finally:
        for h in handles:
            h.remove()
    out = {}
    for k, a in seen.items():  # a: [n, pos, ...]
        per_pos = a.mean(0)
        if kind == "per_position":
            out[k] = per_pos
        elif kind == "plain":
            out[k] = a.flatten(0, 1).mean(0).expand_as(per_pos).clone()
        else:  # plain_except: BOS (position 0) keeps its own mean
            rest = a[:, 1:].flatten(0, 1).mean(0)
            out[k] = torch.cat([per_pos[:1], rest.expand_as(per_pos[1:])])
    return out


def hand_logits(model, tokens, ablated, means) -> torch.Tensor:
    handles = []
    for unit in ablated:
        key, head = parse(unit)

        def hook(_m, _a, out, key=key, head=head):
            mean = means[key].to(out.dtype).expand(out.shape)
            out = out.clone()
            if head is None:
                out[...] = mean
            else:
                out[:, :, head] = mean[:, :, head]
            return out

        handles.append(model.get_submodule(key).register_forward_hook(hook))
    try:
        with torch.no_grad():
            return model(tokens)
    finally:
        for h in handles:
            h.remove()


def hand_kl(logits, clean, scored) -> float:
    """KL(clean || ablated) at every scored position, from its definition with plain
    Python sums, mean over scored positions per example, then over examples."""
    per_example = []
    for i in range(logits.shape[0]):
        values = []
        for pos in range(logits.shape[1]):
            if not scored[i, pos]:
                continue
            zp = [float(v) for v in clean[i, pos]]
            zq = [float(v) for v in logits[i, pos]]
            lse_p = math.log(sum(math.exp(v) for v in zp))
            lse_q = math.log(sum(math.exp(v) for v in zq))
            kl = sum(math.exp(a - lse_p) * ((a - lse_p) - (b - lse_q)) for a, b in zip(zp, zq))
            values.append(kl)
        per_example.append(sum(values) / len(values))
    return sum(per_example) / len(per_example)


def hand_metric(metric: str, logits, batch, clean=None) -> float:
    logits = logits.double()
    if metric == "mse":
        value = batch["target_value"].double()
        scored = ~value.isnan()
        per_pos = (logits[..., 0] - value.nan_to_num()).pow(2)
    elif metric == "kl":
        scored = batch["target"] != -100
        lq = torch.log_softmax(clean.double(), -1)
        per_pos = (lq.exp() * (lq - torch.log_softmax(logits, -1))).sum(-1)
    else:
        assert metric == "loss", metric
        scored = batch["target"] != -100
        logp = torch.log_softmax(logits, -1)
        per_pos = -logp.gather(-1, batch["target"].clamp(min=0)[..., None])[..., 0]
    per_pos = torch.where(scored, per_pos, torch.zeros_like(per_pos))
    return float((per_pos.sum(1) / scored.sum(1)).mean())


def brute_force(model, batch, units, metric: str, ref_means, target: float):
    """``(faithfulness of every subset, the minimal subsets reaching target)``."""
    tokens = batch["tokens"]
    clean = hand_logits(model, tokens, [], ref_means)
    m = {
        frozenset(kept): hand_metric(
            metric,
            hand_logits(model, tokens, [u for u in units if u not in kept], ref_means),
            batch,
            clean,
        )
        for r in range(len(units) + 1)
        for kept in itertools.combinations(units, r)
    }
    full, empty = m[frozenset(units)], m[frozenset()]
    faith = {s: (v - empty) / (full - empty) for s, v in m.items()}
    size = min(len(s) for s, f in faith.items() if f >= target)
    minimal = {s for s, f in faith.items() if len(s) == size and f >= target}
    return faith, minimal
