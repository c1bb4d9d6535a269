"""The benchmarks still run (smoke tests; numbers live in docs/benchmarks.md)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.integration


def test_compare_dask_quick(tmp_path):
    out = tmp_path / "results.json"
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "compare_dask.py"),
            "--quick",
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    data = json.loads(out.read_text())
    assert data["machine"]["cores_logical"] >= 1 and data["machine"]["python"]
    names = [row["workload"] for row in data["results"]]
    assert [n.split("-")[0] for n in names] == ["fanout", "tree", "chain", "matmul"]
    for row in data["results"]:
        assert row["dagkube_median_s"] > 0 and row["dask_median_s"] > 0
        assert row["ratio_dagkube_over_dask"] == pytest.approx(
            row["dagkube_median_s"] / row["dask_median_s"]
        )


def test_persistence_quick():
    """benchmarks/persistence.py: one measured run per arm, every arm in its table."""
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "persistence.py"), "--runs", "1"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    rows = [line for line in result.stdout.splitlines() if line.startswith("| ") and "s |" in line]
    assert len(rows) == 3 and any("AOF everysec" in row for row in rows), result.stdout
