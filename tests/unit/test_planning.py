"""Predictions, the timing model and the planners, on synthetic histories with known numbers."""

from __future__ import annotations

import itertools
from dataclasses import replace

import pytest

import dagkube
from dagkube.errors import InvalidOption
from dagkube.planning import PlanningOptions, plan
from dagkube.planning.history import HistorySnapshot, Residual, StartupSample, TaskSample
from dagkube.planning.model import Plan
from dagkube.planning.planners import Packing, assign_workers
from dagkube.planning.predictions import Defaults, Predictor, statistic
from dagkube.planning.timing import simulate
from dagkube.planning.validation import validate_plan
from dagkube.runtime.launcher import initial_invocations

COLD, WARM = 0.3, 0.01
TASK_OVERHEAD_S = Defaults().task_overhead_s  # no overhead samples in these histories


def history(
    durations: dict[str, float | list[float]], memory: int = 2048, output: int = 100, runs: int = 5
) -> HistorySnapshot:
    """Samples of each function at one class, and fixed cold/warm start-ups."""
    tasks = []
    for function, value in durations.items():
        values = value if isinstance(value, list) else [value] * runs
        tasks += [TaskSample(function, memory, 100, output, v) for v in values]
    startups = [StartupSample(memory, True, COLD)] * 3 + [StartupSample(memory, False, WARM)] * 3
    return HistorySnapshot("h", runs, tasks, startups)


@dagkube.task
def prep():
    return 1


@dagkube.task
def work(x, i):
    return x


@dagkube.task
def long_work(x):
    return x


@dagkube.task
def join(values):
    return values


@dagkube.task
def step(x):
    return x


def fan(width: int = 4):
    source = prep()
    return dagkube.Workflow(join([work(source, i) for i in range(width)]), name="fan")


# ---------------------------------------------------------------------- predictions
def test_statistic_mean_and_percentiles():
    values = [1.0, 2.0, 3.0, 4.0, 10.0]
    assert statistic(values, None) == 4.0
    assert statistic(values, 50) == 3.0
    assert statistic(values, 90) == pytest.approx(7.6)


def test_sla_percentile_is_more_conservative_than_the_mean():
    snapshot = history({"work": [1.0, 1.0, 1.1, 1.2, 3.0]})
    avg = Predictor(snapshot, "avg").exec_s("work", 100, 2048)
    p90 = Predictor(snapshot, "p90").exec_s("work", 100, 2048)
    p99 = Predictor(snapshot, "p99").exec_s("work", 100, 2048)
    assert avg == pytest.approx(1.46)
    assert avg < p90 < p99 <= 3.0


def test_constant_time_tasks_do_not_scale_with_input():
    tasks = [TaskSample("sleepy", 1024, size, 10, 0.5) for size in (10, 1_000, 100_000, 10**7)]
    predictor = Predictor(HistorySnapshot("h", 4, tasks))
    assert predictor.exec_s("sleepy", 10**9, 1024) == pytest.approx(0.5)


def test_input_proportional_tasks_scale():
    tasks = [TaskSample("scan", 1024, size, size, size / 1e8) for size in (10**5, 10**6, 10**7)]
    predictor = Predictor(HistorySnapshot("h", 3, tasks))
    assert predictor.exec_s("scan", 10**8, 1024) == pytest.approx(1.0, rel=0.05)
    assert predictor.output_bytes("scan", 10**8) == pytest.approx(10**8, rel=0.05)


def test_unsampled_class_is_scaled_by_cpu():
    snapshot = history({"work": 1.0}, memory=1024)
    predictor = Predictor(snapshot)
    assert predictor.exec_s("work", 100, 512) == pytest.approx(2.0)  # half the CPU
    # A 2 GiB worker has 1.14 cores, but a task's one thread uses one: 1/0.571, not 2x.
    assert predictor.exec_s("work", 100, 2048) == pytest.approx(1024 / 1792)
    # Local workers are not CPU-limited: without evidence, no scaling.
    assert Predictor(snapshot, cpu_enforced=False).exec_s("work", 100, 512) == 1.0
    # Two sampled classes with no slowdown: alpha is fitted to 0, no scaling.
    flat = HistorySnapshot("h", 2, [TaskSample("work", m, 100, 1, 1.0) for m in (1024, 2048)] * 3)
    assert Predictor(flat).exec_s("work", 100, 512) == pytest.approx(1.0)


def test_defaults_without_history_are_recorded():
    predictor = Predictor(HistorySnapshot())
    assert predictor.exec_s("anything", 10, 1024) == predictor.defaults.exec_s
    assert predictor.startup_s(1024, True) == predictor.defaults.cold_start_s
    assert {"execution time", "cold start-up"} <= predictor.used_defaults


# ---------------------------------------------------------------------- timing model
def test_chain_on_a_flexible_worker():
    a = step(step(step(1)))
    wf = dagkube.Workflow(a, name="chain")
    predictor = Predictor(history({"step": 1.0}))
    timing = simulate(
        wf.dag, dict.fromkeys(wf.dag.tasks, 2048), dict.fromkeys(wf.dag.tasks), predictor
    )
    assert timing.makespan_s == pytest.approx(COLD + 3 * (1.0 + TASK_OVERHEAD_S), abs=1e-3)
    assert timing.critical_path == ["step#0", "step#1", "step#2"]
    assert len(timing.activities) == 1 and timing.activities[0].cold
    assert timing.gb_s == pytest.approx(timing.makespan_s * 2, rel=1e-6)


@pytest.mark.parametrize(("output", "overlapped"), [(4_000_000, True), (200_000_000, False)])
def test_a_bound_worker_runs_its_next_task_during_an_upload_it_may_overlap(output, overlapped):
    """As the runtime does (rules.overlaps_step): the next ready task starts when the last
    one's execution ends, not after its upload, unless the output is over 1/16 of the
    worker's memory (2 GiB here); the upload still decides when its consumer is ready."""
    wf = fan(3)
    predictor = Predictor(history({"prep": 0.1, "work": 0.5, "join": 0.1}, output=output))
    worker_of = {t: ("w2" if t.startswith("join") else "w1") for t in wf.dag.tasks}
    timing = simulate(wf.dag, dict.fromkeys(wf.dag.tasks, 2048), worker_of, predictor)
    first, second, last = (timing.tasks[f"work#{i}"] for i in range(3))
    assert first.upload_s > 0.01 and second.upload_s > 0.01  # each stored: join is elsewhere
    assert second.start_s == pytest.approx(first.end_s if overlapped else first.complete_s)
    assert last.start_s == pytest.approx(second.end_s if overlapped else second.complete_s)
    assert timing.tasks["join#0"].start_s >= last.complete_s


def test_worker_cap_queues_invocations_and_later_starts_are_warm():
    wf = fan(4)
    predictor = Predictor(history({"prep": 0.1, "work": 1.0, "join": 0.1}))
    memory = dict.fromkeys(wf.dag.tasks, 2048)
    flexible = dict.fromkeys(wf.dag.tasks)
    capped = simulate(wf.dag, memory, flexible, predictor, max_workers=2)
    unbounded = simulate(wf.dag, memory, flexible, predictor)
    # Two rounds of work on two workers (the second taken at once by a finishing worker),
    # against one round with a worker each.
    assert capped.makespan_s == pytest.approx(unbounded.makespan_s + 1.0, abs=0.01)
    assert sum(a.cold for a in capped.activities) == 2
    assert sum(a.cold for a in unbounded.activities) == 4
    warm = simulate(wf.dag, memory, flexible, predictor, max_workers=2, warm_pool={2048: 2})
    assert sum(a.cold for a in warm.activities) == 0
    # Both cold starts were on the critical path (the first worker's, then the second's).
    assert warm.makespan_s == pytest.approx(capped.makespan_s - 2 * (COLD - WARM), abs=0.01)


def test_sources_start_the_longest_path_first_where_predicted_faster():
    """More sources than workers: the long task, last in the DAG's order, starts first (list
    scheduling by the path ahead) as the model predicts that faster, and the runtime queues
    the first invocations in the order of the predicted starts, as the model did. (uniform
    packs these sources on two workers, where the order cannot matter.)"""
    planner = "wukong"
    wf = dagkube.Workflow(join([step(i) for i in range(4)] + [long_work(9)]), name="bag")
    durations = {"step": 0.5, "long_work": 2.0, "join": 0.1}
    options = PlanningOptions(classes_mib=[2048], history=history(durations), max_workers=2)
    planned = plan(wf.dag, planner, options)
    assert planned.longest_first
    assert any(n.startswith("sources: the longest path first: ") for n in planned.notes)
    starts = {t: planned.tasks[t].predicted_start_s for t in wf.dag.sources}
    assert starts["long_work#0"] == min(starts.values())
    # 2.0 s alongside four 0.5 s steps on the other worker, not after two rounds of them.
    assert planned.model_makespan_s < 2.0 + 0.1 + COLD + 0.3
    invocations = initial_invocations(wf.dag, planned, "r", 0.0)
    queued = [root for invocation in invocations for root in invocation.roots]
    assert queued == ["long_work#0", *(f"step#{i}" for i in range(4))]
    assert [starts[t] for t in queued] == sorted(starts[t] for t in queued)
    # Without a worker cap every source starts at once: the DAG's order, not tried.
    uncapped = plan(wf.dag, planner, replace(options, max_workers=None))
    assert not uncapped.longest_first
    invocations = initial_invocations(wf.dag, uncapped, "r", 0.0)
    assert [root for invocation in invocations for root in invocation.roots] == wf.dag.sources


def test_sources_stay_in_the_dags_order_where_the_longest_first_is_not_faster():
    """Like sources of one length but one predicted a little longer: the DAG's order is kept
    when the model predicts no gain from queueing it first."""
    wf = dagkube.Workflow(join([step(i) for i in range(3)] + [long_work(9)]), name="even")
    durations = {"step": 0.5, "long_work": 0.5 + 1e-4, "join": 0.1}
    options = PlanningOptions(classes_mib=[2048], history=history(durations), max_workers=2)
    planned = plan(wf.dag, "wukong", options)
    assert not planned.longest_first
    assert any(
        n.startswith("sources: in the DAG's order (the longest path first: ") for n in planned.notes
    )
    queued = [i.roots[0] for i in initial_invocations(wf.dag, planned, "r", 0.0)]
    assert queued == wf.dag.sources


def test_idle_timeout_makes_the_next_start_cold():
    wf = dagkube.Workflow(join([long_work(prep()), step(prep())]), name="idle")
    predictor = Predictor(history({"prep": 0.1, "long_work": 5.0, "step": 0.1, "join": 0.1}))
    memory = dict.fromkeys(wf.dag.tasks, 2048)
    flexible = dict.fromkeys(wf.dag.tasks)
    kept = simulate(wf.dag, memory, flexible, predictor, idle_timeout_s=30)
    expired = simulate(wf.dag, memory, flexible, predictor, idle_timeout_s=1)
    assert sum(a.cold for a in kept.activities) == 2
    assert sum(a.cold for a in expired.activities) == 2  # no idle worker was needed later
    assert expired.gb_s < kept.gb_s + 1e-9


def test_bound_worker_waits_allocated_and_cap_ignores_waiting_workers():
    wf = fan(2)
    predictor = Predictor(history({"prep": 0.1, "work": 1.0, "join": 0.1}))
    memory = dict.fromkeys(wf.dag.tasks, 2048)
    worker_of = {"prep#0": "a", "work#0": "a", "work#1": "b", "join#0": "a"}
    timing = simulate(wf.dag, memory, worker_of, predictor, max_workers=2)
    assert {a.logical_id for a in timing.activities} == {"a", "b"}
    assert timing.tasks["join#0"].start_s >= timing.tasks["work#1"].complete_s
    # With a cap of one, "a" waits for "b"'s output without holding the only slot.
    single = simulate(wf.dag, memory, worker_of, predictor, max_workers=1)
    assert single.makespan_s > timing.makespan_s


# ---------------------------------------------------------------------- planners
def test_uniform_assignment_clusters_short_children_and_isolates_long_ones():
    source = prep()
    children = [work(source, i) for i in range(6)] + [long_work(source) for _ in range(2)]
    wf = dagkube.Workflow(join(children), name="mixed")
    exec_s = {t: 0.1 for t in wf.dag.tasks}
    exec_s.update({"long_work#0": 5.0, "long_work#1": 5.0})
    out = dict.fromkeys(wf.dag.tasks, 10)
    worker_of = assign_workers(wf.dag, exec_s, out, 4, lambda n: n / 1e8)
    home = worker_of["prep#0"]
    # The critical child continues on the upstream's worker, the other long one alone.
    assert worker_of["long_work#0"] == home
    assert worker_of["long_work#1"] not in (home, *[worker_of[f"work#{i}"] for i in range(6)])
    shorts = [worker_of[f"work#{i}"] for i in range(6)]
    assert home not in shorts
    assert sorted(shorts.count(w) for w in set(shorts)) == [2, 4]  # clusters of 4, then 2
    # The fan-in follows its critical-path upstream.
    assert worker_of["join#0"] == home


def test_fan_in_goes_to_the_worker_holding_most_input_bytes():
    source = prep()
    a, b = work(source, 0), long_work(source)
    wf = dagkube.Workflow(join([a, b]), name="bytes")
    exec_s = {"prep#0": 0.1, "work#0": 0.1, "long_work#0": 0.2, "join#0": 0.1}
    out = {"prep#0": 1, "work#0": 10**8, "long_work#0": 10, "join#0": 1}
    worker_of = assign_workers(wf.dag, exec_s, out, 1, lambda n: n / 1e8)
    assert worker_of["join#0"] == worker_of["work#0"] != worker_of["long_work#0"]


@dagkube.task
def align(index, reads, i):
    return i


def aligned(width: int):
    """A stage whose every task reads one shared input and another (BWA: an index built once,
    the reads), then a merge."""
    index, reads = long_work(prep()), step(prep())
    return dagkube.Workflow(join([align(index, reads, i) for i in range(width)]), name="bwa")


def test_fan_ins_of_one_critical_upstream_are_spread_like_its_fan_out():
    wf = aligned(12)
    exec_s = dict.fromkeys(wf.dag.tasks, 0.1)
    exec_s["long_work#0"] = 2.0
    exec_s.update({f"align#{i}": 0.5 + 0.1 * i for i in range(12)})
    out = dict.fromkeys(wf.dag.tasks, 10)
    worker_of = assign_workers(wf.dag, exec_s, out, 4, lambda n: n / 1e8)
    home = worker_of["long_work#0"]
    stage = [worker_of[f"align#{i}"] for i in range(12)]
    # The longest follows the index's worker; the others are grouped (short ones, 4 to a
    # worker) or alone (long ones) as any fan-out's children are: not 12 in a row on `home`.
    assert worker_of["align#11"] == home
    assert stage.count(home) == 1
    assert sorted(stage.count(w) for w in set(stage) - {home}) == [1, 1, 1, 1, 1, 2, 4]
    assert worker_of["join#0"] == home  # the merge follows its critical upstream
    predictor = Predictor(history({"prep": 0.1, "long_work": 2.0, "step": 0.1, "join": 0.1}))
    memory = dict.fromkeys(wf.dag.tasks, 2048)
    spread = simulate(wf.dag, memory, worker_of, predictor, max_workers=4).makespan_s
    queued = {t: (home if t.startswith("align") else w) for t, w in worker_of.items()}
    assert spread < simulate(wf.dag, memory, queued, predictor, max_workers=4).makespan_s
    # A single fan-in of that upstream still just follows it.
    one = aligned(1)
    exec_one = {t: exec_s.get(t, 0.5) for t in one.dag.tasks}
    placed = assign_workers(one.dag, exec_one, dict.fromkeys(one.dag.tasks, 10), 4, lambda n: 0.0)
    assert placed["align#0"] == placed["long_work#0"]


def test_uniform_spreads_fan_ins_of_one_upstream_only_where_predicted_faster():
    wf = aligned(12)
    durations = {"prep": 0.01, "long_work": 2.0, "step": 0.01, "join": 0.01}

    def uniform_plan(align_s: float) -> Plan:
        snapshot = history({**durations, "align": align_s})
        return plan(wf.dag, "uniform", PlanningOptions([2048], history=snapshot, max_workers=4))

    # Half a second each: spread over the 4 workers the cap runs (3 of them new), not in a row.
    slow = uniform_plan(0.5)
    stage = {slow.tasks[f"align#{i}"].worker_id for i in range(12)}
    assert len(stage) == 4
    assert slow.tasks["long_work#0"].worker_id in stage
    assert any("spread" in n and n.endswith(": kept") for n in slow.notes), slow.notes
    # A millisecond each: three more workers would cost more in starts than they save.
    quick = uniform_plan(0.001)
    assert {quick.tasks[f"align#{i}"].worker_id for i in range(12)} == {
        quick.tasks["long_work#0"].worker_id
    }
    assert any("spread" in n and n.endswith("not kept") for n in quick.notes), quick.notes


def test_a_spread_stage_balances_without_the_merge_that_waits_for_all_of_it():
    # 12 aligns of 0.1 s under a cap of 4, then a 1 s merge of all of them: the merge runs
    # after the whole stage wherever it ran, so the index's worker (which the merge follows)
    # takes as many aligns as the others; loaded with the merge it took one (BWA's shape,
    # where that worker ran its share of the stage 0.7 s after the others were done).
    wf = aligned(12)
    exec_s = dict.fromkeys(wf.dag.tasks, 0.1)
    exec_s.update({"long_work#0": 2.0, "join#0": 1.0})
    out = dict.fromkeys(wf.dag.tasks, 10)
    worker_of = assign_workers(wf.dag, exec_s, out, 4, lambda n: 0.0, False, Packing(4, 0.0))
    home = worker_of["long_work#0"]
    stage = [worker_of[f"align#{i}"] for i in range(12)]
    assert sorted(stage.count(w) for w in set(stage)) == [3, 3, 3, 3]
    assert stage.count(home) == 3 and worker_of["join#0"] == home
    # Merged in pairs, the leader's merge waits for one other align only: what follows the
    # leader still loads its worker, which then takes no more aligns.
    index, reads = long_work(prep()), step(prep())
    aligns = [align(index, reads, i) for i in range(12)]
    pairs = dagkube.Workflow(join([join(aligns[i : i + 2]) for i in range(0, 12, 2)]), "pairs")
    exec_s = dict.fromkeys(pairs.dag.tasks, 0.1)
    exec_s.update({t: 1.0 for t in pairs.dag.tasks if t.startswith("join")})
    exec_s["long_work#0"] = 2.0
    out = dict.fromkeys(pairs.dag.tasks, 10)
    worker_of = assign_workers(pairs.dag, exec_s, out, 4, lambda n: 0.0, False, Packing(4, 0.0))
    stage = [worker_of[f"align#{i}"] for i in range(12)]
    assert stage.count(worker_of["long_work#0"]) == 1  # the leader alone: loaded with 2.1 s


def unequal_branches():
    source = prep()
    critical = long_work(long_work(source))
    shorts = [step(source) for _ in range(4)]
    return dagkube.Workflow(join([critical, *shorts]), name="unequal")


def test_non_uniform_downgrades_off_the_critical_path_without_growing_makespan():
    wf = unequal_branches()
    options = PlanningOptions(
        [512, 1024, 2048],
        history=history({"prep": 0.1, "long_work": 3.0, "step": 0.2, "join": 0.1}),
        cluster_size=1,
    )
    uniform = plan(wf.dag, "uniform", options)
    non_uniform = plan(wf.dag, "non-uniform", options)
    assert uniform.classes_used() == [2048]
    assert min(non_uniform.classes_used()) < 2048
    for task_id, task in non_uniform.tasks.items():
        if task.critical_path:
            assert task.memory_mib == 2048, task_id
    assert non_uniform.predicted_makespan_s <= uniform.predicted_makespan_s * 1.005
    assert non_uniform.predicted_gb_s < uniform.predicted_gb_s


@pytest.mark.parametrize(("base_s", "per_worker_s", "trials"), [(1.0, 0.0, 3), (0.0, 0.5, 5)])
def test_non_uniform_stops_halving_a_round_that_comes_no_closer(
    monkeypatch, base_s, per_worker_s, trials
):
    """A smaller class whose every downgrade costs the same (a cold start of its own: one
    downgraded worker as late as all of them) ends the round after two halvings that took no
    tenth off the time over the limit; a cost that shrinks with fewer downgrades is halved on
    (16 workers off the critical path: 16, 8, 4, 2, 1)."""
    import dagkube.planning.planners as planners

    original = planners.simulate_plan
    trial_makespans: list[float] = []

    def slowed(shared, memory, worker_of, options, *args, **kwargs):
        timing = original(shared, memory, worker_of, options, *args, **kwargs)
        downgraded = {worker_of[t] for t, m in memory.items() if m < 2048}
        if not downgraded:
            return timing
        makespan = timing.makespan_s + base_s + per_worker_s * len(downgraded)
        trial_makespans.append(makespan)
        return replace(timing, makespan_s=makespan)

    monkeypatch.setattr(planners, "simulate_plan", slowed)
    source = prep()
    shorts = [step(source) for _ in range(16)]
    wf = dagkube.Workflow(join([long_work(long_work(source)), *shorts]), name="wide")
    options = PlanningOptions(
        [1024, 2048],
        history=history({"prep": 0.1, "long_work": 3.0, "step": 0.2, "join": 0.1}),
        cluster_size=1,
    )
    planned = plan(wf.dag, "non-uniform", options)
    assert planned.classes_used() == [2048]
    assert len(trial_makespans) == trials
    stopped = any("halvings of the round in a row took less than 10%" in n for n in planned.notes)
    assert stopped == (base_s > 0)


LATE_20 = [0.0] * 6 + [0.2] * 4  # runs 0-20% later than predicted: p90 / median = 1.2


@pytest.mark.parametrize(
    ("step_s", "late", "kept"),
    [
        (2.7, [0.0] * 10, 1024),  # 0.75 s of slack left: more than the 10% floor
        (2.8, [0.0] * 10, 2048),  # 0.57 s: less
        (2.7, LATE_20, 2048),  # less than the 20% the runs came out late by
        (2.8, [], 1024),  # no runs yet: no margin
        (2.8, [0.0] * 2, 1024),
    ],
)
def test_non_uniform_keeps_no_downgrade_with_less_slack_than_runs_came_out_late(step_s, late, kept):
    """The short branches fit in the critical branch's 6.4 s at 1,024 MiB either way (their
    time doubles), but a downgrade must leave as slack what runs came out late by (at least
    10% of the makespan once three runs tell): run to run variation would put them on the
    critical path. A history-less plan (its first runs) keeps the downgrade."""
    wf = unequal_branches()
    snapshot = history({"prep": 0.1, "long_work": 3.0, "step": step_s, "join": 0.1})
    snapshot.residuals = [Residual("non-uniform", "avg", seconds, 1.0) for seconds in late]
    options = PlanningOptions([512, 1024, 2048], history=snapshot, cluster_size=1)
    planned = plan(wf.dag, "non-uniform", options)
    steps = {t.memory_mib for task_id, t in planned.tasks.items() if task_id.startswith("step")}
    assert steps == {kept}
    if kept == 2048:
        margin = "20%" if late is LATE_20 else "10%"
        assert any(
            f"the {margin} of the makespan that runs came out late by" in n for n in planned.notes
        )


def test_plans_carry_predictions_and_provenance():
    wf = fan(3)
    options = PlanningOptions(
        [1024], sla="p95", history=history({"prep": 0.1, "work": 1.0, "join": 0.1}, memory=1024)
    )
    result = plan(wf.dag, "uniform", options)
    assert result.sla == "p95" and result.history_runs == 5
    assert result.history_samples > 0
    assert result.predicted_makespan_s > 1.0 and result.predicted_gb_s > 0
    assert any(t.critical_path for t in result.tasks.values())
    for task in result.tasks.values():
        assert task.predicted_start_s is not None
        assert task.predicted_end_s >= task.predicted_start_s


def test_plans_split_each_task_into_download_execution_and_upload():
    """The parts the report checks separately add up to the task's predicted span, and the
    worker start-ups are the cold and warm samples."""
    wf = fan(3)
    options = PlanningOptions(
        [2048], history=history({"prep": 0.1, "work": 1.0, "join": 0.2}, output=4_000_000)
    )
    result = plan(wf.dag, "wukong", options)
    for task_id, task in result.tasks.items():
        parts = task.predicted_download_s + task.predicted_exec_s + task.predicted_upload_s
        assert task.predicted_end_s - task.predicted_start_s == pytest.approx(
            parts + TASK_OVERHEAD_S, abs=1e-5
        ), task_id
    assert result.tasks["work#1"].predicted_exec_s == pytest.approx(1.0)
    # prep's output goes to three workers: stored; the join downloads the outputs made
    # elsewhere and stores its own (a run output).
    assert result.tasks["prep#0"].predicted_upload_s > 0
    assert result.tasks["join#0"].predicted_download_s > 0
    assert result.tasks["join#0"].predicted_upload_s > 0
    startups = [w.predicted_startup_s for w in result.workers]
    assert startups[0] == pytest.approx(COLD)  # the first worker is spawned for the source
    assert all(s == pytest.approx(COLD) or s == pytest.approx(WARM) for s in startups)


def test_validation_rejects_plans_the_runtime_cannot_run():
    wf = fan(2)
    good = plan(wf.dag, "uniform", PlanningOptions([512, 1024]))
    broken = Plan.model_validate(good.model_dump())
    broken.tasks["work#0"].memory_mib = 768
    with pytest.raises(InvalidOption, match="class 768 MiB is not one of the configured"):
        validate_plan(wf.dag, broken)
    split = Plan.model_validate(good.model_dump())
    split.tasks["work#0"].worker_id = split.tasks["prep#0"].worker_id = "w9"
    split.tasks["work#0"].memory_mib = 512
    split.tasks["prep#0"].memory_mib = 1024
    with pytest.raises(InvalidOption, match="Worker 'w9' has two classes"):
        validate_plan(wf.dag, split)


def test_every_planner_produces_a_valid_plan_without_history():
    wf = unequal_branches()
    for name in ("wukong", "uniform", "non-uniform"):
        result = plan(wf.dag, name, PlanningOptions([512, 2048]))
        validate_plan(wf.dag, result)
        assert any("no history" in note for note in result.notes)


def test_makespan_is_calibrated_by_this_planners_residuals():
    wf = fan(2)
    snapshot = history({"prep": 0.1, "work": 1.0, "join": 0.1})
    raw = plan(wf.dag, "wukong", PlanningOptions([2048], history=snapshot))
    assert raw.predicted_makespan_s == raw.model_makespan_s  # no residuals yet
    snapshot.residuals = [Residual("wukong", "avg", r) for r in (0.01, 0.02, 0.03, 0.10)]
    snapshot.residuals += [Residual("uniform", "avg", 5.0)] * 3  # another planner's: ignored
    avg = plan(wf.dag, "wukong", PlanningOptions([2048], history=snapshot))
    p90 = plan(wf.dag, "wukong", PlanningOptions([2048], sla="p90", history=snapshot))
    assert avg.model_makespan_s == raw.model_makespan_s
    assert avg.predicted_makespan_s == pytest.approx(raw.model_makespan_s + 0.04)
    # until runs at p90 exist, the p90 of the avg runs' residuals (on the safe side)
    assert p90.predicted_makespan_s == pytest.approx(
        p90.model_makespan_s + statistic([0.01, 0.02, 0.03, 0.10], 90)
    )
    snapshot.residuals += [Residual("wukong", "p90", r) for r in (0.0, 0.01, 0.05)]
    p90 = plan(wf.dag, "wukong", PlanningOptions([2048], sla="p90", history=snapshot))
    assert p90.predicted_makespan_s == pytest.approx(
        p90.model_makespan_s + statistic([0.0, 0.01, 0.05], 90)
    )
    assert any("calibrated" in note for note in avg.notes)


def test_a_p90_makespan_is_read_off_enough_avg_runs_as_a_bound_on_their_miss_ratio():
    wf = fan(2)
    snapshot = history({"prep": 0.1, "work": 1.0, "join": 0.1})
    mean_model = plan(wf.dag, "wukong", PlanningOptions([2048], history=snapshot))
    ratios = [0.9, 1.0, 1.05, 1.1, 1.2, 0.95, 1.0, 1.02, 1.3, 0.98, 1.01]
    snapshot.residuals = [Residual("wukong", "avg", r - 1.0, 1.0) for r in ratios[:8]]
    few = plan(wf.dag, "wukong", PlanningOptions([2048], sla="p90", history=snapshot))
    # eight avg runs bound a ninth at most 8/9 < 90% of the time: too few, the p90 of their
    # residuals is added to the p90 model instead (on the safe side)
    assert few.predicted_makespan_s == pytest.approx(
        few.model_makespan_s + statistic([r - 1.0 for r in ratios[:8]], 90)
    )
    snapshot.residuals = [Residual("wukong", "avg", r - 1.0, 1.0) for r in ratios]
    p90 = plan(wf.dag, "wukong", PlanningOptions([2048], sla="p90", history=snapshot))
    # eleven runs: the 11th smallest of 11 (ceil(0.9 * 12) = 11) bounds the next at >= 90%
    assert p90.predicted_makespan_s == pytest.approx(mean_model.model_makespan_s * 1.3, rel=1e-5)
    assert any("bound of 11 earlier avg runs" in note for note in p90.notes)
    # three runs at p90 itself: their residuals calibrate the p90 model as before
    snapshot.residuals += [Residual("wukong", "p90", r, 2.0) for r in (-0.2, -0.1, 0.0)]
    own = plan(wf.dag, "wukong", PlanningOptions([2048], sla="p90", history=snapshot))
    assert own.predicted_makespan_s == pytest.approx(
        own.model_makespan_s + statistic([-0.2, -0.1, 0.0], 90)
    )


def test_upper_bound_is_a_conformal_rank_not_an_interpolated_percentile():
    from dagkube.planning.fitting import upper_bound

    values = [float(v) for v in range(1, 21)]  # 1 .. 20
    assert upper_bound(values, 90) == 19.0  # ceil(0.9 * 21) = 19
    assert statistic(values, 90) == pytest.approx(18.1)
    assert upper_bound(values[:5], 90) == 5.0  # few values: the largest
    with pytest.raises(ValueError, match="no values"):
        upper_bound([], 90)


def test_plan_picture_groups_workers_colors_classes_and_marks_the_critical_path():
    from dagkube.planning.dot import plan_to_dot

    wf = unequal_branches()
    options = PlanningOptions(
        [512, 2048],
        history=history({"prep": 0.1, "long_work": 3.0, "step": 0.2, "join": 0.1}),
        cluster_size=1,
    )
    result = plan(wf.dag, "non-uniform", options)
    text = plan_to_dot(wf.dag, result)
    assert text.startswith("digraph plan {") and text.rstrip().endswith("}")
    workers = {t.worker_id for t in result.tasks.values()}
    assert text.count("subgraph cluster_") == len(workers)
    critical = [t for t, p in result.tasks.items() if p.critical_path]
    for upstream, downstream in itertools.pairwise(critical):
        assert f'"{upstream}" -> "{downstream}" [color="#cb181d"' in text
    assert "512Mi" in text and "2Gi" in text


# ---------------------------------------------------------------------- memory
MIB = 1024 * 1024


def test_peak_memory_is_predicted_from_input_size_at_the_sla():
    # 60 MiB of interpreter plus 2 bytes held per input byte, with some jitter.
    tasks = [
        TaskSample("load", 2048, size, 1, 0.1, peak_memory_bytes=60 * MIB + 2 * size + jitter)
        for size in (10 * MIB, 20 * MIB, 40 * MIB)
        for jitter in (0, 4 * MIB)
    ]
    snapshot = HistorySnapshot("h", 6, tasks)
    mean = Predictor(snapshot).peak_memory_bytes("load", 100 * MIB)
    assert mean == pytest.approx(260 * MIB + 2 * MIB, rel=0.02)
    p99 = Predictor(snapshot, sla="p99").peak_memory_bytes("load", 100 * MIB)
    assert mean < p99 <= 264 * MIB + 1
    # The floor adds the headroom, in whole MiB.
    assert Predictor(snapshot).memory_floor_mib("load", 100 * MIB) == pytest.approx(
        262 * 1.25, abs=1
    )
    # Nothing measured: no floor.
    assert Predictor(HistorySnapshot()).memory_floor_mib("load", 100) == 0


def test_an_oom_kill_puts_the_floor_above_the_class_it_happened_at():
    tasks = [TaskSample("hog", 1024, 100, 1, 0.1, task_id="hog#0", oom_mib=512)]
    assert Predictor(HistorySnapshot("h", 1, tasks)).memory_floor_mib("hog", 100, "hog#0") == 513


def test_planners_keep_every_task_at_or_above_its_memory_floor():
    wf = unequal_branches()
    samples = history({"prep": 0.1, "long_work": 3.0, "step": 0.2, "join": 0.1}).tasks
    # step holds 700 MiB: with headroom it needs the 1024 MiB class at least.
    peaks = [
        TaskSample(
            s.function,
            s.memory_mib,
            s.input_bytes,
            s.output_bytes,
            s.exec_s,
            peak_memory_bytes=(700 if s.function == "step" else 80) * MIB,
        )
        for s in samples
    ]
    snapshot = HistorySnapshot("h", 5, peaks, history({}).startups)
    # Sleeping tasks: no CPU limit slows them on a smaller class (as without enforcement).
    options = PlanningOptions(
        [512, 1024, 2048], history=snapshot, cluster_size=1, cpu_enforced=False
    )
    wukong = plan(wf.dag, "wukong", PlanningOptions([256, 512, 1024, 2048], history=snapshot))
    assert wukong.classes_used() == [1024]  # the middle (512) was too small for step
    assert any("predicted peak memory raised the class to 1024 MiB" in n for n in wukong.notes)
    non_uniform = plan(wf.dag, "non-uniform", options)
    steps = [t for t in non_uniform.tasks if t.startswith("step")]
    # Downgraded from 2048 as far as memory allows: without peaks they would go to 512.
    assert steps and all(non_uniform.tasks[t].memory_mib == 1024 for t in steps)
    unmeasured = plan(
        wf.dag,
        "non-uniform",
        PlanningOptions(
            [512, 1024, 2048],
            history=history({"prep": 0.1, "long_work": 3.0, "step": 0.2, "join": 0.1}),
            cluster_size=1,
            cpu_enforced=False,
        ),
    )
    assert {unmeasured.tasks[t].memory_mib for t in steps} == {512}
    # A task no class can hold is named in the notes.
    small = plan(wf.dag, "uniform", PlanningOptions([256, 512], history=snapshot))
    assert small.classes_used() == [512]
    assert any("more than the largest class (512 MiB)" in n for n in small.notes)


def test_an_unsampled_class_starts_cold_slower_in_proportion_to_its_cpu_where_enforced():
    startups = [StartupSample(2048, True, 0.5)] * 3 + [StartupSample(2048, False, 0.01)] * 3
    snapshot = HistorySnapshot("h", 3, [], startups)
    enforced = Predictor(snapshot)
    # 1 GiB has 0.571 of a core; 2 GiB counts as one core (one thread).
    assert enforced.startup_s(1024, True) == pytest.approx(0.5 / (1024 / 1792))
    assert enforced.startup_s(2048, True) == pytest.approx(0.5)
    assert enforced.startup_s(1024, False) == pytest.approx(0.01)  # a warm start is I/O
    assert Predictor(snapshot, cpu_enforced=False).startup_s(1024, True) == pytest.approx(0.5)


def test_non_uniform_keeps_no_downgrade_that_saves_no_gb_s():
    wf = unequal_branches()
    durations = {"prep": 0.1, "long_work": 3.0, "step": 0.2, "join": 0.1}
    # CPU-bound everywhere (enforced limits): half the CPU, twice the time, so a smaller class
    # costs as many GB-seconds, and starts slower.
    options = PlanningOptions([512, 1024], history=history(durations, memory=1024))
    planned = plan(wf.dag, "non-uniform", options)
    assert planned.classes_used() == [1024]
    assert any(n.startswith("non-uniform: no smaller class pays off here") for n in planned.notes)
    # Without CPU limits a smaller class runs as fast: the same downgrades save GB-s.
    loose = PlanningOptions(
        [512, 1024], history=history(durations, memory=1024), cpu_enforced=False
    )
    assert min(plan(wf.dag, "non-uniform", loose).classes_used()) == 512


def test_planning_runs_without_the_cyclic_collector_and_leaves_it_as_it_found_it(monkeypatch):
    """The collector traversed the whole process dozens of times per 1,000-task plan: it is
    paused while planning (planners and the plan's validation) and restored after."""
    import gc

    import dagkube.planning.choice as choice
    import dagkube.planning.validation as validation

    seen: list[bool] = []
    for module, name in ((choice, "plan_auto"), (validation, "validate_plan")):
        original = getattr(module, name)

        def watched(*args, _original=original, **kwargs):
            seen.append(gc.isenabled())
            return _original(*args, **kwargs)

        monkeypatch.setattr(module, name, watched)
    wf = fan(8)
    try:
        plan(wf.dag, "auto", PlanningOptions([512, 2048]))
        assert seen == [False, False] and gc.isenabled()
        gc.disable()  # the caller's choice is kept
        plan(wf.dag, "auto", PlanningOptions([512, 2048]))
        assert not gc.isenabled()
    finally:
        gc.enable()
