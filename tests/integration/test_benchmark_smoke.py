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
        timeout=600,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    data = json.loads(out.read_text())
    assert data["machine"]["cores_logical"] >= 1 and data["machine"]["python"]
    names = [row["workload"] for row in data["results"]]
    assert [n.split("-")[0] for n in names] == ["fanout", "tree", "chain", "matmul", "fanin"]
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


@pytest.mark.parametrize("order", [[], ["--interleave"]], ids=["blocks", "interleaved"])
def test_shapes_quick(tmp_path, order):
    """benchmarks/shapes.py: a WfCommons shape replayed on every planner and Dask; no engine
    beats the lower bound (a true bound: every task sleeps at least its drawn duration).
    Engines run in blocks, or take turns run by run (``--interleave``)."""
    out, page = tmp_path / "shapes.json", tmp_path / "benchmarks.md"
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "shapes.py"),
            "--quick",
            "--recipes",
            "seismology",
            *order,
            "--json",
            str(out),
            "--markdown",
            str(page),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    data = json.loads(out.read_text())
    planners = data["options"]["planners"]
    assert {"wukong", "uniform", "non-uniform", "uniform-opt"} <= set(planners)
    (row,) = data["results"]
    assert row["shape"] == "seismology" and row["tasks"] > 100 and row["depth"] == 2
    assert set(row["median_ratio"]) == {*planners, "dask"}
    workers = data["options"]["workers"]
    for engine, ratio in row["median_ratio"].items():
        # More tasks at once than workers (dagkube's cap skips workers waiting for inputs)
        # lowers the bound in proportion; Dask runs at most one task per worker.
        at_once = max([workers, *row["most_at_once"].get(engine, [])])
        assert 0.99 * workers / at_once <= ratio < 50, f"{engine}: {ratio:.2f}x the bound"
    assert not any(row["failed"].values()), row["failed"]
    # What each non-uniform and -opt plan changed from its plain plan: one count per run.
    assert set(row["changes"]) == {p for p in planners if p == "non-uniform" or p.endswith("-opt")}
    assert all(len(c) == len(row["seconds"]["uniform"]) for c in row["changes"].values())
    table = page.read_text()
    assert "against the plain plan: non-uniform" in table and "uniform-opt" in table
    assert "## Real workflow shapes (WfCommons)" in table
    assert ("every engine in turn (the order rotating" in table) == bool(order)
    header = next(line for line in table.splitlines() if line.startswith("| shape |"))
    assert [cell.strip() for cell in header.strip(" |").split("|")][7:] == [*planners, "Dask"]
    assert "| seismology-100 |" in table
