"""benchmarks/transfers.py still runs (a smoke test; its numbers live in docs/benchmarks.md)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.integration


def test_transfers_benchmark_quick(tmp_path):
    """One case, 3 runs, the last 2 scored: every scored run has a transfer error, and each
    task that moved bytes is paired with its plan's prediction."""
    out = tmp_path / "transfers.json"
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "transfers.py"),
            *("--runs", "3", "--history", "1", "--only", "unequal_branches/wukong"),
            *("--json", str(out)),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "| unequal_branches/wukong | 2 |" in result.stdout
    (found,) = json.loads(out.read_text())["results"]
    assert found["runs_scored"] == 2 and found["transfer_error"] is not None
    scored = found["runs"][1:]
    uploads = [p for run in scored for p in run["parts"]["upload"]]
    assert uploads and all(p["bytes"] > 0 and p["predicted_s"] > 0 for p in uploads)


def test_transfers_benchmark_rejects_an_unknown_case():
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "transfers.py"), "--only", "nope"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert result.returncode == 2
    assert "unknown case(s) nope" in result.stderr
