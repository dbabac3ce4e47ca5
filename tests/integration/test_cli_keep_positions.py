"""``--keep-positions`` with ``--mean-kind plain_except``: the means the run used, checked
against means averaged by hand from plain forward hooks, and recorded in results.json."""

from __future__ import annotations

import torch
from typer.testing import CliRunner

import meanablate
from meanablate.cli import app
from meanablate.report import load_results
from meanablate.stats import Means


def run(*args):
    return CliRunner().invoke(app, [str(a) for a in args], prog_name="meanablate")


def test_keep_positions_are_used_and_recorded(tmp_path):
    out = tmp_path / "run"
    args = ("demo", "--organism", "tracr-reverse", "--mean-kind", "plain_except")
    result = run(*args, "--keep-positions", "0,1", "--n-examples", "64", "-q", "--out", out)
    assert result.exit_code == 0, (result.stdout, result.stderr, result.exception)
    results = load_results(out)
    assert results["circuit"]["mean_kind"] == "plain_except"
    assert results["circuit"]["keep_positions"] == [0, 1]
    assert results["config"]["keep-positions"] == "0,1"
    assert "keep_positions" in (out / "config.toml").read_text()

    # the means file holds per-position means at 0 and 1, one pooled mean elsewhere
    org = meanablate.organisms.load("tracr-reverse")
    (batch,) = org.make_batches(64, 128, 0)  # the demo's data: n 64, batch 128, seed 0
    means = Means.load(out / "means.safetensors", org.model)
    assert means.metadata["keep_positions"] == [0, 1]
    for key in ("blocks.1.hook_mlp_out", "blocks.3.attn.hook_z"):
        seen = []
        handle = org.model.get_submodule(key).register_forward_hook(
            lambda _m, _a, o, seen=seen: seen.append(o.detach().double())
        )
        try:
            with torch.no_grad():
                org.model(batch["tokens"])
        finally:
            handle.remove()
        act = seen[0]  # [n, pos, ...]
        want = act.mean(0).clone()
        want[2:] = act[:, 2:].flatten(0, 1).mean(0)
        got = means[key].double().expand_as(want)
        torch.testing.assert_close(got, want, atol=1e-9, rtol=1e-9)
        assert not torch.allclose(want[1], want[2])  # position 1 kept its own mean


def test_keep_positions_in_a_config_file_as_a_list(tmp_path):
    cfg = tmp_path / "run.toml"
    cfg.write_text('mean_kind = "plain_except"\nkeep_positions = [0, 2]\n')
    out = tmp_path / "run"
    args = ("demo", "--organism", "tracr-frac_prevs", "--config", cfg, "--algorithm", "sweep")
    result = run(*args, "--n-examples", "32", "-q", "--out", out)
    assert result.exit_code == 0, (result.stdout, result.stderr, result.exception)
    assert load_results(out)["circuit"]["keep_positions"] == [0, 2]


def test_keep_positions_errors_are_one_line_and_write_nothing(tmp_path):
    cases = [
        (["--keep-positions", "0,1"], ["--keep-positions 0,1", "plain_except", "per_position"]),
        (
            ["--mean-kind", "plain", "--keep-positions", "1"],
            ["--keep-positions 1 is for --mean-kind plain_except", "not plain means"],
        ),
        (["--mean-kind", "plain_except", "--keep-positions", "a,1"], ["got 'a,1'"]),
        (["--mean-kind", "plain_except", "--keep-positions", "1,1"], ["distinct"]),
        (["--mean-kind", "plain_except", "--keep-positions", "-1"], [">= 0"]),
    ]
    for extra, expected in cases:
        result = run("demo", "--organism", "tracr-frac_prevs", *extra, "--out", tmp_path / "o")
        assert result.exit_code == 2, (extra, result.stderr, result.exception)
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
        for text in expected:
            assert text in lines[0], (extra, lines[0])
        assert not (tmp_path / "o" / "results.json").exists()


def test_ground_truth_follows_the_mean_kind(tmp_path):
    """tracr-reverse's minimal circuit differs by mean kind (its card, computed): the run
    labels units with the circuit of the means it used."""
    card = meanablate.organisms.load("tracr-reverse").card["ground_truth_by_mean_kind"]
    for extra in (["--mean-kind", "plain"], ["--no-per-position"], []):
        kind = "per_position" if not extra else "plain"
        out = tmp_path / (kind + str(len(extra)))
        args = ("demo", "--organism", "tracr-reverse", *extra, "--algorithm", "sweep")
        result = run(*args, "--n-examples", "64", "--n-boot", "0", "-q", "--out", out)
        assert result.exit_code == 0, (extra, result.stderr, result.exception)
        results = load_results(out)
        truth = {u["name"] for u in results["units"] if u["in_ground_truth"]}
        assert truth == set(card[kind]["circuits"][0]), extra
    assert set(card["plain"]["circuits"][0]) != set(card["per_position"]["circuits"][0])
