"""Memory and CPU made real on the local runtime: workers under cgroup limits, the peak memory
of every task measured, OOM kills re-run one class up and learned by the next plan, and a
task that cannot fit, or that keeps killing its worker, failing the run instead of looping.

These need a writable cgroup hierarchy (root here); elsewhere they skip, saying why.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest

import dagkube
from dagkube.metrics.history import read_run
from dagkube.runtime import cgroups
from dagkube.runtime.scaler import MAX_REQUEUES
from dagkube.store.records import OomAttempt

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(
        cgroups.detect() is None,
        reason="no writable cgroup hierarchy (needs root or a delegated cgroup v2 subtree)",
    ),
]

MIB = 1024 * 1024
# Small classes keep these quick; 256 MiB per CPU gives the small class a whole CPU's quarter
# (a realistic 1792 would leave a 256 MiB worker 0.14 of a core, and start-ups slow).
CLASSES = "256Mi,1Gi"


@dagkube.task
def hog(mib: int) -> int:
    """Holds ``mib`` MiB (written, so every page is resident) while it runs."""
    block = b"x" * (mib * MIB)
    return len(block) // MIB


@dagkube.task
def after(x: int) -> int:
    return x + 1


# The history is shared by the tests (one Redis) and keyed by the workflow's structure
# (functions and edges): tests that must start without memory history get their own.
@dagkube.task
def after_largest(x: int) -> int:
    return x + 1


@dagkube.task
def after_unenforced(x: int) -> int:
    return x + 1


@dagkube.task
def crash(x: int) -> int:
    os.kill(os.getpid(), signal.SIGKILL)
    return x


@dagkube.task
def burn(n: int) -> int:
    total = 0
    for i in range(n):
        total += i * i
    return total


def _runtime(make_runtime, **options):
    options.setdefault("memory_per_cpu_mib", 256)
    options.setdefault("max_workers", 2)
    return make_runtime(enforce=True, **options)


def test_an_oom_killed_task_reruns_one_class_up_and_the_next_plan_starts_there(make_runtime):
    rt = _runtime(make_runtime)
    wf = dagkube.Workflow(after(hog(400)), name="it-oom-escalation")
    first = rt.plan(wf.dag, "wukong", classes=CLASSES)
    assert {t.memory_mib for t in first.tasks.values()} == {256}  # no history: the middle
    result = rt.run(wf.dag, first, timeout_s=60)
    assert result.status == "succeeded" and result.outputs == 401
    record = result.record
    assert record.enforced and record.oom_kills == 1 and record.escalations == 1
    history = rt.call(read_run(rt.redis, result.run_id))
    assert history is not None
    (hogged,) = [t for t in history.tasks if t.task_id == "hog#0"]
    assert hogged.memory_mib == 1024
    assert [a.memory_mib for a in hogged.oom_attempts] == [256]
    assert isinstance(hogged.oom_attempts[0], OomAttempt)
    assert hogged.peak_memory_bytes is not None and hogged.peak_memory_bytes > 400 * MIB
    (lost,) = [w for w in history.workers if w.outcome == "lost"]
    assert lost.oom_killed and lost.memory_mib == 256 and lost.lost_task == "hog#0"
    assert lost.peak_memory_bytes is not None and lost.peak_memory_bytes >= 200 * MIB

    second = rt.plan(wf.dag, "wukong", classes=CLASSES)
    assert second.tasks["hog#0"].memory_mib == 1024
    assert any("predicted peak memory raised the class to 1024 MiB" in n for n in second.notes)
    again = rt.run(wf.dag, second, timeout_s=60)
    assert again.status == "succeeded"
    assert again.record.oom_kills == 0 and again.record.workers_lost == 0


def test_a_task_that_needs_more_than_the_largest_class_fails_the_run_clearly(make_runtime):
    rt = _runtime(make_runtime)
    wf = dagkube.Workflow(after_largest(hog(1400)), name="it-oom-largest")
    began = time.monotonic()
    result = rt.run(wf.dag, rt.plan(wf.dag, "wukong", classes=CLASSES), timeout_s=60)
    elapsed = time.monotonic() - began
    assert result.status == "failed"
    assert elapsed < 30
    error = result.record.error or {}
    assert error["exc_type"] == "OutOfMemory" and error["task_id"] == "hog#0"
    assert error["function"] == "hog"
    assert "was OOM-killed on the largest class, 1024 MiB" in error["message"]
    assert "classes: 256,1024 MiB" in error["message"]
    assert result.record.oom_kills == 2 and result.record.escalations == 1
    with pytest.raises(dagkube.TaskFailed, match="OOM-killed on the largest class"):
        wf.run(runtime=rt, classes=CLASSES, timeout=60)


def test_a_task_that_keeps_killing_its_worker_fails_after_the_requeue_cap(make_runtime):
    rt = _runtime(make_runtime)
    wf = dagkube.Workflow(after(crash(1)), name="it-poison")
    began = time.monotonic()
    result = rt.run(wf.dag, rt.plan(wf.dag, "wukong", classes=CLASSES), timeout_s=60)
    assert time.monotonic() - began < 30
    assert result.status == "failed"
    error = result.record.error or {}
    assert error["exc_type"] == "WorkerLost" and error["task_id"] == "crash#0"
    assert f"died {MAX_REQUEUES + 1} times" in error["message"]
    assert result.record.workers_lost == MAX_REQUEUES + 1
    assert result.record.oom_kills == 0


def test_each_task_gets_its_own_peak_on_a_warm_worker(make_runtime):
    rt = _runtime(make_runtime, max_workers=1)
    wf = dagkube.Workflow(after(hog(300)), name="it-peaks")
    result = rt.run(wf.dag, rt.plan(wf.dag, "wukong", classes="1Gi"), timeout_s=60)
    assert result.status == "succeeded"
    history = rt.call(read_run(rt.redis, result.run_id))
    assert history is not None
    peaks = {t.task_id: t.peak_memory_bytes or 0 for t in history.tasks}
    assert peaks["hog#0"] > 300 * MIB
    # The same worker ran the next task: its peak was reset before it, not carried over.
    assert len({t.worker_id for t in history.tasks}) == 1
    assert 0 < peaks["after#0"] < 200 * MIB
    (worker,) = history.workers
    assert worker.peak_memory_bytes == max(peaks.values())


@dagkube.task
def blob(mib: int, run: int) -> bytes:
    return bytes([run % 256]) * (mib * MIB)


@dagkube.task
def blob_size(data: bytes) -> int:
    return len(data) // MIB


def test_a_warm_worker_does_not_keep_the_values_of_runs_that_ended(make_runtime):
    # One warm worker, five runs, each with a 120 MiB value: were ended runs' values kept
    # (as they were, for the last four runs), the fifth run's tasks would start 480 MiB up.
    rt = _runtime(make_runtime, max_workers=1)
    peaks = []
    for run in range(5):
        wf = dagkube.Workflow(blob_size(blob(120, run)), name="it-held-values")
        result = rt.run(wf.dag, rt.plan(wf.dag, "wukong", classes="1Gi"), timeout_s=60)
        assert result.status == "succeeded" and result.outputs == 120
        history = rt.call(read_run(rt.redis, result.run_id))
        assert history is not None
        assert len({w.worker_id for w in history.workers}) == 1
        peaks.append({t.task_id: t.peak_memory_bytes or 0 for t in history.tasks})
    assert all(p["blob#0"] > 120 * MIB for p in peaks)
    assert peaks[-1]["blob#0"] < peaks[0]["blob#0"] + 100 * MIB, [p["blob#0"] for p in peaks]


def test_the_cpu_quota_of_a_class_slows_a_cpu_bound_task(make_runtime):
    # 256 MiB at 1024 MiB per CPU: a quarter of a core.
    rt = _runtime(make_runtime, memory_per_cpu_mib=1024)
    wf = dagkube.Workflow(burn(3_000_000), name="it-quota")
    result = rt.run(wf.dag, rt.plan(wf.dag, "wukong", classes="256Mi"), timeout_s=120)
    assert result.status == "succeeded"
    history = rt.call(read_run(rt.redis, result.run_id))
    assert history is not None
    (task,) = history.tasks
    wall = task.ended_at - task.started_at
    # A quarter of a core: about four seconds of wall time per CPU-second (2.5 leaves room
    # for the quota's period boundaries); unenforced it would be about one.
    assert wall > 2.5 * task.cpu_s, (wall, task.cpu_s)


def test_without_enforcement_a_worker_may_exceed_its_class(make_runtime):
    rt = make_runtime(enforce=False, max_workers=2)
    assert not rt.enforced
    assert "switched off" in rt.enforcement_note
    wf = dagkube.Workflow(after_unenforced(hog(400)), name="it-unenforced")
    planned = rt.plan(wf.dag, "wukong", classes=CLASSES)
    assert planned.tasks["hog#0"].memory_mib == 256
    result = rt.run(wf.dag, planned, timeout_s=60)
    assert result.status == "succeeded"
    assert not result.record.enforced and result.record.oom_kills == 0


def test_cgroups_left_by_a_driver_that_died_are_swept_at_the_next_start(tmp_path):
    from dagkube.runtime.local_backend import CGROUP_ROOT, LocalBackend

    hierarchy = cgroups.detect()
    assert hierarchy is not None
    probe = subprocess.Popen(["true"])  # its pid: a driver that has exited
    probe.wait()
    dead = f"local-{probe.pid}-aaaaaa"
    alive = f"local-{os.getpid()}-bbbbbb"
    stale = hierarchy.create(f"{CGROUP_ROOT}/{dead}/w0", cgroups.Limits(memory_bytes=64 * MIB))
    kept = hierarchy.create(f"{CGROUP_ROOT}/{alive}/w0", cgroups.Limits())
    try:
        LocalBackend("redis://unused", "pool-sweep", tmp_path / "logs", enforce=True)
        assert not any(folder.exists() for folder in stale.folders.values())
        assert all(folder.exists() for folder in kept.folders.values())
    finally:
        kept.remove()
        hierarchy.create(f"{CGROUP_ROOT}/{alive}", cgroups.Limits()).remove()
