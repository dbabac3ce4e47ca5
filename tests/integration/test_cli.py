"""The ``meanablate`` command line end to end: demo, inputs, config files, errors, reports.

Most runs go through typer's ``CliRunner`` (in process, fast); a few use a subprocess to
check what a user sees: the console entry point, exit codes, one line on stderr.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from typer.testing import CliRunner

import meanablate
from meanablate.cli import app
from meanablate.report import load_results, validate_results
from meanablate.stats import Means

RUN_FILES = ("results.json", "means.safetensors", "config.toml", "report.html")
PLOTS = ("effects.png", "faithfulness.png", "roc.png")


def run(*args: str):
    result = CliRunner().invoke(app, [str(a) for a in args], prog_name="meanablate")
    return result


def ok(*args: str):
    result = run(*args)
    assert result.exit_code == 0, (result.stdout, result.stderr, result.exception)
    return result


def check_run_dir(out: Path, *, plots=PLOTS) -> dict:
    for name in (*RUN_FILES, *plots):
        assert (out / name).is_file(), name
    results = load_results(out)  # validates against the schema
    kept = set(results["circuit"]["units"])
    assert {u["name"] for u in results["units"] if u["in_circuit"]} == kept
    assert not list(out.glob(".*.tmp"))  # no temp files left behind
    return results


def one_error_line(result) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ") and "Traceback" not in result.stderr
    return lines[0]


# -- help and version ------------------------------------------------------------------------
def test_version_and_help():
    assert ok("--version").stdout.strip() == f"meanablate {meanablate.__version__}"
    top = ok("--help").stdout
    for command in ("demo", "organisms", "means", "sweep", "attribute", "discover", "report"):
        assert command in top
        text = ok(command, "--help").stdout
        assert "Example" in text and "Usage: meanablate " + command in text
    assert "--threshold" in ok("demo", "--help").stdout


def test_console_script_and_python_m(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "meanablate", "--version"], capture_output=True, text=True
    )
    assert out.returncode == 0 and out.stdout.strip() == f"meanablate {meanablate.__version__}"
    # a real process: bad input exits 2 with one line on stderr and no traceback
    out = subprocess.run(
        [sys.executable, "-m", "meanablate", "demo", "--organism", "tracr-sortt"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.count("\n") == 1 and "did you mean 'tracr-sort'" in out.stderr
    assert not (tmp_path / "runs").exists()


# -- the demo --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "run"
    result = ok("demo", "--out", out)
    return out, result


def test_demo_writes_a_complete_run_folder(demo_dir):
    out, result = demo_dir
    results = check_run_dir(out)
    org = meanablate.organisms.load("tracr-sort")
    assert results["model"]["name"] == "tracr-sort"
    assert set(results["circuit"]["units"]) == set(org.ground_truth)
    assert results["scores"]["faithfulness"] >= 0.95 and results["scores"]["auroc"] == 1.0
    lo, hi = results["scores"]["faithfulness_ci"]
    assert lo <= results["scores"]["faithfulness"] <= hi
    assert results["config"]["organism"] == "tracr-sort" and results["command"] == "demo"
    # the summary goes to stdout, logs and progress bars to stderr
    assert results["circuit"]["certificate"] == "exhaustive"
    assert results["circuit"]["mean_kind"] == "per_position"
    for word in ("faithfulness", "AUROC", "blocks.2.attn.hook_z[heads=0]", "certificate"):
        assert word in result.stdout
    assert "sweep" in result.stderr and "faithfulness" not in result.stderr
    means = Means.load(out / "means.safetensors", org.model)
    assert means.per_position and set(means.keys()) == {u.split("[")[0] for u in org.units}


def test_config_toml_reruns_the_same_run(demo_dir, tmp_path):
    import tomllib

    out, _ = demo_dir
    saved = tomllib.loads((out / "config.toml").read_text())
    assert saved == json.loads((out / "results.json").read_text())["config"]
    assert saved["organism"] == "tracr-sort" and saved["n-examples"] == 512
    again = tmp_path / "again"
    ok("demo", "--config", out / "config.toml", "--out", again, "--quiet", "--n-boot", "100")
    a, b = load_results(out), load_results(again)
    assert a["circuit"] == b["circuit"]
    assert [u["effect"] for u in a["units"]] == [u["effect"] for u in b["units"]]
    assert b["config"]["n-boot"] == 100  # the flag beat the config file


@pytest.mark.parametrize("organism", ["tracr-reverse", "tracr-frac_prevs"])
def test_demo_finds_the_true_circuit_of_every_tracr_organism(organism, tmp_path):
    result = ok("demo", "--organism", organism, "--out", tmp_path, "-q", "--n-examples", "256")
    assert result.stderr == ""  # --quiet: nothing on stderr
    results = check_run_dir(tmp_path)
    truth = set(meanablate.organisms.load(organism).ground_truth)
    assert set(results["circuit"]["units"]) == truth
    assert results["scores"]["faithfulness"] >= 0.95 and results["scores"]["auroc"] == 1.0


def test_report_rebuilds_from_results_json(demo_dir, tmp_path):
    out, _ = demo_dir
    copy = tmp_path / "copy"
    copy.mkdir()
    (copy / "results.json").write_bytes((out / "results.json").read_bytes())
    result = ok("report", copy)
    assert result.stdout.strip() == str(copy / "report.html")
    for name in ("report.html", *PLOTS):
        assert (copy / name).stat().st_size > 0
    assert "tracr-sort" in (copy / "report.html").read_text()


def test_organisms_lists_tasks_and_ground_truth():
    text = ok("organisms").stdout
    for name in ("tracr-sort", "tracr-reverse", "tracr-frac_prevs"):
        assert name in text
    assert "blocks.3.attn.hook_z[heads=0]" in text  # tracr-reverse's ground truth


def ma_scores_equal(path, obj) -> bool:
    """The CLI's sweep.json loads as the Scores it describes (per-example effects included)."""
    import meanablate as ma

    scores = ma.Scores.load(path)
    return scores.units == [u["name"] for u in obj["units"]] and scores.values.tolist() == [
        u["effect"] for u in obj["units"]
    ]


def test_sweep_attribute_and_means_commands(tmp_path):
    result = ok("sweep", "--organism", "tracr-reverse", "--out", tmp_path, "-q", "--n-examples", 64)
    sweep = json.loads((tmp_path / "sweep.json").read_text())
    assert sweep["method"] == "sweep" and len(sweep["units"]) == 8
    assert "blocks.3.attn.hook_z[heads=0]" in result.stdout
    means = tmp_path / "means.safetensors"
    # the same folder holds the sweep's run: writing into it again needs --force
    ok(
        "attribute",
        "--organism",
        "tracr-reverse",
        "--out",
        tmp_path,
        "-q",
        "--means",
        means,
        "--force",
    )
    attr = json.loads((tmp_path / "attribution.json").read_text())
    assert attr["method"] == "attribution" and attr["config"]["means"] == str(means)
    # both runs get a page; the attribution's sets its estimates beside the sweep's effects
    page = (tmp_path / "report.html").read_text()
    assert "attribution (estimate)" in page and "exact effect" in page
    assert (tmp_path / "effects.svg").is_file() and (tmp_path / "effects.pdf").is_file()
    assert ma_scores_equal(tmp_path / "sweep.json", sweep)
    ok("means", "--organism", "tracr-sort", "--out", tmp_path / "m", "-q", "--no-per-position")
    assert not Means.load(tmp_path / "m" / "means.safetensors").per_position


# -- your own models -------------------------------------------------------------------------
CUSTOM = '''
import torch
from torch import nn


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Linear(4, 8)
        self.act = nn.ReLU()
        self.b = nn.Linear(8, 3)
        with torch.no_grad():
            self.b.weight[:, 4:] = 0  # neurons 4..7 do nothing

    def forward(self, x):
        return self.b(self.act(self.a(x)))


def build(n_examples, seed):
    """A two-layer MLP on random inputs."""
    x = torch.randn(n_examples, 4, generator=torch.Generator().manual_seed(seed))
    batches = [{"x": x[i : i + 16]} for i in range(0, n_examples, 16)]
    return Tiny(), batches, [f"act[neurons={i}]" for i in range(8)]
'''


@pytest.mark.parametrize("spec", ["mymodels:build", "{dir}/mymodels.py:build"])
def test_custom_model_function(tmp_path, monkeypatch, spec):
    (tmp_path / "mymodels.py").write_text(CUSTOM)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    # import this test's mymodels afresh, and forget it afterwards (setitem records it absent)
    monkeypatch.setitem(sys.modules, "mymodels", None)
    del sys.modules["mymodels"]
    spec = spec.format(dir=tmp_path)
    gt = [f"act[neurons={i}]" for i in range(4)]
    args = ["discover", "--model", spec, "--out", "run", "-q", "--n-examples", 64]
    ok(*args, "--metric", "l2", *[a for u in gt for a in ("--ground-truth", u)])
    results = check_run_dir(tmp_path / "run")
    assert results["model"]["name"] == "mymodels.build" and len(results["units"]) == 8
    assert set(results["circuit"]["units"]) <= set(gt)  # dead neurons are never kept
    assert results["scores"]["auroc"] is not None


def test_hugging_face_model_directory(tiny_gpt2, tmp_path):
    path, prompts = tiny_gpt2
    # a random model: its logit difference is noise, and discovery says so
    bad = run("discover", "--model", path, "--prompts", prompts, "--out", tmp_path / "x", "-q")
    assert (
        bad.exit_code != 0
        and "not distinguishable" in bad.stderr
        and "--force-discovery" in bad.stderr
    )
    assert not (tmp_path / "x" / "results.json").exists()
    ok(
        "discover",
        "--model",
        path,
        "--prompts",
        prompts,
        "--out",
        tmp_path / "a",
        "-q",
        "--force-discovery",
    )
    results = check_run_dir(tmp_path / "a", plots=PLOTS[:2])
    assert results["metric"]["name"] == "logit_diff"  # the prompts have target and wrong
    names = [u["name"] for u in results["units"]]
    assert "transformer.h.1.attn.c_proj@input[heads=1]" in names  # n_heads: from the config
    assert "transformer.h.0.mlp" in names and len(names) == 6  # heads and MLPs by default
    assert results["scores"]["auroc"] is None and "transformers" in results["versions"]
    # plain text prompts, granularities: neurons of one layer, heads of the other
    text = tmp_path / "prompts.txt"
    text.write_text("the cat sat on the mat\n\na dog sat\n")
    args = ["--units", "neurons:1", "--units", "heads:0", "--algorithm", "sweep"]
    ok(
        "discover",
        "--model",
        path,
        "--prompts",
        text,
        "--out",
        tmp_path / "b",
        "-q",
        "--force",
        *args,
    )
    results = load_results(tmp_path / "b")
    assert results["metric"]["name"] == "kl" and len(results["units"]) == 64 + 2


def test_toml_config_run(tiny_gpt2, tmp_path):
    path, prompts = tiny_gpt2
    config = tmp_path / "run.toml"
    config.write_text(
        textwrap.dedent(f"""\
        model = "{path}"
        prompts = "{prompts}"
        units = ["heads"]
        algorithm = "sweep"
        target-faithfulness = 0.9
        n_boot = 50
        force-discovery = true
        """)
    )
    ok("discover", "--config", config, "--out", tmp_path / "run", "--quiet", "--seed", 7)
    results = check_run_dir(tmp_path / "run", plots=PLOTS[:2])
    cfg = results["config"]
    assert cfg["algorithm"] == "sweep" and cfg["target-faithfulness"] == 0.9
    assert cfg["units"] == ["heads"] and cfg["seed"] == 7 and "threshold" not in cfg
    assert results["seed"] == 7 and len(results["units"]) == 4
    assert results["scores"]["faithfulness"] >= 0.9 or len(results["circuit"]["units"]) == 4


# -- bad input: one line on stderr, exit code 2, no traceback ---------------------------------
def test_bad_inputs_exit_2_with_one_line(tiny_gpt2, tmp_path):
    path, prompts = tiny_gpt2
    not_hf = tmp_path / "not-hf"
    not_hf.mkdir()
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    typo = tmp_path / "typo.toml"
    typo.write_text('organism = "tracr-sort"\ntreshold = 0.01\n')
    bad_prompts = tmp_path / "bad.jsonl"
    bad_prompts.write_text(prompts.read_text() + '{"text": "the cat", "target": "mat"\n')
    two_tokens = tmp_path / "two.jsonl"
    two_tokens.write_text('{"text": "the cat", "target": "John Mary", "wrong": "mat"}\n')
    cases = [
        (["demo", "--organism", "tracr-sortt"], ["unknown organism 'tracr-sortt'", "tracr-sort"]),
        (["demo", "--config", tmp_path / "nope.toml"], ["nope.toml: no such file"]),
        (["demo", "--config", typo], [f"{typo}, line 2", "'treshold'", "'threshold'"]),
        (["discover", "--model", path, "--prompts", tmp_path / "x.txt"], ["x.txt: no such file"]),
        (["discover", "--model", tmp_path / "nodir"], ["nodir: no such directory"]),
        (["discover", "--model", not_hf, "--prompts", prompts], ["no config.json"]),
        (["discover", "--model", broken, "--prompts", prompts], ["cannot read config.json"]),
        (["discover", "--model", path, "--prompts", bad_prompts], [f"{bad_prompts}, line 5"]),
        (["discover", "--model", path, "--prompts", two_tokens], [f"{two_tokens}, line 1"]),
        (["sweep", "--organism", "tracr-sort", "--means", tmp_path / "m.st"], ["m.st: no such"]),
        (["discover", "--model", "nomodule:build"], ["no module named 'nomodule'"]),
        (["discover", "--organism", "tracr-sort", "--units", "blocks.9.mlp"], ["blocks.9.mlp"]),
        (["demo", "--threshold", "-1"], ["--threshold must be >= 0"]),
        (["demo", "--threshold", "1"], ["--threshold must be < 1"]),
        (["demo", "--abs-threshold", "-0.5"], ["--abs-threshold must be >= 0"]),
        (["demo", "--target-faithfulness", "1.5"], ["--target-faithfulness must be <= 1"]),
        (["demo", "--mean-kind", "global"], ["unknown value 'global'", "plain_except"]),
        (["demo", "--mean-kind", "plain", "--per-position"], ["contradicts --mean-kind"]),
        (["demo", "--organism", tmp_path / "none.json"], ["no such organism card"]),
        (["report", tmp_path / "nothing"], ["nothing: no such folder"]),
        (["report", tmp_path], ["no results.json"]),
    ]
    for args, expected in cases:
        result = run(*args, "--out", tmp_path / "out") if args[0] != "report" else run(*args)
        assert result.exit_code == 2, (args, result.stderr, result.exception)
        line = one_error_line(result)
        for text in expected:
            assert text in line, (args, line)
        assert not (tmp_path / "out" / "results.json").exists()


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["demo", "--n-examples", "abc"], "Invalid value for '--n-examples'"),
        (["demo", "--bogus"], "No such option: --bogus"),
        (["demox"], "No such command 'demox'. Did you mean 'demo'?"),
        (["report"], "Missing argument 'RUN_DIR'"),
    ],
)
def test_usage_errors_are_one_line_too(args, expected, capsys):
    from meanablate.cli import main

    with pytest.raises(SystemExit) as info:
        main(args)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and expected in err


def test_debug_shows_the_traceback():
    result = run("demo", "--organism", "tracr-sortt", "--debug")
    assert result.exit_code != 0 and isinstance(result.exception, ValueError)


# -- interruptions ---------------------------------------------------------------------------
def test_ctrl_c_leaves_no_half_written_results(demo_dir, tmp_path, monkeypatch):
    out, _ = demo_dir
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    before = (out / "results.json").read_bytes()
    (run_dir / "results.json").write_bytes(before)  # an earlier run in the same folder

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(meanablate, "discover", interrupt)
    result = run("demo", "--out", run_dir, "--quiet", "--force")
    assert result.exit_code == 130
    assert "interrupted; no results were written" in one_error_line(result)
    assert (run_dir / "results.json").read_bytes() == before  # untouched
    validate_results(json.loads(before))

    # Ctrl-C while json is encoding results.json: the old file stays, no temp file remains
    monkeypatch.undo()
    import meanablate.report._io as io

    def dump(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(io.json, "dump", dump)
    result = run("demo", "--out", run_dir, "--quiet", "--force")
    assert result.exit_code == 130
    assert (run_dir / "results.json").read_bytes() == before
    assert not list(run_dir.glob(".results.json.*"))


# -- Ray --------------------------------------------------------------------------------------
def test_ray_local_sweep_matches_the_local_run(tmp_path):
    ray = pytest.importorskip("ray")
    if ray.is_initialized():
        pytest.skip("Ray is already initialized in this process")
    args = ("sweep", "--organism", "tracr-reverse", "-q", "--n-examples", 64, "--n-boot", 0)
    ok(*args, "--out", tmp_path / "here")
    ok(*args, "--out", tmp_path / "ray", "--ray", "local", "--ray-workers", 2)
    assert not ray.is_initialized()  # the Ray instance started for the run is stopped
    here, there = (json.loads((tmp_path / d / "sweep.json").read_text()) for d in ("here", "ray"))
    assert [u["name"] for u in there["units"]] == [u["name"] for u in here["units"]]
    for a, b in zip(here["units"], there["units"]):
        assert b["effect"] == pytest.approx(a["effect"], rel=1e-5, abs=1e-7)
    saved = (tmp_path / "ray" / "config.toml").read_text()
    assert "\nray" not in saved  # where it ran is not an option of the results


def test_ray_unreachable_address_is_one_line_exit_2(tmp_path):
    pytest.importorskip("ray")
    result = run("sweep", "--organism", "tracr-reverse", "--ray", "127.0.0.1:1", "--out", tmp_path)
    assert result.exit_code == 2
    line = one_error_line(result)
    assert "--ray 127.0.0.1:1" in line and "cannot reach the Ray cluster" in line
    assert not (tmp_path / "config.toml").exists()  # nothing was loaded or written


def test_ray_workers_need_ray_and_missing_ray_names_the_extra(tmp_path, monkeypatch):
    result = run("means", "--organism", "tracr-reverse", "--ray-workers", 2, "--out", tmp_path)
    assert result.exit_code == 2
    assert "--ray-workers needs --ray" in one_error_line(result)
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    result = run("means", "--organism", "tracr-reverse", "--ray", "auto", "--out", tmp_path)
    assert result.exit_code == 2
    assert "pip install 'meanablate[ray]'" in one_error_line(result)
