"""The per-task overhead learnt from what workers measured, the timing model charging it, and
tiny tasks packed where an invocation of their own costs more than they do."""

from __future__ import annotations

import pytest

import dagkube
from dagkube.metrics.history import overhead_samples
from dagkube.planning import PlanningOptions, plan
from dagkube.planning.assembly import simulate_plan
from dagkube.planning.estimates import SharedEstimates
from dagkube.planning.history import HistorySnapshot, OverheadSample, StartupSample, TaskSample
from dagkube.planning.planners import Packing, assign_workers
from dagkube.planning.predictions import Defaults, Predictor
from dagkube.planning.timing import simulate
from dagkube.store.records import TaskRecord, WorkerRecord


def record(task_id: str, worker: str, ready: float, pre: float, exec_s: float, **extra):
    """A task that became ready at ``ready``, started ``pre`` later (plus its download)."""
    download = extra.pop("download_s", 0.0)
    started = ready + download + pre
    return TaskRecord(
        run_id="r",
        task_id=task_id,
        function="f",
        worker_id=worker,
        memory_mib=1024,
        ready_at=ready,
        inputs_ready_at=ready + download,
        started_at=started,
        ended_at=started + exec_s,
        download_s=download,
        **extra,
    )


def invocation(worker: str, ready: float, finished: float, queued: float) -> WorkerRecord:
    return WorkerRecord(
        run_id="r",
        worker_id=worker,
        memory_mib=1024,
        cold=False,
        queued_at=queued,
        ready_at=ready,
        finished_at=finished,
    )


def test_gaps_between_a_workers_tasks_are_sampled_by_kind():
    # One worker: two tasks in its first invocation, a third in the one it took next (queued
    # before the first finished), a fourth in an invocation queued after it had gone idle.
    a = record("a", "w", 10.000, 0.001, 0.100, upload_s=0.002)  # ends 10.101, uploaded 10.103
    b = record("b", "w", 10.104, 0.001, 0.100, download_s=0.005)  # post: 1 ms
    c = record("c", "w", 10.213, 0.001, 0.100)  # b ends 10.210: handover 3 ms
    d = record("d", "w", 12.000, 0.001, 0.100)  # idle before: no sample
    e = record("e", "w", 12.110, 0.001, 0.100, blocked_s=0.5)  # waited for its input: none
    workers = [
        invocation("w", 10.000, 10.211, queued=9.9),
        invocation("w", 10.212, 10.320, queued=10.0),
        invocation("w", 12.000, 12.300, queued=11.5),
    ]
    found = overhead_samples([a, b, c, d, e], workers)
    by_kind: dict[str, list[float]] = {}
    for sample in found:
        by_kind.setdefault(sample.kind, []).append(sample.seconds)
    assert by_kind["pre"] == pytest.approx([0.001] * 5)
    assert by_kind["post"] == pytest.approx([0.001])
    assert by_kind["handover"] == pytest.approx([0.003])
    assert not any(sample.bound for sample in found)
    # The same on a bound worker: every sample says so.
    bound = [t.model_copy(update={"logical_worker": "w1"}) for t in (a, b, c, d, e)]
    assert all(sample.bound for sample in overhead_samples(bound, workers))


def test_a_bound_workers_gap_after_an_overlapped_upload_is_sampled_from_the_execution_end():
    """A bound worker starts its next task while the last one's COMPLETE (and upload) is under
    way: the "post" then runs from the end of execution; the upload is not in it."""
    a = record("a", "w", 10.000, 0.001, 0.100, upload_s=0.015, logical_worker="w1")  # ends 10.101
    b = record("b", "w", 10.102, 0.001, 0.100, logical_worker="w1")  # ready during a's upload
    c = record("c", "w", 10.204, 0.001, 0.100, logical_worker="w1")  # b ends 10.203
    workers = [invocation("w", 10.000, 10.400, queued=9.9)]
    posts = [s.seconds for s in overhead_samples([a, b, c], workers) if s.kind == "post"]
    assert posts == pytest.approx([0.001, 0.001])
    # a flexible worker does not overlap: a gap below the upload is not a sample
    flexible = [t.model_copy(update={"logical_worker": None}) for t in (a, b, c)]
    posts = [s.seconds for s in overhead_samples(flexible, workers) if s.kind == "post"]
    assert posts == pytest.approx([0.001])


def snapshot(pre: list[float], post: list[float], handover: list[float], memory: int = 1024):
    samples = [OverheadSample(memory, "pre", s) for s in pre]
    samples += [OverheadSample(memory, "post", s) for s in post]
    samples += [OverheadSample(memory, "handover", s) for s in handover]
    tasks = [TaskSample("f", memory, 10, 10, 0.01)] * 5
    startups = [StartupSample(memory, True, 0.3)] * 3 + [StartupSample(memory, False, 0.002)] * 3
    return HistorySnapshot("h", 5, tasks, startups, overheads=samples)


def test_the_predictor_learns_the_task_overhead_and_the_handover():
    # Medians: the few unusual samples (a fan-in's, a run that went badly) do not count.
    predictor = Predictor(
        snapshot([0.001] * 9 + [0.5], [0.002] * 4 + [0.050], [0.005] * 4 + [0.9]),
        cpu_enforced=True,
    )
    assert predictor.task_overhead_s(1024) == pytest.approx(0.001 + 0.002)
    assert predictor.handover_s(1024) == pytest.approx(0.005 - 0.002)
    # Borrowed by a class with half the CPU (enforced): twice as long.
    assert predictor.task_overhead_s(512) == pytest.approx(2 * 0.003)
    # Too few samples of a kind count as none; no samples at all: the default.
    few = Predictor(snapshot([0.001] * 5, [0.002] * 4, []), cpu_enforced=True)
    assert few.task_overhead_s(1024) == pytest.approx(0.001)
    assert few.handover_s(1024) == 0.0
    none = Predictor(HistorySnapshot(), cpu_enforced=True)
    assert none.task_overhead_s(1024) == Defaults().task_overhead_s


def test_bound_and_flexible_workers_overheads_are_learnt_apart():
    # A flexible worker claims each task itself; a bound one's claim rides on the last
    # completion: pooled, the plans of one mode were charged the other's overhead.
    pooled = snapshot([0.001] * 5, [0.002] * 5, [0.004] * 5)
    bound = [OverheadSample(1024, "pre", 0.0001, bound=True)] * 6
    bound += [OverheadSample(1024, "post", 0.0005, bound=True)] * 6
    predictor = Predictor(
        HistorySnapshot("h", 5, pooled.tasks, pooled.startups, overheads=pooled.overheads + bound),
        cpu_enforced=True,
    )
    assert predictor.task_overhead_s(1024, bound=True) == pytest.approx(0.0001 + 0.0005)
    assert predictor.task_overhead_s(1024) == pytest.approx(0.001 + 0.002)
    # A mode without enough samples of a kind learns it from every sample of the kind.
    assert predictor.handover_s(1024, bound=True) == pytest.approx(0.004 - 0.0005)


@dagkube.task
def source():
    return 1


@dagkube.task
def tiny(x, i):
    return x + i


@dagkube.task
def heavy(x):
    return x


@dagkube.task
def total(values):
    return sum(values)


def test_the_timing_model_charges_the_learnt_overheads():
    root = source()
    wf = dagkube.Workflow(total([tiny(root, i) for i in range(20)]), "fan")
    memory = dict.fromkeys(wf.dag.tasks, 1024)
    flexible = dict.fromkeys(wf.dag.tasks)

    def makespan(overheads: HistorySnapshot) -> float:
        predictor = Predictor(overheads, cpu_enforced=True)
        return simulate(wf.dag, memory, flexible, predictor, max_workers=1).makespan_s

    cheap = makespan(snapshot([0.0] * 5, [0.0] * 5, [0.0] * 5))
    # One worker runs all 22 tasks: each pays the task overhead; 19 children are queued and
    # taken after a handover (the first continues on the source's worker, the sink on the
    # last child's).
    dear = makespan(snapshot([0.001] * 5, [0.002] * 5, [0.012] * 5))
    assert dear - cheap == pytest.approx(22 * 0.003 + 19 * 0.010)


def test_tiny_children_are_packed_into_as_many_workers_as_the_cap_runs():
    root = source()
    wf = dagkube.Workflow(total([tiny(root, i) for i in range(12)] + [heavy(root)]), "mixed")
    exec_s = dict.fromkeys(wf.dag.tasks, 0.001)
    exec_s["heavy#0"] = 1.0
    out = dict.fromkeys(wf.dag.tasks, 10)
    packing = Packing(workers=3, tiny_s=0.01)
    worker_of = assign_workers(wf.dag, exec_s, out, 2, lambda n: n / 1e8, False, packing)
    home = worker_of["source#0"]
    assert worker_of["heavy#0"] == home  # the long child continues on the upstream's worker
    groups = [worker_of[f"tiny#{i}"] for i in range(12)]
    assert home not in groups
    # The upstream's worker goes on with the heavy child: the tiny ones fill the cap's other
    # two (three groups of them would make one wait for a worker, as it did on a fan-out).
    assert sorted(groups.count(w) for w in set(groups)) == [6, 6]
    # A child just above the tiny limit leaves room on its worker: the tiny ones share it.
    exec_s["heavy#0"] = 0.003
    worker_of = assign_workers(wf.dag, exec_s, out, 2, lambda n: n / 1e8, False, packing)
    groups = [worker_of[f"tiny#{i}"] for i in range(12)]
    assert worker_of["heavy#0"] == worker_of["source#0"]
    assert len(set(groups)) == 3 and groups.count(worker_of["heavy#0"]) == 2  # 3 + 2 ms
    assert sorted(groups.count(w) for w in set(groups)) == [2, 5, 5]
    exec_s["heavy#0"] = 1.0
    # Each packed task's overhead counts in the balance: a child 3 ms long next to no-ops
    # costing 1 ms each besides their execution takes about three fewer of them.
    exec_s["heavy#0"] = 0.003
    worker_of = assign_workers(
        wf.dag, exec_s, out, 2, lambda n: n / 1e8, False, Packing(3, 0.01, task_s=0.001)
    )
    groups = [worker_of[f"tiny#{i}"] for i in range(12)]
    assert sorted(groups.count(w) for w in set(groups)) == [3, 4, 5]
    assert groups.count(worker_of["heavy#0"]) == 3
    exec_s["heavy#0"] = 1.0
    # Without a cap, or above the tiny limit, they are grouped cluster_size to a worker.
    for unpacked in (
        assign_workers(wf.dag, exec_s, out, 2, lambda n: n / 1e8),
        assign_workers(wf.dag, exec_s, out, 2, lambda n: n / 1e8, False, Packing(3, 0.0005)),
    ):
        assert len({unpacked[f"tiny#{i}"] for i in range(12)}) == 6
    # With every child tiny, the upstream's worker takes the first group.
    exec_s["heavy#0"] = 0.001
    worker_of = assign_workers(wf.dag, exec_s, out, 2, lambda n: n / 1e8, False, packing)
    groups = [worker_of[t] for t in wf.dag.tasks if t.startswith(("tiny", "heavy"))]
    assert sorted(groups.count(w) for w in set(groups)) == [4, 4, 5]
    assert worker_of["source#0"] in groups


@dagkube.task
def produce(i):
    return i


def test_children_whose_upload_a_bound_worker_hides_are_packed_too():
    # 12 producers of 6 ms feeding one sum: longer than an invocation (3 ms), so grouped
    # cluster_size to a worker, but each uploads for 8 ms, which a bound worker overlaps with
    # the next producer and a worker of its own waits for: counted, they are tiny.
    wf = dagkube.Workflow(total([produce(i) for i in range(12)]), "fanin")
    exec_s = dict.fromkeys(wf.dag.tasks, 0.006)
    out = dict.fromkeys(wf.dag.tasks, 16 * 2**20)
    producers = [t for t in wf.dag.tasks if t.startswith("produce")]
    plain = assign_workers(wf.dag, exec_s, out, 4, lambda n: n / 2e9, False, Packing(2, 0.003))
    assert len({plain[t] for t in producers}) == 4  # a leader, then 11 by cluster_size
    hidden = Packing(2, 0.003, hidden_s=dict.fromkeys(producers, 0.008))
    packed = assign_workers(wf.dag, exec_s, out, 4, lambda n: n / 2e9, False, hidden)
    groups = [packed[t] for t in producers]
    assert sorted(groups.count(w) for w in set(groups)) == [6, 6]
    # An upload that is not hidden (none given for the task) leaves it as it was.
    partial = Packing(2, 0.003, hidden_s={producers[0]: 0.008})
    assert assign_workers(wf.dag, exec_s, out, 4, lambda n: n / 2e9, False, partial) == plain


def test_uniform_packs_uploading_producers_when_the_timing_model_says_so():
    wf = dagkube.Workflow(total([produce(i) for i in range(12)]), "fanin")
    mib16 = 16 * 2**20
    tasks = [
        TaskSample("produce", 1024, 0, mib16, 0.006, task_id=t, upload_bytes=mib16, upload_s=0.008)
        for t in wf.dag.tasks
        if t.startswith("produce")
    ] * 3
    tasks += [TaskSample("total", 1024, 12 * mib16, mib16, 0.05, task_id="total#0")] * 3
    startups = [StartupSample(1024, True, 1.0)] * 3 + [StartupSample(1024, False, 0.002)] * 3
    overheads = [OverheadSample(1024, "pre", 0.0005)] * 5 + [
        OverheadSample(1024, "handover", 0.001)
    ] * 5
    history = HistorySnapshot("h", 3, tasks, startups, overheads=overheads)
    options = PlanningOptions.for_run(["1Gi"], history=history, max_workers=2, warm_pool={1024: 2})
    result = plan(wf.dag, "uniform", options)
    note = next(n for n in result.notes if "uploads overlap the next task packed" in n)
    assert note.endswith(": kept"), note
    assert len({t.worker_id for t in result.tasks.values()}) == 2
    # Without the uploads counted, the producers take more workers, predicted slower.
    shared = SharedEstimates(wf.dag, options.predictor(), 1024)
    sizes = shared.at_class(1024)
    predictor = shared.predictor
    packing = Packing(
        2,
        predictor.startup_s(1024, False) + predictor.handover_s(1024),
        predictor.task_overhead_s(1024, bound=True),
    )
    plain = assign_workers(
        wf.dag, sizes.exec_s, sizes.out_bytes, 4, predictor.download_s, False, packing, False
    )
    assert len(set(plain.values())) > 2
    memory = dict.fromkeys(wf.dag.tasks, 1024)
    slower = simulate_plan(shared, memory, plain, options).makespan_s
    assert result.model_makespan_s is not None and result.model_makespan_s < slower


def test_auto_tries_uniform_on_the_class_whose_workers_are_warm():
    root = source()
    wf = dagkube.Workflow(total([tiny(root, i) for i in range(40)]), "fan")
    tasks = [
        TaskSample(function, m, 10, 10, 0.0005, task_id=t)
        for t, function in [(t, t.split("#")[0]) for t in wf.dag.tasks]
        for m in (512, 1024, 2048)
    ] * 3
    startups = [StartupSample(m, True, 2.0) for m in (512, 1024, 2048)] * 3
    startups += [StartupSample(m, False, 0.002) for m in (512, 1024, 2048)] * 3
    overheads = [OverheadSample(1024, "pre", 0.0005)] * 5 + [
        OverheadSample(1024, "handover", 0.002)
    ] * 5
    options = PlanningOptions.for_run(
        ["512Mi", "1Gi", "2Gi"],
        history=HistorySnapshot("h", 3, tasks, startups, overheads=overheads),
        max_workers=2,
        warm_pool={1024: 2},
    )
    result = plan(wf.dag, "auto", options)
    labels = [a.label for a in result.alternatives]
    assert "uniform@1024Mi" in labels, labels
    # The largest class would start cold (2 s): the warm class's packed plan wins.
    assert result.chosen_planner() == "uniform"
    assert {t.memory_mib for t in result.tasks.values()} == {1024}
    assert len({t.worker_id for t in result.tasks.values()}) == 2


def test_the_warm_class_plan_is_evaluated_when_the_budget_allows_nothing_else():
    """A 1,000-task fan-out of tiny tasks predicted to run in well under a second: auto's
    planning budget (a share of that) allows no candidate past the two plain plans, but the
    plan on the workers alive is a plain plan too (left out, the run went to wukong)."""
    root = source()
    wf = dagkube.Workflow(total([tiny(root, i) for i in range(1000)]), "fan")
    tasks = [
        TaskSample(t.split("#")[0], m, 10, 10, 0.0001, task_id=t, upload_bytes=10, upload_s=5e-5)
        for t in wf.dag.tasks
        for m in (1024, 2048)
    ] * 3
    startups = [StartupSample(m, True, 2.0) for m in (1024, 2048)] * 3
    startups += [StartupSample(m, False, 0.0002) for m in (1024, 2048)] * 3
    overheads = [OverheadSample(1024, "pre", 0.0001)] * 5
    overheads += [OverheadSample(1024, "handover", 0.0002)] * 5
    options = PlanningOptions.for_run(
        ["1Gi", "2Gi"],
        history=HistorySnapshot("h", 3, tasks, startups, overheads=overheads),
        max_workers=2,
        warm_pool={1024: 2},
    )
    result = plan(wf.dag, "auto", options)
    assert any("planning time" in note for note in result.notes), result.notes
    assert "uniform@1024Mi" in [a.label for a in result.alternatives]
    assert result.chosen_planner() == "uniform"
    assert {t.memory_mib for t in result.tasks.values()} == {1024}


def test_a_runs_overheads_are_thinned_evenly_per_class_kind_and_mode():
    from dagkube.metrics.history import OVERHEAD_SAMPLES_PER_RUN, _thinned

    many = [OverheadSample(1024, "pre", k / 1000, bound=True) for k in range(1000)]
    few = [OverheadSample(1024, "post", 0.001, bound=True)] * 7
    kept = _thinned(many + few + [OverheadSample(512, "pre", 0.003)])
    pre = [o.seconds for o in kept if o.kind == "pre" and o.memory_mib == 1024]
    assert len(pre) == OVERHEAD_SAMPLES_PER_RUN == 100
    assert pre[0] == 0.0 and pre[-1] == 0.99  # spread over the run, not its first ones
    assert sum(1 for o in kept if o.kind == "post") == 7
    assert [o.seconds for o in kept if o.memory_mib == 512] == [0.003]


@pytest.mark.parametrize(("exec_s", "packed"), [(0.03, True), (0.1, False)])
def test_uniform_packs_short_independent_tasks_where_their_invocations_cost_a_tenth(exec_s, packed):
    """40 independent tasks (RNA-seq's shape) on a cap of 2: an invocation of its own costs
    a warm start and a handover, 3 ms, a tenth of a 30 ms task: tried packed into the cap's
    two workers, and kept, as predicted faster. A 100 ms task's invocation costs 3% of it:
    the placement is the plain one, nothing is tried."""
    wf = dagkube.Workflow([produce(i) for i in range(40)], "bag")
    tasks = [TaskSample("produce", 1024, 0, 10, exec_s, task_id=t) for t in wf.dag.tasks] * 3
    startups = [StartupSample(1024, True, 1.0)] * 3 + [StartupSample(1024, False, 0.002)] * 3
    overheads = [OverheadSample(1024, "pre", 0.0005)] * 5
    overheads += [OverheadSample(1024, "handover", 0.001)] * 5
    history = HistorySnapshot("h", 3, tasks, startups, overheads=overheads)
    options = PlanningOptions.for_run(["1Gi"], history=history, max_workers=2, warm_pool={1024: 2})
    result = plan(wf.dag, "uniform", options)
    notes = [n for n in result.notes if n.startswith("short tasks packed")]
    workers = {t.worker_id for t in result.tasks.values()}
    if packed:
        assert len(notes) == 1 and notes[0].endswith(": kept"), result.notes
        assert len(workers) == 2
    else:
        assert not notes, result.notes
        assert len(workers) > 2
