"""The last block at the metric's positions only, on every Hugging Face family.

``Family.block_at`` computes a decoder/encoder block's output at some positions only
(queries there, keys and values from every position) by calling the block's own
submodules; a resumed sweep with a continuous metric that reads some positions (the last
token, a ``metric_mask``, a masked LM's targets) runs its last block and the tail there
only. The reference is the model's own forward (``model(...).logits`` cut at those
positions) and the sweep with ``fast=False`` (``ablate()`` + one full hooked forward per
unit), on left- and right-padded batches, eager and SDPA attention, grouped-query
attention, sliding windows, partial rotary, parallel and sequential residuals.
"""

from __future__ import annotations

from functools import cache

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

import meanablate as ma
from meanablate.discovery import layerskip
from meanablate.families import family_of

transformers = pytest.importorskip("transformers")

V, P, B = 40, 7, 3
IMPLS = ("sdpa", "eager")
FAMILIES = ("gpt2", "neox", "neox_seq", "llama", "qwen2", "mistral", "bert")


@cache
def _model(name: str, impl: str) -> nn.Module:
    t = transformers
    torch.manual_seed(0)
    common = dict(vocab_size=V, initializer_range=0.3, attn_implementation=impl)
    small = dict(num_hidden_layers=2, hidden_size=16, num_attention_heads=4)
    small.update(intermediate_size=24, max_position_embeddings=P)
    if name == "gpt2":
        cfg = t.GPT2Config(n_layer=2, n_embd=16, n_head=4, n_positions=P, **common)
        return t.GPT2LMHeadModel(cfg).eval()
    if name in ("neox", "neox_seq"):
        cfg = t.GPTNeoXConfig(
            **small, **common, rotary_pct=0.5, use_parallel_residual=name == "neox"
        )
        return t.GPTNeoXForCausalLM(cfg).eval()
    if name == "llama":  # grouped-query attention: 2 key/value heads for 4 query heads
        cfg = t.LlamaConfig(**small, **common, num_key_value_heads=2)
        return t.LlamaForCausalLM(cfg).eval()
    if name == "qwen2":  # biased q/k/v projections
        cfg = t.Qwen2Config(**small, **common, num_key_value_heads=2)
        return t.Qwen2ForCausalLM(cfg).eval()
    if name == "mistral":  # a sliding window shorter than the input
        cfg = t.MistralConfig(**small, **common, num_key_value_heads=1, sliding_window=3)
        return t.MistralForCausalLM(cfg).eval()
    return t.BertForMaskedLM(t.BertConfig(**small, **common)).eval()


def _mask(lengths: list[int], side: str) -> Tensor:
    ar = torch.arange(P)[None, :]
    n = torch.tensor(lengths)[:, None]
    real = ar < n if side == "right" else ar >= P - n
    return real.long()


def _ids(seed: int) -> Tensor:
    return torch.randint(0, V, (B, P), generator=torch.Generator().manual_seed(seed))


def _clean_and_calls(model: nn.Module, ids: Tensor, amask: Tensor | None):
    family = family_of(model)
    with torch.no_grad(), layerskip.record_block_calls(family) as calls:
        logits = model(input_ids=ids, attention_mask=amask).logits
    assert calls is not None and calls.resumable_from(0)
    return family, calls, logits


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("pad", [None, "left", "right"])
def test_block_at_equals_the_models_own_forward(name: str, impl: str, pad: str | None) -> None:
    model = _model(name, impl)
    amask = None if pad is None else _mask([P, P - 2, P - 4], pad)
    family, calls, logits = _clean_and_calls(model, _ids(1), amask)
    n_blocks = len(calls.calls)
    for positions in ([P - 1], [0, 3, P - 1], [2], list(range(P))):
        pos = torch.tensor(positions)
        args, kwargs = calls.calls[n_blocks - 1]  # type: ignore[misc]
        with torch.no_grad():
            assert family.block_at(n_blocks - 1, args, kwargs, pos) is not None
            for start in range(n_blocks):  # resumed from each block's recorded input
                hidden = calls.calls[start][0][0]  # type: ignore[index]
                got = layerskip.run_from(family, calls, start, hidden=hidden, positions=pos)
                torch.testing.assert_close(got, logits[:, pos], rtol=1e-5, atol=1e-5)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    name=st.sampled_from(FAMILIES),
    impl=st.sampled_from(IMPLS),
    side=st.sampled_from(["left", "right", "none"]),
    lengths=st.lists(st.integers(1, P), min_size=B, max_size=B),
    positions=st.sets(st.integers(0, P - 1), min_size=1, max_size=P),
    seed=st.integers(0, 2**16),
)
def test_block_at_property(
    name: str, impl: str, side: str, lengths: list[int], positions: set[int], seed: int
) -> None:
    """Any padding, any set of positions: the resumed run at those positions is the
    model's own logits there."""
    model = _model(name, impl)
    amask = None if side == "none" else _mask(lengths, side)
    family, calls, logits = _clean_and_calls(model, _ids(seed), amask)
    pos = torch.tensor(sorted(positions))
    last = len(calls.calls) - 1
    with torch.no_grad():
        hidden = calls.calls[last][0][0]  # type: ignore[index]
        got = layerskip.run_from(family, calls, last, hidden=hidden, positions=pos)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, logits[:, pos], rtol=1e-5, atol=1e-5)


def _units(model: nn.Module) -> list[str]:
    """A neuron and a head of block 0 (linear writes), and a whole MLP of block 0 and a
    neuron of the last block (the hooked route resumed from their block)."""
    fam = family_of(model)
    neurons = ma.transformer_units(model, "neurons", layers=[0])
    heads = ma.transformer_units(model, "heads", layers=[0])
    mlp = fam.site_of(fam.mlp_site, 0)  # type: ignore[attr-defined]
    last = ma.transformer_units(model, "neurons", layers=[1])
    return [neurons[3], heads[1], mlp, last[2]]


def _sweep_batches(name: str, side: str, how: str) -> list[dict]:
    out = []
    for seed, lengths in ((1, [P, P - 1, P - 3]), (2, [P - 2, P, P - 1])):
        ids = _ids(seed)
        amask = _mask(lengths, side)
        batch = {"input_ids": ids, "attention_mask": amask}
        real = amask.bool()
        if how == "last":  # the last real token of each row
            at = real.long().cumsum(1).argmax(1)
            scored = torch.zeros(B, P, dtype=torch.bool)
            scored[torch.arange(B), at] = True
        else:  # some real positions of each row
            gen = torch.Generator().manual_seed(seed + 10)
            scored = real & (torch.rand(B, P, generator=gen) < 0.4)
            scored[torch.arange(B), real.long().cumsum(1).argmax(1)] = True
        target = torch.randint(0, V, (B, P), generator=torch.Generator().manual_seed(seed))
        batch["target"] = torch.where(scored, target, torch.full_like(target, -100))
        batch["metric_mask"] = scored
        out.append(batch)
    return out


@pytest.mark.parametrize("how", ["last", "mask"])
@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("name", ["gpt2", "neox", "llama", "bert"])
def test_sweeps_at_the_read_positions_equal_the_hooked_forward(
    name: str, side: str, how: str, monkeypatch
) -> None:
    """A continuous sweep takes the positions-only last block (counted) and equals one
    full hooked forward per unit to float tolerance; accuracy never takes it and is
    equal bit for bit."""
    model = _model(name, "sdpa")
    batches = _sweep_batches(name, side, how)
    units = _units(model)
    means = ma.compute_means(model, sorted({ma.parse_site(u).key for u in units}), batches)
    used: list[int] = []
    original = type(family_of(model)).block_at

    def counting(self, *args):  # type: ignore[no-untyped-def]
        out = original(self, *args)
        used.append(out is not None)
        return out

    monkeypatch.setattr(type(family_of(model)), "block_at", counting)
    for metric in ("kl", "loss", "accuracy"):
        used.clear()
        fast = ma.sweep(model, batches, units, means, metric=metric)
        full = ma.sweep(model, batches, units, means, metric=metric, fast=False)
        if metric == "accuracy":
            assert not used
            assert torch.equal(fast.per_example, full.per_example)
            continue
        # units of block 0 resume before the last block: it runs at the positions only
        assert used and all(used) and len(used) >= len(batches) * 3
        torch.testing.assert_close(fast.per_example, full.per_example, rtol=1e-5, atol=1e-6)
        assert full.per_example.abs().max() > 1e-3  # the ablations matter


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("name", ["gpt2", "neox", "llama", "bert"])
def test_set_metric_resumes_from_the_earliest_block(name: str, side: str, monkeypatch) -> None:
    """``SetMetric`` (behind ``discover``/``prune``) on a Hugging Face family runs a set
    from its earliest unit's block (the embeddings run only in the clean runs), and
    equals ``ablate()`` + the plain forward: bit for bit for accuracy, to float
    tolerance for continuous metrics (at the read positions only when no unit of the
    set sits in the last block)."""
    from meanablate.discovery import SetMetric, metric_per_example

    model = _model(name, "sdpa")
    batches = _sweep_batches(name, side, "mask")
    # [block-0 neuron, block-0 head, block-0 MLP, last-block neuron, last block's input
    # at position 2 (a hook on the block itself, which the positions-only route skips)]
    units = _units(model) + ma.transformer_units(model, "positions", layers=[1], n_positions=P)[2:3]
    means = ma.compute_means(model, sorted({ma.parse_site(u).key for u in units}), batches)
    sets = [units[:1], units[:2], units[1:3], units[2:4], units[3:4], units[::4], units]
    embeds = [0]
    embedding = type(model.get_input_embeddings())
    original = embedding.forward

    def counting(self, x):  # type: ignore[no-untyped-def]
        embeds[0] += 1
        return original(self, x)

    for metric in ("kl", "loss", "accuracy"):
        want = [metric_per_example(model, batches, s, means, metric) for s in sets]
        monkeypatch.setattr(embedding, "forward", counting)
        embeds[0] = 0
        scorer = SetMetric(model, batches, units, means, metric)
        n_clean = embeds[0]
        got = [scorer(s) for s in sets]
        monkeypatch.setattr(embedding, "forward", original)
        assert scorer.resumed is not None and embeds[0] == n_clean  # no set re-embedded
        for g, w in zip(got, want):
            if metric == "accuracy":
                assert torch.equal(g, w)
            else:
                torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)
        if metric == "loss":
            assert max(float((g - want[0]).abs().max()) for g in got) > 1e-3  # sets differ
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
