"""The shipped induction organism: its circuit (from attention patterns and output norms,
independently of ablation), its skill, and that the circuit is what mean ablation finds."""

from __future__ import annotations

import math

import pytest
import torch

from meanablate.organisms import induction, registry
from meanablate.organisms.transformer import HookedTransformer
from meanablate.stats import compute_means


@pytest.fixture(scope="module")
def organism() -> registry.Organism:
    return registry.load("induction")


def test_organism_contract(organism: registry.Organism) -> None:
    assert organism.name == "induction"
    assert isinstance(organism.model, HookedTransformer)
    assert not organism.model.training
    cfg = organism.model.cfg
    assert (cfg.n_layers, cfg.d_mlp) == (2, None)  # attention only
    assert organism.metric == "loss"
    assert organism.units == [
        f"blocks.{layer}.attn.hook_z[heads={h}]" for layer in range(2) for h in range(cfg.n_heads)
    ]
    assert organism.ground_truth == organism.card["ground_truth"]
    assert set(organism.ground_truth) <= set(organism.units)


def test_make_batches_conventions() -> None:
    batches = induction.make_batches(70, 32, seed=5)
    assert [b["tokens"].shape[0] for b in batches] == [32, 32, 6]
    for b in batches:
        tokens, target = b["tokens"], b["target"]
        assert tokens.dtype == target.dtype == torch.long
        assert tokens.shape == target.shape == (tokens.shape[0], induction.N_CTX)
        assert (tokens[:, 0] == induction.BOS).all()
        scored = target != -100
        assert scored.any(dim=1).all() and not scored[:, -1].any()
        nxt = tokens[:, 1:]
        assert torch.equal(target[:, :-1][scored[:, :-1]], nxt[scored[:, :-1]])
        # a scored position's token occurred before, followed by the target
        for row in range(tokens.shape[0]):
            for q in scored[row].nonzero().flatten().tolist():
                earlier = (tokens[row, :q] == tokens[row, q]).nonzero().flatten().tolist()
                assert len(earlier) == 1
                assert tokens[row, earlier[0] + 1] == target[row, q]
    again = induction.make_batches(70, 32, seed=5)
    assert all(torch.equal(a["tokens"], b["tokens"]) for a, b in zip(batches, again, strict=True))
    assert not torch.equal(
        induction.make_batches(32, 32, seed=6)[0]["tokens"], batches[0]["tokens"]
    )


def test_attention_scores_recover_card_ground_truth(organism: registry.Organism) -> None:
    card = organism.card
    thresholds = card["thresholds"]
    # fresh data: a seed the card's scores did not use
    scores = induction.head_scores(organism.model, n_examples=512, seed=777)
    assert card["scores"]["seed"] != 777
    truth = induction.ground_truth_from_scores(
        scores, thresholds["prev_token"], thresholds["induction"], thresholds["output_ratio"]
    )
    # the attention patterns alone give the same heads (the output ratio is a safeguard)
    by_pattern = induction.ground_truth_from_scores(
        scores, thresholds["prev_token"], thresholds["induction"]
    )
    assert by_pattern == truth
    assert truth["prev_token"] == card["previous_token_heads"]
    assert truth["induction"] == card["induction_heads"]
    assert truth["all"] == card["ground_truth"] == organism.ground_truth
    # the mechanism: one previous-token head in layer 0 feeds one induction head in layer 1,
    # and at least one head lies outside the circuit (so AUROC against it is defined)
    assert len(truth["prev_token"]) == 1 and truth["prev_token"][0].startswith("blocks.0.")
    assert len(truth["induction"]) == 1 and truth["induction"][0].startswith("blocks.1.")
    assert len(truth["all"]) < len(organism.units)
    # clear margins, and the card's numbers reproduce on fresh data
    for key, margin in (("prev_token", 0.15), ("induction", 0.15), ("output_ratio", 0.04)):
        fresh = scores[key]
        assert ((fresh - thresholds[key]).abs() > margin).all(), (key, fresh)
        torch.testing.assert_close(fresh, torch.tensor(card["scores"][key]), atol=0.03, rtol=0)


def test_model_does_induction(organism: registry.Organism) -> None:
    batches = organism.make_batches(512, 256, 4242)
    metrics = induction.evaluate(organism.model, batches)
    log_vocab = math.log(organism.model.cfg.d_vocab)
    assert metrics["loss"] < 0.05 * log_vocab
    assert metrics["accuracy"] > 0.98
    assert organism.card["metrics"]["accuracy"] > 0.98

    # and only by induction: the first half's tokens cannot be predicted
    tokens, target = batches[0]["tokens"], batches[0]["target"]
    with torch.no_grad():
        logits = organism.model(tokens)
    first_scored = (target != -100).int().argmax(dim=1)  # start of the second copy
    rows = torch.arange(tokens.shape[0])
    before = first_scored - 1  # predicting the second copy's first token: not inferable
    loss_before = torch.nn.functional.cross_entropy(logits[rows, before], tokens[rows, before + 1])
    assert loss_before > 0.5 * log_vocab


def test_head_scores_shapes() -> None:
    cfg = induction.default_config()
    model = HookedTransformer(cfg)
    scores = induction.head_scores(model, n_examples=16, seed=0, batch_size=8)
    for key in ("prev_token", "induction", "current_token", "output_ratio"):
        assert scores[key].shape == (cfg.n_layers, cfg.n_heads)
        assert (scores[key] >= 0).all()
    for key in ("prev_token", "induction", "current_token"):
        assert (scores[key] <= 1).all()


def _mean_ablated(model, batches, means, heads: list[str]) -> dict[str, float]:
    """Loss and accuracy with ``heads`` (site strings) replaced by their global means."""
    handles = []
    for layer, block in enumerate(model.blocks):
        sel = [int(s.split("heads=")[1].rstrip("]")) for s in heads if f"blocks.{layer}." in s]
        if not sel:
            continue

        def hook(_m, _i, out, layer=layer, sel=sel):
            out = out.clone()
            out[:, :, sel] = means[f"blocks.{layer}.attn.hook_z"].to(out.dtype)[sel]
            return out

        handles.append(block.attn.hook_z.register_forward_hook(hook))
    try:
        return induction.evaluate(model, batches)
    finally:
        for h in handles:
            h.remove()


def test_circuit_is_not_redundant_under_mean_ablation(organism: registry.Organism) -> None:
    """Each ground-truth head matters alone; all the other heads together do not."""
    model, truth = organism.model, organism.ground_truth
    assert not organism.per_position_means
    ref = organism.make_batches(256, 256, 11)
    means = compute_means(model, organism.units, ref, per_position=False)
    batches = organism.make_batches(256, 256, 12)
    clean = induction.evaluate(model, batches)
    for head in truth:
        ablated = _mean_ablated(model, batches, means, [head])
        assert ablated["loss"] > clean["loss"] + 1.0, (head, ablated)
        assert ablated["accuracy"] < 0.5, (head, ablated)
    rest = [u for u in organism.units if u not in truth]
    ablated = _mean_ablated(model, batches, means, rest)
    assert ablated["loss"] < clean["loss"] + 0.01, ablated
    assert ablated["accuracy"] > 0.99, ablated
