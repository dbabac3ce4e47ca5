"""CLI: --method resample (organisms, prompts with a 'corrupt' field) and circuit.dot."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from meanablate.cli import app
from meanablate.cli.prompts import read_prompts
from meanablate.config import InputError


class _Tok:
    """A whitespace tokenizer: one id per word (ids 1..), pad 0."""

    pad_token_id = 0
    eos_token_id = None

    def __init__(self) -> None:
        self.vocab: dict[str, int] = {}

    def __len__(self) -> int:
        return 1000

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict:
        return {"input_ids": [self.vocab.setdefault(w, len(self.vocab) + 1) for w in text.split()]}


def test_prompts_corrupt_field_is_padded_like_the_clean_prompt(tmp_path):
    p = tmp_path / "p.jsonl"
    lines = [
        {"text": "a b c", "target": "d", "corrupt": "x y z"},
        {"text": "a b", "target": "d", "corrupt": "x q"},
    ]
    p.write_text("\n".join(json.dumps(x) for x in lines))
    tok = _Tok()
    (batch,) = read_prompts(str(p), tok, 8, None)
    assert batch["corrupt"].shape == batch["input_ids"].shape
    assert torch.equal(batch["corrupt"] != 0, batch["attention_mask"].bool())
    assert batch["corrupt"][1].tolist()[:2] == [tok.vocab["x"], tok.vocab["q"]]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "a b c", "target": "d", "corrupt": "x y"}))
    with pytest.raises(InputError, match=r"line 1: corrupt prompt is 2 tokens"):
        read_prompts(str(bad), tok, 8, None)


def test_discover_with_resample_on_an_organism_writes_circuit_dot(tmp_path):
    out = tmp_path / "run"
    args = [
        "discover",
        "--organism",
        "tracr-reverse",
        "--method",
        "resample",
        "--algorithm",
        "sweep",
        "--n-examples",
        "64",
        "--n-boot",
        "0",
        "--no-attribution",
        "--out",
        str(out),
        "--quiet",
    ]
    result = CliRunner().invoke(app, args, prog_name="meanablate")
    assert result.exit_code == 0, (result.stdout, result.stderr, result.exception)
    dot = (out / "circuit.dot").read_text()
    assert dot.startswith("digraph circuit {") and '"a3.h0" -> "logits"' in dot
    results = json.loads((out / "results.json").read_text())
    assert results["config"]["method"] == "resample"
    assert results["circuit"]["units"] == ["blocks.3.attn.hook_z[heads=0]"]


def test_edges_command_writes_the_circuit_scores_and_mib_file(tmp_path):
    out = tmp_path / "edges"
    args = [
        "edges",
        "--organism",
        "tracr-reverse",
        "--metric",
        "kl",
        "--threshold",
        "1e-4",
        "--n-examples",
        "128",
        "--out",
        str(out),
        "--quiet",
    ]
    result = CliRunner().invoke(app, args, prog_name="meanablate")
    assert result.exit_code == 0, (result.stdout, result.stderr, result.exception)
    res = json.loads((out / "edges.json").read_text())
    assert res["circuit"] == ["input->a3.h0<v>", "a3.h0->logits"]
    assert res["edge_auroc"] == 1.0 and res["faithfulness"] == pytest.approx(1.0)
    assert set(res["mib"]) >= {"cpr", "cmd", "faithfulness"}
    mib = json.loads((out / "mib_circuit.json").read_text())
    assert mib["edges"]["a3.h0->logits"]["in_graph"] is True
    assert (out / "circuit.dot").read_text().count("->") == 2
    # the run folder is a full one, as discover writes: results.json with the measured edges
    import html as html_lib

    from meanablate.report import load_results

    results = load_results(out)  # validated against the schema
    assert results["command"] == "edges"
    kept = [e for e in results["edges"] if e["in_circuit"]]
    assert [e["name"] for e in kept] == res["circuit"]
    assert [(e["source"], e["target"], e["input"]) for e in kept] == [
        ("input", "blocks.3.attn.hook_z[heads=0]", "v"),
        ("blocks.3.attn.hook_z[heads=0]", "output", None),
    ]
    for e in results["edges"]:  # each weight is the edge's measured score, sign and all
        assert e["weight"] == res["scores"][e["name"]]
        assert e["in_ground_truth"] == (e["name"] in res["ground_truth"])
    others = [e for e in results["edges"] if not e["in_circuit"]]
    assert len(others) <= 24 and all(e["weight"] != 0 for e in others)
    assert results["edges_left_out"] == res["n_edges"] - len(results["edges"])
    assert results["circuit"]["units"] == ["blocks.3.attn.hook_z[heads=0]"]
    assert results["scores"]["faithfulness"] == res["faithfulness"]
    html = html_lib.unescape((out / "report.html").read_text())
    assert html.count('class="edge"') == 2 and "measured weight" in html
    assert "of the circuit's 2 measured edges" in html


def test_edges_command_needs_corrupted_inputs_for_resample(tmp_path):
    import textwrap

    mod = tmp_path / "mymodel.py"
    mod.write_text(
        textwrap.dedent("""
        import torch
        from meanablate.organisms.transformer import HookedTransformer, TransformerConfig

        def build():
            cfg = TransformerConfig(n_layers=1, d_model=8, n_heads=1, d_head=4, d_vocab=5, n_ctx=4)
            model = HookedTransformer(cfg)
            return model, [{"tokens": torch.zeros(2, 3, dtype=torch.long)}]
    """)
    )
    import sys

    sys.path.insert(0, str(tmp_path))
    try:
        args = [
            "edges",
            "--model",
            "mymodel:build",
            "--method",
            "resample",
            "--metric",
            "kl",
            "--out",
            str(tmp_path / "o"),
            "--quiet",
        ]
        result = CliRunner().invoke(app, args, prog_name="meanablate")
    finally:
        sys.path.remove(str(tmp_path))
    assert result.exit_code == 2
    assert "resample needs a corrupted input for every example" in result.stderr
