"""The command line's error contract (docs/errors.md): every user error is one ``error:``
line and exit code 2, naming the option or the file and line; ``-q`` silences third-party
output; an existing run folder is not overwritten without ``--force``; identical runs write
identical files; ``--help`` does not import torch."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from meanablate.cli import app

SRC = str(Path(__file__).resolve().parents[2] / "src")


def run(*args):
    return CliRunner().invoke(app, [str(a) for a in args], prog_name="meanablate")


def error_line(result) -> str:
    assert result.exit_code == 2, (result.stdout, result.stderr, result.exception)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def process(*args, env=None, cwd=None):
    full_env = {**os.environ, "PYTHONPATH": SRC, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "meanablate", *map(str, args)],
        capture_output=True,
        text=True,
        env=full_env,
        cwd=cwd,
    )


# -- units -------------------------------------------------------------------------------
def test_head_out_of_range_names_the_unit_and_the_range(tmp_path):
    line = error_line(
        run("sweep", "--organism", "tracr-sort", "--units", "blocks.0.attn.hook_z[heads=3]",
            "--out", tmp_path / "o", "-q")
    )  # fmt: skip
    assert "--units: unit 'blocks.0.attn.hook_z[heads=3]'" in line
    assert "head 3 out of range" in line and "1 heads" in line
    assert not (tmp_path / "o" / "sweep.json").exists()


def test_units_file_errors_name_the_file_and_line(tmp_path):
    units = tmp_path / "units.txt"
    cases = [
        ("blocks.0.attn.hook_z[heads=0]\n# a comment\nblocks.9.mlp\n", "line 3", "blocks.9.mlp"),
        ("blocks.0.attn.hook_z[heads=0]\nblocks.1.attn.hook_z[heads=4]\n", "line 2", "head 4"),
        ("blocks.0.attn.hook_z[heads=x]\n", "line 1", "heads must be integers"),
        ("blocks.0.hook_mlp_out[neurons=999]\n", "line 1", "neuron 999 out of range"),
    ]
    for text, where, what in cases:
        units.write_text(text)
        line = error_line(
            run("sweep", "--organism", "tracr-sort", "--units", f"@{units}", "--out",
                tmp_path / "o", "-q")
        )  # fmt: skip
        assert f"{units}, {where}:" in line and what in line, line


# -- files -------------------------------------------------------------------------------
def test_bad_means_file_is_exit_2_naming_the_file(tmp_path):
    bad = tmp_path / "m.safetensors"
    bad.write_bytes(b"\x80\x04K\x01.")  # a pickle
    line = error_line(
        run("sweep", "--organism", "tracr-sort", "--means", bad, "--out", tmp_path / "o", "-q")
    )
    assert str(bad) in line and "pickle" in line and "not unpickled" in line


def test_existing_run_folder_needs_force(tmp_path):
    out = tmp_path / "run"
    assert run("means", "--organism", "tracr-sort", "--out", out, "-q").exit_code == 0
    before = (out / "means.safetensors").read_bytes()
    line = error_line(run("means", "--organism", "tracr-sort", "--out", out, "-q"))
    assert f"--out {out}: already holds a run (means.safetensors" in line and "--force" in line
    result = run("means", "--organism", "tracr-sort", "--out", out, "-q", "--force")
    assert result.exit_code == 0, result.stderr
    assert (out / "means.safetensors").read_bytes() == before
    # a folder where a run failed before writing anything (only config.toml) is reusable
    failed = tmp_path / "failed"
    error_line(
        run("sweep", "--organism", "tracr-sort", "--means", tmp_path / "no.st", "--out", failed)
    )
    assert run("means", "--organism", "tracr-sort", "--out", failed, "-q").exit_code == 0


# -- help --------------------------------------------------------------------------------
def test_flags_show_no_bool_metavar():
    for args in (["--help"], ["demo", "--help"], ["sweep", "--help"]):
        text = run(*args).stdout
        assert "--quiet" in text or args == ["--help"], text
        assert "<bool>" not in text


def test_help_does_not_import_torch():
    code = (
        "import sys\n"
        "from meanablate.cli import main\n"
        "try:\n    main(['demo', '--help'])\nexcept SystemExit:\n    pass\n"
        "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH', file=sys.stderr)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": SRC},
    )
    assert out.returncode == 0 and "Usage: meanablate demo" in out.stdout
    assert out.stderr.strip().endswith("NO-TORCH"), out.stderr


# -- third-party output ------------------------------------------------------------------
@pytest.fixture(scope="module")
def noisy_gpt2(tiny_gpt2, tmp_path_factory):
    """The tiny GPT-2 with token ids outside its vocabulary: transformers warns on loading."""
    path, prompts = tiny_gpt2
    noisy = tmp_path_factory.mktemp("noisy") / "gpt2"
    shutil.copytree(path, noisy)
    cfg = json.loads((noisy / "config.json").read_text())
    cfg.update(bos_token_id=50256, eos_token_id=50256)
    (noisy / "config.json").write_text(json.dumps(cfg))
    return noisy, prompts


def test_quiet_silences_transformers_and_errors_stay_one_line(noisy_gpt2, tmp_path):
    path, prompts = noisy_gpt2
    quiet = process(
        "sweep", "--model", path, "--prompts", prompts, "--units", "transformer.h.0.mlp",
        "--out", tmp_path / "b", "-q",
    )  # fmt: skip
    assert quiet.returncode == 0 and quiet.stderr == "", quiet.stderr
    # CI often sets HF_HUB_DISABLE_PROGRESS_BARS: an error after transformers loaded is
    # still one line, not followed by a huggingface_hub warning
    env = {"HF_HUB_DISABLE_PROGRESS_BARS": "1"}
    for flags in ([], ["-q"]):
        bad = process(
            "sweep", "--model", path, "--prompts", prompts, "--units",
            "transformer.h.0.attn.c_proj@input[heads=5;n_heads=2]", "--out", tmp_path / "c",
            *flags, env=env,
        )  # fmt: skip
        assert bad.returncode == 2, bad.stderr
        lines = [x for x in bad.stderr.splitlines() if x.strip()]
        if flags:  # -q: the error line is all there is
            assert len(lines) == 1, lines
        else:  # transformers does speak without -q (so the quiet checks can fail)
            assert "bos_token_id" in bad.stderr
        errors = [x for x in lines if x.startswith("error: ")]
        assert len(errors) == 1 and errors[0] == lines[-1] and "head 5" in errors[0], lines
        assert "UserWarning" not in bad.stderr and "huggingface_hub" not in bad.stderr


def test_in_process_runs_leave_transformers_logging_as_they_found_it(tiny_gpt2, tmp_path):
    transformers = pytest.importorskip("transformers")
    path, prompts = tiny_gpt2
    log = transformers.utils.logging
    before = (log.get_verbosity(), log.is_progress_bar_enabled())
    result = run("sweep", "--model", path, "--prompts", prompts, "--units", "transformer.h.0.mlp",
                 "--out", tmp_path / "a", "-q")  # fmt: skip
    assert result.exit_code == 0, result.stderr
    assert (log.get_verbosity(), log.is_progress_bar_enabled()) == before


# -- time and byte stability -------------------------------------------------------------
def _strip_volatile(path: Path) -> str:
    data = json.loads(path.read_text())
    # the file is exactly the writer's encoding, so comparing re-encodings compares bytes
    assert json.dumps(data, indent=2, ensure_ascii=False) + "\n" == path.read_text()
    data["created"], data["timings"] = None, None
    return json.dumps(data, indent=2, ensure_ascii=False)


def test_identical_demo_runs_write_identical_files_and_one_run_time(tmp_path):
    from meanablate.report.fmt import seconds

    outs = [tmp_path / "one", tmp_path / "two"]
    results = [run("demo", "--out", out, "-q", "--n-boot", "20") for out in outs]
    for r in results:
        assert r.exit_code == 0, r.stderr
    a, b = outs
    assert (a / "means.safetensors").read_bytes() == (b / "means.safetensors").read_bytes()
    assert _strip_volatile(a / "results.json") == _strip_volatile(b / "results.json")
    # the terminal's run time is the report's: one measurement, one format
    for out, r in zip(outs, results):
        total = json.loads((out / "results.json").read_text())["timings"]["total"]
        shown = re.search(r"time\s+│?\s*([0-9.]+ (?:ms|s|min [0-9.]+ s))", r.stdout)
        assert shown and shown.group(1) == seconds(total), (r.stdout, total)
        assert seconds(total) in (out / "report.html").read_text()


def test_discovery_refusal_is_exit_2_and_force_goes_ahead(tiny_gpt2, tmp_path):
    path, prompts = tiny_gpt2
    args = ["discover", "--model", path, "--prompts", prompts, "-q", "--algorithm", "sweep"]
    # the random tiny GPT-2 does not tell the full model from the empty circuit
    result = run(*args, "--out", tmp_path / "a")
    assert result.exit_code == 2, result.stderr
    line = error_line(result)
    assert "not distinguishable from the empty circuit" in line and "--force" in line
    assert not (tmp_path / "a" / "results.json").exists()
    result = run(*args, "--out", tmp_path / "b", "--force")
    assert result.exit_code == 0, result.stderr
