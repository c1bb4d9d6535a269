"""Worker logs under $DAGKUBE_HOME/logs stay within a budget: the oldest go first, a log
written in the last hour stays whatever the budget."""

from __future__ import annotations

import os
import time

from dagkube.runtime.local_backend import LocalBackend, prune_logs


def write_logs(log_dir, ages_s, size=1000):
    log_dir.mkdir(parents=True, exist_ok=True)
    now = time.time()
    for index, age in enumerate(ages_s):
        path = log_dir / f"w{index}.log"
        path.write_bytes(b"x" * size)
        os.utime(path, (now - age, now - age))


def remaining(log_dir):
    return sorted(p.name for p in log_dir.glob("*.log"))


def test_the_oldest_logs_beyond_the_byte_budget_are_deleted(tmp_path):
    write_logs(tmp_path, [7200, 9000, 10800, 14400])  # 2 h to 4 h old, 1000 bytes each
    assert prune_logs(tmp_path, budget_bytes=2500) == 2
    assert remaining(tmp_path) == ["w0.log", "w1.log"]


def test_the_file_budget_applies_too(tmp_path):
    write_logs(tmp_path, [7200 + i for i in range(5)])
    assert prune_logs(tmp_path, budget_files=3) == 2
    assert remaining(tmp_path) == ["w0.log", "w1.log", "w2.log"]


def test_recent_logs_are_kept_over_budget(tmp_path):
    write_logs(tmp_path, [10, 20, 99999])
    assert prune_logs(tmp_path, budget_bytes=500) == 1
    assert remaining(tmp_path) == ["w0.log", "w1.log"]


def test_a_local_backend_prunes_its_log_directory_when_it_starts(tmp_path, monkeypatch):
    monkeypatch.setattr("dagkube.runtime.local_backend.LOG_BUDGET_FILES", 2)
    write_logs(tmp_path / "logs", [7200, 8000, 9000, 10000])
    LocalBackend("redis://127.0.0.1:1/0", "pool", tmp_path / "logs", enforce=False)
    assert remaining(tmp_path / "logs") == ["w0.log", "w1.log"]
