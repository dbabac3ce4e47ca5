"""Layouts that used to give a silent wrong number, each now right or a clear error.

Every case is a plain torch model with a reference written here with forward hooks:
an activation changed in place after its hook (Falcon adds the attention output into the
MLP output), a module shared between layers (ALBERT), a module that flattens batch and
position (OPT's fc1/fc2), a CNN (dim 1 is channels), a sequence-first encoder, a module
that never runs as a module (``nn.MultiheadAttention``'s ``out_proj``), a subclass of
our transformer with its own forward, and token ids outside the vocabulary.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

import meanablate as ma
from meanablate.families import family_of
from meanablate.organisms.transformer import HookedTransformer, TransformerConfig


class InPlace(nn.Module):
    """``out = mlp(x); out += x``: the recorded MLP output must not see the add."""

    def __init__(self) -> None:
        super().__init__()
        self.mlp = nn.Linear(4, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        out = self.mlp(x)
        out += x
        return self.head(out)


def test_means_and_resample_see_the_activation_as_its_hook_did() -> None:
    torch.manual_seed(0)
    model = InPlace().eval()
    xs = [torch.randn(5, 3, 4), torch.randn(5, 3, 4)]
    means = ma.compute_means(model, ["mlp"], xs)
    with torch.no_grad():
        want = torch.cat([model.mlp(x) for x in xs]).double().mean((0, 1))
    torch.testing.assert_close(means["mlp"], want)
    # resample: the source's MLP output, not MLP output + source input
    with torch.no_grad():
        got = ma.run_ablated(model, xs[0], "mlp", method="resample", source=xs[1])
        ref = model.head(model.mlp(xs[1]) + xs[0])
    torch.testing.assert_close(got, ref)


class Shared(nn.Module):
    """One layer applied twice (ALBERT's parameter sharing)."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 4))
        self.head = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        for _ in range(2):
            x = x + self.layer(x)
        return self.head(x)


def test_a_shared_module_means_every_call_and_refuses_one_activation_per_forward() -> None:
    torch.manual_seed(0)
    model = Shared().eval()
    xs = [torch.randn(5, 3, 4), torch.randn(5, 3, 4)]
    seen: list[Tensor] = []
    h = model.layer[1].register_forward_hook(lambda _m, _a, out: seen.append(out.detach()))
    with torch.no_grad():
        for x in xs:
            model(x)
    h.remove()
    assert len(seen) == 4
    means = ma.compute_means(model, ["layer.1"], xs)
    want = torch.cat(seen).double().mean((0, 1))
    torch.testing.assert_close(means["layer.1"], want)
    unit = "layer.1[neurons=2]"
    # mean / zero replace every call, as a plain hook does
    fill = want.float()

    def ref(x: Tensor, f: Tensor) -> Tensor:
        h = model.layer[1].register_forward_hook(
            lambda _m, _a, out: torch.where(torch.arange(8) == 2, f, out)
        )
        try:
            return model(x)
        finally:
            h.remove()

    with torch.no_grad():
        got = ma.run_ablated(model, xs[0], unit, means)
        torch.testing.assert_close(got, ref(xs[0], fill))
    with pytest.raises(ValueError, match="ran more than once in one forward"):
        ma.run_ablated(model, xs[0], unit, method="resample", source=xs[1])
    with pytest.raises(ValueError, match="ran more than once in one forward"):
        ma.attribute(model, xs, [unit], means, metric="l2")


class Flat(nn.Module):
    """An MLP that flattens batch and position, as OPT's decoder layers do."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 4)
        self.fc = nn.Linear(4, 6)
        self.out = nn.Linear(6, 10)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        x = self.emb(input_ids)
        b, p, d = x.shape
        return self.out(self.fc(x.reshape(b * p, d))).reshape(b, p, -1)


def test_flattened_activations_refuse_padding_in_their_means() -> None:
    torch.manual_seed(0)
    model = Flat().eval()
    ids = torch.randint(0, 10, (3, 5))
    padded = {"input_ids": ids, "attention_mask": torch.tensor([[1] * 5, [1] * 4 + [0], [1] * 5])}
    with pytest.raises(ValueError, match=r"fc: the activation has shape \(15, 6\).*padding"):
        ma.compute_means(model, ["fc"], [padded])
    full = {"input_ids": ids, "attention_mask": torch.ones(3, 5, dtype=torch.long)}
    means = ma.compute_means(model, ["fc"], [full])
    with torch.no_grad():
        want = model.fc(model.emb(ids).reshape(15, 4)).double().mean(0)
    torch.testing.assert_close(means["fc"], want)


def test_a_cnn_refuses_means_over_its_channels_and_zero_ablates_exactly() -> None:
    torch.manual_seed(0)
    cnn = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 25, 4)
    ).eval()
    xs = [torch.randn(6, 3, 5, 5)]
    with pytest.raises(ValueError, match=r"site 1: .*\(6, 8, 5, 5\).*no position axis"):
        ma.compute_means(cnn, ["1"], xs)
    got = ma.sweep(cnn, xs, ["1[neurons=2]"], None, method="zero", metric="l2")
    with torch.no_grad():
        clean = cnn(xs[0])
        h = cnn[1].register_forward_hook(lambda _m, _a, out: out * (torch.arange(5) != 2))
        try:
            ablated = cnn(xs[0])
        finally:
            h.remove()
    want = (ablated - clean).double().norm(dim=-1)
    assert float(want.min()) > 0  # neurons= is the last dim (width 2 here), as documented
    torch.testing.assert_close(got.per_example[0], want)


class Encoder(nn.Module):
    def __init__(self, batch_first: bool) -> None:
        super().__init__()
        self.batch_first = batch_first
        self.emb = nn.Embedding(20, 16)
        layer = nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=batch_first)
        self.enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.out = nn.Linear(16, 20)

    def forward(self, input_ids: Tensor) -> Tensor:
        h = self.emb(input_ids)
        h = self.enc(h if self.batch_first else h.transpose(0, 1))
        return self.out(h if self.batch_first else h.transpose(0, 1))


def test_sequence_first_layouts_refuse_positions() -> None:
    torch.manual_seed(0)
    model = Encoder(batch_first=False).eval()
    ids = [torch.randint(0, 20, (4, 6))]
    with pytest.raises(ValueError, match=r"enc.layers.0.linear1: .*\(6, 4, 32\).*\(4, 6\)"):
        ma.compute_means(model, ["enc.layers.0.linear1"], ids, per_position=True)
    # over every token, the layout does not matter
    means = ma.compute_means(model, ["enc.layers.0.linear1"], ids)
    assert means["enc.layers.0.linear1"].shape == (32,)
    with pytest.raises(ValueError, match=r"pos= and heads= read .*\(6, 4, 16\).*\(4, 6\)"):
        ma.run_ablated(model, ids[0], "enc.layers.1@input[pos=2]", method="zero")


def test_a_module_that_never_runs_is_an_error_not_a_zero_effect() -> None:
    torch.manual_seed(0)
    model = Encoder(batch_first=True).eval()
    ids = [torch.randint(0, 20, (4, 6))]
    unit = "enc.layers.0.self_attn.out_proj@input[heads=1;n_heads=4]"
    with pytest.raises(ValueError, match="never ran"):
        ma.sweep(model, ids, [unit], None, method="zero", metric="kl")
    with pytest.raises(ValueError, match="never ran"):
        ma.run_ablated(model, ids[0], unit, method="zero")
    with pytest.raises(ValueError, match="did not run"):
        ma.compute_means(model, [unit], ids)
    assert not model.enc.layers[0].self_attn.out_proj._forward_pre_hooks


class Doubled(HookedTransformer):
    """A subclass with its own forward: the sweep may not resume through our tail."""

    def forward(self, tokens: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        return 2.0 * super().forward(tokens, attention_mask)


def test_a_subclass_with_its_own_forward_is_not_resumed() -> None:
    cfg = TransformerConfig(
        n_layers=2, d_model=16, n_heads=2, d_head=8, d_mlp=24, d_vocab=11, n_ctx=6
    )
    torch.manual_seed(0)
    model = Doubled(cfg).eval()
    assert not family_of(model).can_resume()
    tokens = [torch.randint(0, 11, (3, 6))]
    units = ["blocks.1.attn.hook_z[heads=1]", "blocks.1.hook_mlp_out"]
    means = ma.compute_means(model, [ma.parse_site(u).key for u in units], tokens)
    fast = ma.sweep(model, tokens, units, means, metric="kl")
    for i, unit in enumerate(units):
        with torch.no_grad():
            clean = model(tokens[0])
            ablated = ma.run_ablated(model, tokens[0], unit, means)
        lq, lp = clean.double().log_softmax(-1), ablated.double().log_softmax(-1)
        want = (lq.exp() * (lq - lp)).sum(-1).mean(-1)
        torch.testing.assert_close(fast.per_example[i], want, rtol=1e-6, atol=1e-9)


def test_token_ids_are_checked_against_the_vocabulary() -> None:
    cfg = TransformerConfig(
        n_layers=1, d_model=8, n_heads=2, d_head=4, d_mlp=8, d_vocab=11, n_ctx=6
    )
    model = HookedTransformer(cfg).eval()
    with pytest.raises(ValueError, match=r"token ids in \[0, 11\].*0\.\.10"):
        ma.compute_means(model, ["blocks.0.hook_mlp_out"], [torch.tensor([[0, 11, 3]])])
    with pytest.raises(ValueError, match=r"token ids in \[-1, 3\]"):
        ma.run_ablated(model, torch.tensor([[-1, 3]]), "blocks.0.hook_mlp_out", method="zero")
    with pytest.raises(TypeError, match=r"integer token ids, got dtype torch\.float32"):
        ma.run_ablated(model, {"tokens": torch.zeros(1, 3)}, "blocks.0.hook_mlp_out", method="zero")
    batch = {"tokens": torch.tensor([[1, 2, 3]]), "attention_mask": torch.tensor([[1.0, 0.5, 1]])}
    with pytest.raises(ValueError, match=r"attention_mask must hold only 0.*\[0\.5, 1\.0\]"):
        ma.run_ablated(model, batch, "blocks.0.hook_mlp_out", method="zero")
    batch["attention_mask"] = torch.ones(1, 2)
    with pytest.raises(ValueError, match=r"shape \(1, 2\), but the token ids are \(1, 3\)"):
        ma.run_ablated(model, batch, "blocks.0.hook_mlp_out", method="zero")
    with pytest.raises(ValueError, match=r"shape \(0, 3\): a batch needs at least one example"):
        ma.compute_means(model, ["blocks.0.hook_mlp_out"], [torch.zeros(0, 3, dtype=torch.long)])


def test_a_nan_mean_is_an_error_naming_the_site() -> None:
    cfg = TransformerConfig(
        n_layers=1, d_model=8, n_heads=2, d_head=4, d_mlp=8, d_vocab=11, n_ctx=6
    )
    model = HookedTransformer(cfg).eval()
    tokens = [torch.randint(0, 11, (2, 4))]
    means = ma.compute_means(model, ["blocks.0.hook_mlp_out"], tokens)
    means.tensors["blocks.0.hook_mlp_out"][3] = float("nan")
    with pytest.raises(ValueError, match=r"blocks.0.hook_mlp_out: its mean holds 1 NaN"):
        ma.sweep(model, tokens, ["blocks.0.hook_mlp_out"], means, metric="kl")


def test_a_compiled_model_is_ablated_through_its_eager_module() -> None:
    """A graph compiled before our hooks existed never calls them (an effect of 0)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)).eval()
    x = torch.randn(5, 4)
    compiled = torch.compile(model, backend="eager")
    compiled(x)
    with torch.no_grad():
        got = ma.run_ablated(compiled, x, "1", method="zero")
        want = model[2](torch.zeros(5, 8))
    torch.testing.assert_close(got, want)
    units = [f"1[neurons={i}]" for i in range(8)]
    raw = ma.sweep(model, [x], units, None, method="zero", metric="l2")
    assert float(raw.values.max()) > 0
    assert torch.equal(
        ma.sweep(compiled, [x], units, None, method="zero", metric="l2").values, raw.values
    )


class HeadFirst(nn.Module):
    """Exposes per-head values as ``[batch, head, pos, d_head]`` (not TransformerLens's
    ``[batch, pos, head, d_head]``): ``heads=`` would index the positions there."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 8)
        self.split = nn.Identity()
        self.out = nn.Linear(8, 10)

    def forward(self, input_ids: Tensor) -> Tensor:
        b, p = input_ids.shape
        x = self.split(self.emb(input_ids).view(b, p, 2, 4).transpose(1, 2))
        return self.out(x.transpose(1, 2).reshape(b, p, 8))


def test_heads_on_a_head_first_activation_are_refused() -> None:
    model = HeadFirst().eval()
    ids = torch.randint(0, 10, (3, 5))
    with pytest.raises(ValueError, match=r"split: pos= and heads= read .*\(3, 2, 5, 4\)"):
        ma.run_ablated(model, ids, "split[heads=1]", method="zero")


class KwargsOnly(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Linear(4, 4)

    def forward(self, x: Tensor) -> Tensor:
        return self.inner(input=x)


def test_an_input_site_called_with_keywords_only_names_the_site() -> None:
    model = KwargsOnly().eval()
    with pytest.raises(TypeError, match=r"site inner@input: .*keyword arguments only"):
        ma.run_ablated(model, torch.randn(2, 3, 4), "inner@input[neurons=1]", method="zero")
    assert not model.inner._forward_pre_hooks
