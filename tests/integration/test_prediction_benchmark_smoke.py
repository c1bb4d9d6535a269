"""benchmarks/predictions.py still runs (a smoke test; its numbers live in docs/benchmarks.md)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.integration


def test_prediction_benchmark_quick(tmp_path):
    """Two workloads, 4 runs each: every run is planned at avg and p90 and measured, the
    table has a row per workload, and the scored runs had the history asked for."""
    out = tmp_path / "predictions.json"
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "predictions.py"),
            "--quick",
            "--only",
            "sizes,io",
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "## Predictions on unseen workloads" in result.stdout
    rows = [line for line in result.stdout.splitlines() if line.startswith(("| sizes", "| io"))]
    assert len(rows) == 2, result.stdout
    data = json.loads(out.read_text())
    for found in data["results"]:
        assert len(found["runs"]) == 4 and found["runs_scored"] == 2
        for run in found["runs"]:
            assert run["actual_s"] > 0 and run["avg_s"] > 0 and run["p90_s"] > 0
        assert 0 <= found["p90_within"] <= 1 and found["avg_error"] >= 0
        # Every task's output was predicted and compared (the sizes vary run to run).
        assert found["task_output_error"] is not None
    sizes = next(r for r in data["results"] if r["workload"] == "sizes")
    assert sizes["task_exec_error"] is not None


def test_prediction_benchmark_rejects_an_unknown_workload():
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "predictions.py"), "--only", "nope"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert result.returncode == 2
    assert "unknown workload(s) nope: use cpu, io, sizes, noisy, contended, held-out" in (
        result.stderr
    )
