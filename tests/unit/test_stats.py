"""Streaming means against naive references: token weighting with padding, per position,
float64 exactness, safetensors round trip, mismatch errors, O(sites) memory."""

from __future__ import annotations

import json
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from meanablate import MeanAccumulator, Means, ablate, compute_means
from meanablate.organisms import HookedTransformer, TransformerConfig

CFG = TransformerConfig(
    n_layers=2, d_model=8, n_heads=2, d_head=4, d_vocab=9, n_ctx=10, d_mlp=12, normalization="LN"
)
SITES = ["blocks.0.attn.hook_z", "blocks.1.mlp.hook_post", "blocks.1.hook_resid_pre@input"]


def make_model(cfg: TransformerConfig = CFG, seed: int = 0) -> HookedTransformer:
    torch.manual_seed(seed)
    model = HookedTransformer(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    return model


MODEL = make_model()


def padded_batch(lengths: list[int], width: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 9, (len(lengths), width), generator=g)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    return {"tokens": tokens, "attention_mask": mask}


def naive_capture(model: nn.Module, key: str, batch) -> torch.Tensor:
    """The activation at ``key`` for one batch, read by a hand-written torch hook."""
    store = {}
    mod = model.get_submodule(key.removesuffix("@input"))
    if key.endswith("@input"):
        h = mod.register_forward_pre_hook(lambda m, a: store.__setitem__("x", a[0].detach()))
    else:
        h = mod.register_forward_hook(lambda m, a, o: store.__setitem__("x", o.detach()))
    with torch.no_grad():
        if isinstance(batch, dict):
            model(batch["tokens"], attention_mask=batch.get("attention_mask"))
        else:
            model(batch)
    h.remove()
    return store["x"]


def naive_mean(model: nn.Module, key: str, batches) -> torch.Tensor:
    """Concatenate every real token's activation, then average in float64."""
    rows = []
    for batch in batches:
        act = naive_capture(model, key, batch).double()
        mask = batch["attention_mask"].bool() if isinstance(batch, dict) else None
        rows.append(act[mask] if mask is not None else act.reshape(-1, *act.shape[2:]))
    return torch.cat(rows).mean(0)


def naive_per_position(model: nn.Module, key: str, batches) -> tuple[torch.Tensor, torch.Tensor]:
    """Explicit loops: for each position, the mean over examples whose token is real there."""
    acts = [(naive_capture(model, key, b).double(), b["attention_mask"]) for b in batches]
    n_pos = max(a.shape[1] for a, _ in acts)
    trailing = acts[0][0].shape[2:]
    sums = torch.zeros(n_pos, *trailing, dtype=torch.float64)
    counts = torch.zeros(n_pos, dtype=torch.float64)
    for act, mask in acts:
        for b in range(act.shape[0]):
            for p in range(act.shape[1]):
                if mask[b, p]:
                    sums[p] += act[b, p]
                    counts[p] += 1
    means = sums / counts.clamp_min(1).reshape(-1, *[1] * len(trailing))
    return means, counts


# batches of different sizes and widths, with padding (every example has >= 1 real token)
RAGGED = [
    padded_batch([3], 4, 0),
    padded_batch([5, 2, 7], 7, 1),
    padded_batch([1, 10], 10, 2),
    padded_batch([4, 4, 1, 2, 6], 6, 3),
]


def test_ragged_padded_batches_give_exact_token_weighted_mean() -> None:
    means = compute_means(MODEL, SITES, RAGGED)
    n_real = sum(int(b["attention_mask"].sum()) for b in RAGGED)
    for key in SITES:
        want = naive_mean(MODEL, key, RAGGED)
        torch.testing.assert_close(means[key], want, rtol=1e-12, atol=1e-13)
        assert means[key].dtype == torch.float64
        assert float(means.counts[key]) == n_real
    # the test can tell: the mean of per-batch means differs
    per_batch = torch.stack([naive_mean(MODEL, key, [b]) for b in RAGGED]).mean(0)
    assert not torch.allclose(per_batch, want, rtol=1e-6, atol=1e-9)


@given(
    shapes=st.lists(
        st.integers(1, 8).flatmap(
            lambda w: st.lists(st.integers(1, w), min_size=1, max_size=4).map(lambda ls: (ls, w))
        ),
        min_size=1,
        max_size=4,
    ),
    per_position=st.booleans(),
    seed=st.integers(0, 1000),
)
@settings(max_examples=15, deadline=None)
def test_random_ragged_datasets_match_naive(shapes, per_position: bool, seed: int) -> None:
    batches = [padded_batch(ls, w, seed + i) for i, (ls, w) in enumerate(shapes)]
    key = "blocks.1.mlp.hook_post"
    means = compute_means(MODEL, [key], batches, per_position=per_position)
    if per_position:
        want, counts = naive_per_position(MODEL, key, batches)
        torch.testing.assert_close(means.counts[key], counts, rtol=0, atol=0)
    else:
        want = naive_mean(MODEL, key, batches)
    torch.testing.assert_close(means[key], want, rtol=1e-12, atol=1e-13)


def test_per_position_means_match_naive_loop() -> None:
    for key in SITES:
        means = compute_means(MODEL, [key], RAGGED, per_position=True)
        want, counts = naive_per_position(MODEL, key, RAGGED)
        assert means.per_position
        assert means[key].shape == want.shape  # [longest pos, ...]
        torch.testing.assert_close(means[key], want, rtol=1e-12, atol=1e-13)
        torch.testing.assert_close(means.counts[key], counts, rtol=0, atol=0)


def test_tensor_batches_count_every_token() -> None:
    batches = [torch.randint(0, 9, (n, w)) for n, w in ((2, 5), (3, 3), (1, 8))]
    means = compute_means(MODEL, SITES, batches)
    for key in SITES:
        torch.testing.assert_close(means[key], naive_mean(MODEL, key, batches), rtol=1e-12, atol=0)
        assert float(means.counts[key]) == 2 * 5 + 3 * 3 + 8


class Big(nn.Module):
    """Emits float32 activations of magnitude ~1e4: ``[batch, pos, 4]``."""

    def __init__(self) -> None:
        super().__init__()
        self.out = nn.Identity()
        self.register_buffer("offset", torch.tensor([1.0e4, 1.2e4, 9.0e3, 1.5e4]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.offset + 500.0 * x)


@pytest.mark.slow
def test_ten_million_float32_values_stay_exact() -> None:
    model = Big()
    n_batches, shape = 40, (250, 250, 4)  # 40 * 250 * 250 * 4 = 1e7 values

    def batches():
        for i in range(n_batches):
            g = torch.Generator().manual_seed(i)
            yield torch.randn(shape, generator=g)

    means = compute_means(model, ["out"], batches())
    # reference: math.fsum of the exact per-batch sums (float32 values near 1e4 are
    # multiples of 2**-10, so sums of them below 2**43 are exact in float64)
    totals = [[] for _ in range(4)]
    running32 = torch.zeros(4, dtype=torch.float32)
    for x in batches():
        act = model(x).reshape(-1, 4)
        for j in range(4):
            totals[j].append(math.fsum(act[:, j].double().tolist()))
        running32 += act.sum(0)  # what a float32 accumulator would hold
    n = n_batches * shape[0] * shape[1]
    want = [math.fsum(t) / n for t in totals]
    got = means["out"].tolist()
    for g, w in zip(got, want):
        assert abs(g - w) <= 1e-9 * abs(w)
    assert float(means.counts["out"]) == n
    # and a float32 running sum would not be (so the test can tell)
    err32 = max(abs(float(s) / n - w) / abs(w) for s, w in zip(running32, want))
    assert err32 > 1e-9


def test_accumulator_merge_equals_one_pass() -> None:
    key = "blocks.0.attn.hook_z"
    full = compute_means(MODEL, [key], RAGGED, per_position=True)
    a, b = MeanAccumulator(per_position=True), MeanAccumulator(per_position=True)
    compute_means(MODEL, [key], RAGGED[:2], per_position=True, accumulator=a)
    compute_means(MODEL, [key], RAGGED[2:], per_position=True, accumulator=b)
    merged = a.merge(b).result()
    torch.testing.assert_close(merged[key], full[key], rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(merged.counts[key], full.counts[key], rtol=0, atol=0)
    with pytest.raises(ValueError, match="per-position"):
        MeanAccumulator(per_position=False).merge(a)


# -- save / load ---------------------------------------------------------------------------
@pytest.mark.parametrize("per_position", [False, True])
def test_save_load_round_trip_with_metadata(tmp_path, per_position: bool) -> None:
    means = compute_means(MODEL, SITES, RAGGED, per_position=per_position)
    path = tmp_path / "means.safetensors"
    means.save(path)
    loaded = Means.load(path, MODEL)
    assert loaded.per_position == per_position
    assert loaded.keys() == means.keys() == sorted(SITES)
    for key in SITES:
        assert loaded[key].dtype == torch.float64
        assert torch.equal(loaded[key], means[key])
        assert torch.equal(loaded.counts[key], means.counts[key])
    assert loaded.metadata == means.metadata
    assert loaded.metadata["model_class"] == "HookedTransformer"
    assert loaded.metadata["batches"] == len(RAGGED)
    # the file itself, read without our loader
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        names = set(f.keys())
    assert meta["format"] == "meanablate.Means"
    assert json.loads(meta["sites"]) == sorted(SITES)
    assert json.loads(meta["per_position"]) is per_position
    assert json.loads(meta["shapes"]) == {k: list(means[k].shape) for k in SITES}
    n_real = sum(int(b["attention_mask"].sum()) for b in RAGGED)
    for key, tokens in json.loads(meta["tokens"]).items():
        # total real tokens; per position: the most tokens any one position saw
        assert tokens == (float(means.counts[key].max()) if per_position else n_real)
    assert names == {f"mean::{k}" for k in SITES} | {f"count::{k}" for k in SITES}
    # loaded means ablate exactly like the originals
    tokens = RAGGED[1]["tokens"]
    with torch.no_grad():
        with ablate(MODEL, "blocks.1.mlp.hook_post[neurons=3]", means):
            a = MODEL(tokens)
        with ablate(MODEL, "blocks.1.mlp.hook_post[neurons=3]", loaded):
            b = MODEL(tokens)
    assert torch.equal(a, b)


def test_load_rejects_other_model_class_and_missing_sites(tmp_path) -> None:
    path = tmp_path / "means.safetensors"
    compute_means(MODEL, SITES, RAGGED).save(path)

    class OtherModel(HookedTransformer):
        pass

    torch.manual_seed(0)
    with pytest.raises(ValueError, match=r"HookedTransformer.*OtherModel"):
        Means.load(path, OtherModel(CFG))
    one_layer = make_model(TransformerConfig(**{**CFG.__dict__, "n_layers": 1}))
    with pytest.raises(ValueError, match=r"no module named 'blocks\.1\."):
        Means.load(path, one_layer)
    not_means = tmp_path / "weights.safetensors"
    save_file({"w": torch.zeros(2)}, str(not_means))
    with pytest.raises(ValueError, match="not a meanablate means file"):
        Means.load(not_means)


def test_wrong_shape_means_are_a_clear_error_in_ablate(tmp_path) -> None:
    path = tmp_path / "means.safetensors"
    compute_means(MODEL, SITES, RAGGED).save(path)
    wider = make_model(TransformerConfig(**{**CFG.__dict__, "d_mlp": 20}))
    means = Means.load(path)
    tokens = torch.randint(0, 9, (2, 5))
    with (
        pytest.raises(ValueError) as err,
        ablate(wider, "blocks.1.mlp.hook_post[neurons=0]", means),
    ):
        wider(tokens)
    msg = str(err.value)
    assert "blocks.1.mlp.hook_post" in msg and "(12,)" in msg and "(2, 5, 20)" in msg
    # per-position means shorter than the input
    short = compute_means(
        MODEL, ["blocks.1.mlp.hook_post"], [torch.zeros(1, 3).long()], per_position=True
    )
    with (
        pytest.raises(ValueError, match="cover 3 positions, the input has 5"),
        ablate(MODEL, "blocks.1.mlp.hook_post[neurons=0]", short),
    ):
        MODEL(tokens)
    with pytest.raises(KeyError, match=r"no mean for site 'blocks\.0\.mlp\.hook_post'"):
        ablate(MODEL, "blocks.0.mlp.hook_post", means).__enter__()


# -- memory and errors -----------------------------------------------------------------------
def test_accumulator_holds_only_sums_and_counts() -> None:
    acc = MeanAccumulator()
    sizes = []

    def stream():
        for i in range(30):
            yield padded_batch([1 + i % 5, 3], 6 + i % 4, i)
            sizes.append(sum(t.numel() for d in (acc.sums, acc.counts) for t in d.values()))

    means = compute_means(MODEL, SITES, stream(), accumulator=acc)
    assert set(acc.sums) == set(acc.counts) == set(SITES)
    expected = {
        "blocks.0.attn.hook_z": (2, 4),
        "blocks.1.mlp.hook_post": (12,),
        "blocks.1.hook_resid_pre@input": (8,),
    }
    for key, shape in expected.items():
        assert tuple(acc.sums[key].shape) == shape and acc.counts[key].shape == ()
        assert acc.sums[key].dtype == torch.float64
        assert means[key].shape == shape
    # constant size while streaming: nothing grows with the data
    assert len(set(sizes)) == 1 and sizes[0] == 8 + 12 + 8 + 3
    tensors = [v for v in vars(acc).values() if isinstance(v, torch.Tensor)]
    assert tensors == [] and set(vars(acc)) == {"per_position", "sums", "counts"}


def test_compute_means_errors_and_cleanup() -> None:
    with pytest.raises(ValueError, match="no batches"):
        compute_means(MODEL, SITES, [])
    with pytest.raises(ValueError, match="at least one site"):
        compute_means(MODEL, [], RAGGED)
    all_pad = {"tokens": torch.zeros(2, 3).long(), "attention_mask": torch.zeros(2, 3).long()}
    with pytest.raises(ValueError, match="no tokens were counted"):
        compute_means(MODEL, SITES, [all_pad])
    unused = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    unused.forward = lambda x: unused[0](x)  # type: ignore[method-assign]
    with pytest.raises(ValueError, match="did not run"):
        compute_means(unused, ["1"], [torch.zeros(1, 2)])
    bad_mask = {"tokens": torch.zeros(2, 3).long(), "attention_mask": torch.ones(2, 4).long()}
    with pytest.raises((ValueError, RuntimeError)):
        compute_means(MODEL, ["blocks.0.mlp.hook_post"], [bad_mask])
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in MODEL.modules())


def test_selectors_are_ignored_for_means() -> None:
    a = compute_means(MODEL, ["blocks.0.attn.hook_z[heads=1;pos=0]"], RAGGED)
    b = compute_means(MODEL, ["blocks.0.attn.hook_z"], RAGGED)
    assert a.keys() == b.keys() and torch.equal(
        a["blocks.0.attn.hook_z"], b["blocks.0.attn.hook_z"]
    )


def test_load_with_a_batch_checks_shapes_against_the_model(tmp_path) -> None:
    from torch import nn

    import meanablate as ma

    small = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    wide = nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 2))
    path = tmp_path / "m.safetensors"
    ma.compute_means(small, ["1"], [torch.ones(2, 3)]).save(path)
    ma.Means.load(path, small, torch.ones(1, 3))  # the right model passes
    with pytest.raises(ValueError, match=r"site 1: stored mean has shape \(4,\).*\(1, 5\)"):
        ma.Means.load(path, wide, torch.ones(1, 3))


# -- attention patterns keep their head axis -------------------------------------------------
PATTERN = "blocks.0.attn.hook_pattern"


def naive_pattern_mean(batches) -> tuple[torch.Tensor, torch.Tensor]:
    """Loops: entry [h, q, k] averages the examples whose q and k are both real tokens."""
    acts = [(naive_capture(MODEL, PATTERN, b).double(), b["attention_mask"]) for b in batches]
    _, heads, n, _ = acts[0][0].shape
    sums = torch.zeros(heads, n, n, dtype=torch.float64)
    counts = torch.zeros(n, n, dtype=torch.float64)
    for act, mask in acts:
        for b in range(act.shape[0]):
            for q in range(n):
                for k in range(n):
                    if mask[b, q] and mask[b, k]:
                        sums[:, q, k] += act[b, :, q, k]
                        counts[q, k] += 1
    return sums / counts.clamp_min(1), counts


@pytest.mark.parametrize("per_position", [False, True])
def test_pattern_means_keep_heads_and_select_real_query_key_pairs(per_position) -> None:
    batches = [padded_batch([6, 2, 4], 6, 7), padded_batch([3, 6], 6, 8)]
    means = compute_means(MODEL, [PATTERN], batches, per_position=per_position)
    want, counts = naive_pattern_mean(batches)
    assert means[PATTERN].shape == (CFG.n_heads, 6, 6)  # not [q, k] averaged over heads
    torch.testing.assert_close(means[PATTERN], want, rtol=1e-12, atol=1e-15)
    assert torch.equal(means.counts[PATTERN], counts)
    means.check_model(MODEL, batches[0])  # the stored shape is the one a site needs
    # the heads differ, so averaging them would have lost something
    assert (means[PATTERN][0] - means[PATTERN][1]).abs().max() > 1e-3
    # ablating with it puts each head's own mean in place (our hook runs after ablate's)
    n = 5 if per_position else 6  # per-position means longer than the input are cut
    captured = {}
    with ablate(MODEL, PATTERN, means):
        h = MODEL.blocks[0].attn.hook_pattern.register_forward_hook(
            lambda _m, _a, out: captured.__setitem__("p", out)
        )
        try:
            MODEL(batches[0]["tokens"][:, :n])
        finally:
            h.remove()
    for row in captured["p"]:
        assert torch.equal(row, want[:, :n, :n].float())
    if not per_position:
        with (
            pytest.raises(ValueError, match=r"pattern mean has shape \(2, 6, 6\), wanted"),
            ablate(MODEL, PATTERN, means),
        ):
            MODEL(batches[0]["tokens"][:, :5])


def test_pattern_means_ignore_nan_in_padding(monkeypatch) -> None:
    batch = padded_batch([4, 2], 4, 9)
    clean = compute_means(MODEL, [PATTERN], [batch])
    real_hook = MODEL.blocks[0].attn.hook_pattern

    def poison(_m, _a, out):
        out = out.clone()
        pad = ~batch["attention_mask"].bool()
        out[pad[:, None, :, None].expand_as(out)] = float("nan")
        out[pad[:, None, None, :].expand_as(out)] = float("inf")
        return out

    h = real_hook.register_forward_hook(poison)
    try:
        poisoned = compute_means(MODEL, [PATTERN], [batch])
    finally:
        h.remove()
    assert torch.equal(poisoned[PATTERN], clean[PATTERN])


def test_pattern_means_of_other_lengths_or_shapes_are_errors() -> None:
    acc = MeanAccumulator()
    acc.add(PATTERN, torch.rand(2, 2, 4, 4), None)
    with pytest.raises(ValueError, match=r"pattern shape changed .*\(2, 4, 4\) vs \(2, 5, 5\)"):
        acc.add(PATTERN, torch.rand(2, 2, 5, 5), None)
    with pytest.raises(ValueError, match=r"attention_mask has shape \(2, 3\), wanted \(2, 4\)"):
        acc.add(PATTERN, torch.rand(2, 2, 4, 4), torch.ones(2, 3))
    means = Means({PATTERN: torch.zeros(4, 4, dtype=torch.float64)}, {})  # head axis lost
    with (
        pytest.raises(ValueError, match=r"pattern mean has shape \(4, 4\), wanted \(2, 4, 4\)"),
        ablate(MODEL, PATTERN, means),
    ):
        MODEL(torch.zeros(1, 4, dtype=torch.long))


def test_pattern_means_round_trip(tmp_path) -> None:
    batches = [padded_batch([6, 2, 4], 6, 7)]
    means = compute_means(MODEL, [PATTERN, "blocks.0.attn.hook_z"], batches)
    means.save(tmp_path / "m.safetensors")
    back = Means.load(tmp_path / "m.safetensors", MODEL, batches[0])
    assert torch.equal(back[PATTERN], means[PATTERN])
    assert torch.equal(back.counts[PATTERN], means.counts[PATTERN])
