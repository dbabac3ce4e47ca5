"""The shipped induction organism: its circuit (from attention patterns) and its skill."""

from __future__ import annotations

import math

import pytest
import torch

from meanablate.organisms import induction, registry
from meanablate.organisms.transformer import HookedTransformer


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
        scores, thresholds["prev_token"], thresholds["induction"]
    )
    assert truth["prev_token"] == card["previous_token_heads"]
    assert truth["induction"] == card["induction_heads"]
    assert truth["all"] == card["ground_truth"] == organism.ground_truth
    # the mechanism: previous-token heads in layer 0 feed induction heads in layer 1
    assert truth["prev_token"] and all(s.startswith("blocks.0.") for s in truth["prev_token"])
    assert truth["induction"] and all(s.startswith("blocks.1.") for s in truth["induction"])
    # clear margins, and the card's numbers reproduce on fresh data
    for key in ("prev_token", "induction"):
        fresh = scores[key]
        assert ((fresh - thresholds[key]).abs() > 0.15).all(), (key, fresh)
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
    model = HookedTransformer(induction.default_config())
    scores = induction.head_scores(model, n_examples=16, seed=0, batch_size=8)
    for key in ("prev_token", "induction"):
        assert scores[key].shape == (2, 4)
        assert ((scores[key] >= 0) & (scores[key] <= 1)).all()
