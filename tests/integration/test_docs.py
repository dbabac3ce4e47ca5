"""The documentation site builds with ``mkdocs build --strict`` (the ``docs`` extra)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_mkdocs_build_strict(tmp_path):
    for module in ("mkdocs", "mkdocstrings", "material"):
        pytest.importorskip(module, reason="the docs extra is not installed")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    env["PYTHONPATH"] = str(ROOT / "src") + os.pathsep + env.get("PYTHONPATH", "")
    run = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-q", "-d", str(tmp_path / "site")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    page = (tmp_path / "site" / "api" / "meanablate" / "index.html").read_text()
    for name in ("compute_means", "sweep", "discover", "Circuit", "prompt_batches"):
        assert name in page or name == "prompt_batches"
    assert 'class="highlight"' in page  # docstring examples render as code
    data = (tmp_path / "site" / "api" / "data" / "index.html").read_text()
    assert "prompt_batches" in data
