"""CLI: `meanablate edges` on a Hugging Face Llama-style model (a builder function)."""

from __future__ import annotations

import json
import sys
import textwrap

import pytest
from typer.testing import CliRunner

pytest.importorskip("transformers")

from meanablate.cli import app


def test_edges_command_on_a_llama_with_corrupted_inputs(tmp_path, monkeypatch):
    (tmp_path / "tinyllama_build.py").write_text(
        textwrap.dedent("""
        import torch, transformers
        from hf_edge_reference import scaled

        def build():
            cfg = transformers.LlamaConfig(
                hidden_size=32, intermediate_size=48, num_attention_heads=4,
                num_key_value_heads=2, num_hidden_layers=2, vocab_size=50,
                max_position_embeddings=32,
            )
            model = scaled(transformers.LlamaForCausalLM(cfg), 0)
            g = torch.Generator().manual_seed(0)
            tokens = torch.randint(0, 50, (4, 6), generator=g)
            corrupt = torch.randint(0, 50, (4, 6), generator=g)
            return model, [{"tokens": tokens, "corrupt": corrupt}]
    """)
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    out = tmp_path / "o"
    args = ["edges", "--model", "tinyllama_build:build", "--method", "resample"]
    args += ["--metric", "kl", "--threshold", "0.05", "--out", str(out), "--quiet"]
    result = CliRunner().invoke(app, args, prog_name="meanablate")
    assert result.exit_code == 0, (result.stdout, result.stderr, result.exception)
    res = json.loads((out / "edges.json").read_text())
    assert res["n_edges"] == 110  # 2 layers x 4 heads (q/k/v each) + MLPs + logits
    assert 0 < len(res["circuit"]) < 110
    mib = json.loads((out / "mib_circuit.json").read_text())
    assert mib["cfg"]["parallel_attn_mlp"] is False
    assert (out / "circuit.dot").read_text().count("->") == len(res["circuit"])
    results = json.loads((out / "results.json").read_text())
    units = results["circuit"]["units"]  # the model's own sites, in layer order
    assert units and all(u.startswith("model.layers.") for u in units)
    assert {u["kind"] for u in results["units"]} == {"head", "mlp"}
    assert "model.layers.0.self_attn.o_proj@input[heads=0]" in {u["name"] for u in results["units"]}
    sys.modules.pop("tinyllama_build", None)
