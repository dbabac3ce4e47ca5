"""Results as objects: save/load, DataFrames, reprs, HTML tables, ``meanablate.report``."""

from __future__ import annotations

import json

import pytest
import torch

import meanablate as ma
from meanablate.organisms.transformer import HookedTransformer, TransformerConfig
from meanablate.report import load_results


@pytest.fixture(scope="module")
def run():
    torch.manual_seed(0)
    model = HookedTransformer(
        TransformerConfig(
            n_layers=2, d_model=16, n_heads=4, d_head=4, d_mlp=32, d_vocab=11, n_ctx=6
        )
    ).eval()
    tokens = torch.randint(0, 11, (12, 6))
    units = ma.transformer_units(model)
    means = ma.compute_means(model, sorted({ma.parse_site(u).key for u in units}), tokens)
    sweep = ma.sweep(model, tokens, units, means, metric="kl")
    attr = ma.attribute(model, tokens, units, means, metric="kl")
    acdc = ma.discover(model, tokens, means, units=units, metric="kl", threshold=0.002)
    ranked = ma.discover(
        model, tokens, means, units=units, metric="kl", algorithm="sweep", target_faithfulness=0.8
    )
    cs = ma.score_circuit(model, [tokens], ranked.kept, units, means, "kl", n_boot=50)
    effect = ma.ablation_effect(model, tokens, units[0], means, metric="kl", n_boot=50)
    return dict(
        model=model, tokens=tokens, units=units, means=means, sweep=sweep, attr=attr,
        acdc=acdc, ranked=ranked, cs=cs, effect=effect,
    )  # fmt: skip


@pytest.mark.parametrize("which", ["acdc", "ranked"])
def test_circuit_save_load_round_trip(run, tmp_path, which):
    circuit = run[which]
    path = circuit.save(tmp_path / "results.json", sweep=run["sweep"], name="tiny")
    loaded = ma.Circuit.load(path)
    assert loaded == circuit
    assert ma.Circuit.load(tmp_path) == circuit  # a run folder works too
    results = load_results(path)  # valid against the schema
    assert results["circuit"]["units"] == [u for u in circuit.units if u in circuit.kept]
    assert [u["effect"] for u in results["units"]] == run["sweep"].values.tolist()


def test_circuit_alone_is_saved_with_its_own_scores_named(run, tmp_path):
    path = run["acdc"].save(tmp_path / "r.json")
    results = json.loads(path.read_text())
    assert results["effect_source"] == "acdc"  # not passed off as single-unit effects
    assert ma.Circuit.load(path) == run["acdc"]


def test_scores_save_load_and_dict_round_trip(run, tmp_path):
    for s in (run["sweep"], run["attr"]):
        assert ma.Scores.from_dict(json.loads(json.dumps(s.to_dict()))) == s
        path = s.save(tmp_path / f"{s.method}.json", n_boot=20)
        assert ma.Scores.load(path) == s
    bad = run["sweep"].to_dict()
    bad["units"][2]["effect"] = "x"
    with pytest.raises(ValueError, match=r"invalid at \$\.units\[2\]\.effect: expected a number"):
        ma.Scores.from_dict(bad)


def test_len_index_contains(run):
    s, c = run["sweep"], run["ranked"]
    assert len(s) == len(run["units"])
    u = run["units"][3]
    assert s[u] == float(s.values[3]) and u in s
    with pytest.raises(KeyError, match="no unit 'nope'"):
        s["nope"]
    assert len(c) == len(c.kept)
    assert all(k in c for k in c.kept)
    assert c[u] == c.scores[u]


def test_reprs_fit_one_screen(run):
    big = ma.Scores(
        [f"blocks.0.mlp.hook_post[neurons={i}]" for i in range(512)],
        torch.randn(512, dtype=torch.float64),
        torch.randn(512, 64, dtype=torch.float64),
        "kl",
        "sweep",
    )
    for obj in (run["sweep"], run["attr"], run["acdc"], run["ranked"], run["cs"],
                run["effect"], run["means"], big):  # fmt: skip
        text = repr(obj)
        assert len(text) < 1200 and text.count("\n") < 16, (type(obj).__name__, text)
        assert "tensor(" not in text
    assert "512 units x 64 examples" in repr(big)
    assert "... 504 more" in repr(big)
    top = big.ranking()[0]
    assert top in repr(big)


def test_repr_html_on_every_result_type(run):
    for obj in (run["sweep"], run["acdc"], run["cs"], run["effect"], run["means"]):
        page = obj._repr_html_()
        assert page.lstrip().startswith('<div class="meanablate-repr"')
        assert type(obj).__name__ in page
    evil = ma.Scores(["<b>x</b>"], torch.ones(1), torch.ones(1, 2), "kl", "sweep")
    assert "<b>x</b>" not in evil._repr_html_() and "&lt;b&gt;x&lt;/b&gt;" in evil._repr_html_()


def test_dataframes_on_every_result_type(run):
    pytest.importorskip("pandas")
    s = run["sweep"]
    df = s.to_dataframe()
    assert list(df.index) == s.units
    assert df["value"].tolist() == s.values.tolist()
    assert df.loc[s.ranking()[0], "rank"] == 1
    assert set(df["kind"]) == {"head", "mlp"}
    c = run["ranked"]
    cdf = c.to_dataframe()
    assert cdf["kept"].sum() == len(c.kept) and list(cdf.index) == c.units
    csdf = run["cs"].to_dataframe()
    assert sorted(csdf.index) == sorted(run["cs"].minimality)
    edf = run["effect"].to_dataframe()
    assert len(edf) == 12 and edf["effect"].mean() == pytest.approx(run["effect"].value)
    mdf = run["means"].to_dataframe()
    assert list(mdf.index) == run["means"].keys()


def test_report_from_python_objects(run, tmp_path):
    page = ma.report(
        tmp_path / "run", run["ranked"], sweep=run["sweep"], attribution=run["attr"],
        circuit_scores=run["cs"], model=run["model"], means=run["means"], n_boot=50,
    )  # fmt: skip
    names = {p.name for p in (tmp_path / "run").iterdir()}
    assert {
        "results.json",
        "report.html",
        "means.safetensors",
        "effects.svg",
        "effects.pdf",
    } <= names
    results = load_results(tmp_path / "run")
    assert results["model"]["class"].endswith("HookedTransformer")
    assert results["model"]["n_layers"] == 2
    assert results["scores"]["faithfulness_ci"] == list(run["cs"].faithfulness_ci)
    assert ma.Circuit.load(tmp_path / "run") == run["ranked"]
    text = page.read_text()
    assert "attribution (estimate)" in text and "Spearman rank correlation" in text
    # a sweep alone, an attribution beside its sweep
    ma.report(tmp_path / "s", sweep=run["sweep"], n_boot=0)
    assert "Sweep" in (tmp_path / "s" / "report.html").read_text()
    ma.report(tmp_path / "a", sweep=run["sweep"], attribution=run["attr"], n_boot=0)
    text = (tmp_path / "a" / "report.html").read_text()
    assert "exact effect" in text and "Spearman" in text
    assert ma.Scores.load(tmp_path / "a" / "attribution.json") == run["attr"]
    with pytest.raises(ValueError, match="needs a circuit, a sweep or an attribution"):
        ma.report(tmp_path / "x")


def test_threads_are_chosen_and_given_back(monkeypatch):
    from meanablate import torch_threads as th

    seen = []

    class Spy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(3, 3)

        def forward(self, x):
            seen.append(torch.get_num_threads())
            return self.lin(x)

    model = Spy()
    x = torch.randn(4, 2, 3)
    means = ma.compute_means(model, ["lin"], x)
    caller = torch.get_num_threads()
    try:
        torch.set_num_threads(2)  # as if torch had chosen 2 and nobody changed it
        monkeypatch.setattr(th, "_TORCH_DEFAULT", 2)
        monkeypatch.setattr(th, "_explicit", None)
        ma.sweep(model, x, ["lin[neurons=0]"], means, metric="l2")
        assert set(seen) == {th.choose_threads(model)} == {1}  # a small model: one thread
        assert torch.get_num_threads() == 2  # given back
        seen.clear()
        ma.set_threads(2)  # the user's choice holds from now on
        ma.sweep(model, x, ["lin[neurons=0]"], means, metric="l2")
        assert set(seen) == {2}
        with pytest.raises(ValueError, match="positive int or 'auto', got 0"):
            ma.set_threads(0)
    finally:
        torch.set_num_threads(caller)
