"""Predictions on workloads whose sizes vary run to run: size models with residual-ratio
percentiles, per-task biases, CPU contention on shared cores, transfers per size bucket, and
predicted output sizes. Synthetic histories with known laws, so the right answer is known."""

from __future__ import annotations

import random

import pytest

import dagkube
from dagkube.planning.cores import SharedCores
from dagkube.planning.fitting import fit_size_model, statistic
from dagkube.planning.history import HistorySnapshot, StartupSample, TaskSample
from dagkube.planning.predictions import Predictor
from dagkube.planning.timing import simulate

STARTUPS = [StartupSample(1024, True, 0.3)] * 3 + [StartupSample(1024, False, 0.01)] * 3


def noisy_linear(rng: random.Random, count: int) -> list[TaskSample]:
    """A CPU-bound function: 1 s per MB of input, sizes drawn anew each run (0.2-5 MB), and
    log-normal noise of CV ~0.2 on top."""
    samples = []
    for _ in range(count):
        size = rng.randint(200_000, 5_000_000)
        exec_s = size / 1e6 * rng.lognormvariate(0, 0.2)
        samples.append(TaskSample("count", 1024, size, size // 10, exec_s, cpu_s=exec_s * 0.98))
    return samples


def test_percentiles_come_from_residuals_at_the_queried_size_not_from_other_sizes():
    rng = random.Random(7)
    snapshot = HistorySnapshot("h", 10, noisy_linear(rng, 80))
    avg = Predictor(snapshot, "avg").exec_s("count", 3_000_000, 1024)
    p90 = Predictor(snapshot, "p90").exec_s("count", 3_000_000, 1024)
    fresh = [3.0 * rng.lognormvariate(0, 0.2) for _ in range(4000)]
    assert avg == pytest.approx(statistic(fresh, None), rel=0.08)
    # Calibrated: about 90% of new executions at that size end within p90 ...
    within = sum(1 for value in fresh if value <= p90) / len(fresh)
    assert 0.82 <= within <= 0.96
    # ... and not padded: raw samples of sizes from 0.2 to 5 MB would put p90 near 4.5 s.
    assert p90 / avg < 1.4


def test_the_curve_is_chosen_by_fit_quality():
    sizes = [10_000 * 2**k for k in range(8)]
    constant = fit_size_model([(x, 0.5, "") for x in sizes], None)
    power = fit_size_model([(x, (x / 1e6) ** 1.5, "") for x in sizes], None)
    linear = fit_size_model([(x, 0.2 + x / 1e7, "") for x in sizes], None)
    assert (constant.shape, power.shape, linear.shape) == ("constant", "power", "linear")
    assert power.predict(4e6) == pytest.approx(8.0, rel=0.01)
    assert linear.predict(5e7) == pytest.approx(5.2, rel=0.01)
    # A fixed cost plus a cost per byte bends a power law: the line must win there.
    assert abs(linear.predict(10_000) - 0.201) < 0.01


def test_few_samples_fall_back_to_their_statistic():
    model = fit_size_model([(100, 1.0, ""), (5000, 3.0, "")], 50)
    assert (model.shape, model.predict(10**9)) == ("constant", pytest.approx(2.0))
    with pytest.raises(ValueError, match="at least one sample"):
        fit_size_model([], None)


def test_tasks_of_one_function_keep_their_own_level():
    """Two tasks with the same input but different arguments (0.2 s and 1 s of work): each
    is predicted from its own bias, with the function's size curve."""
    tasks = [TaskSample("work", 1024, 100, 10, 0.2, task_id="work#0") for _ in range(4)]
    tasks += [TaskSample("work", 1024, 100, 10, 1.0, task_id="work#1") for _ in range(4)]
    predictor = Predictor(HistorySnapshot("h", 4, tasks))
    assert predictor.exec_s("work", 100, 1024, "work#0") == pytest.approx(0.2)
    assert predictor.exec_s("work", 100, 1024, "work#1") == pytest.approx(1.0)
    assert predictor.exec_s("work", 100, 1024, "work#7") == pytest.approx(0.6)


@dagkube.task
def split():
    return 1


@dagkube.task
def crunch(x, i):
    return x


@dagkube.task
def merge(values):
    return values


def fan(width: int) -> dagkube.Workflow:
    source = split()
    return dagkube.Workflow(merge([crunch(source, i) for i in range(width)]), name="fan")


def history(crunch_s: float, cpu_fraction: float) -> HistorySnapshot:
    tasks = []
    for function, seconds in (("split", 0.01), ("crunch", crunch_s), ("merge", 0.01)):
        tasks += [TaskSample(function, 1024, 100, 100, seconds, cpu_s=seconds * cpu_fraction)] * 5
    return HistorySnapshot("h", 5, tasks, STARTUPS)


def crunch_times(predictor: Predictor, width: int, workers: int) -> tuple[list[float], float]:
    """Each crunch task's execution, and the span from the first start to the last end (the
    workers are warm, so that the tasks start together)."""
    dag = fan(width).dag
    memory = dict.fromkeys(dag.tasks, 1024)
    timing = simulate(
        dag,
        memory,
        dict.fromkeys(dag.tasks),
        predictor,
        max_workers=workers,
        warm_pool={1024: workers},
    )
    crunched = [timing.tasks[t] for t in dag.tasks if t.startswith("crunch")]
    span = max(t.end_s for t in crunched) - min(t.exec_start_s for t in crunched)
    return [t.end_s - t.exec_start_s for t in crunched], span


def test_cpu_bound_tasks_share_the_cores_and_sleeping_ones_do_not():
    cpu = Predictor(history(1.0, 1.0), cpu_enforced=False, cores=2)
    # 4 CPU-bound tasks on 4 workers and 2 cores: each about twice as long as alone, the
    # 4 s of work done in 2 s.
    times, span = crunch_times(cpu, 4, 4)
    assert min(times) > 1.9 and span == pytest.approx(2.0, rel=0.02)
    # As many as cores: no slow-down.
    assert max(crunch_times(cpu, 2, 4)[0]) == pytest.approx(1.0, rel=0.01)
    sleepy = Predictor(history(1.0, 0.0), cpu_enforced=False, cores=2)
    assert max(crunch_times(sleepy, 4, 4)[0]) == pytest.approx(1.0, rel=0.01)
    # Where CPU is enforced (Pods), each class has its own share: nothing is shared.
    assert Predictor(history(1.0, 1.0)).cores is None


def test_cores_are_shared_only_where_more_tasks_can_compute_at_once_than_cores():
    """A worker runs one task at a time, a logical worker is one worker: a plan whose tasks
    are all bound to at most as many logical workers as cores never shares them (the model
    leaves them out, with the same schedule); more logical workers, or flexible tasks
    without a worker cap, do share them."""
    dag = fan(4).dag
    memory = dict.fromkeys(dag.tasks, 1024)
    cpu = Predictor(history(1.0, 1.0), cpu_enforced=False, cores=2)

    def crunched(worker_of, predictor, **caps):
        timing = simulate(dag, memory, worker_of, predictor, **caps)
        return [
            timing.tasks[t].end_s - timing.tasks[t].exec_start_s for t in dag.tasks if "cr" in t
        ]

    two = {t: ("w0" if t.endswith(("#0", "#2")) else "w1") for t in dag.tasks}
    alone = Predictor(history(1.0, 1.0), cpu_enforced=False, cores=None)
    assert crunched(two, cpu) == crunched(two, alone) == pytest.approx([1.0] * 4, rel=0.01)
    four = {t: f"w{t.split('#')[1]}" for t in dag.tasks}
    assert min(crunched(four, cpu, warm_pool={1024: 4})) > 1.9
    flexible = dict.fromkeys(dag.tasks)
    assert min(crunched(flexible, cpu, warm_pool={1024: 4})) > 1.9
    # Flexible under a cap of 2 workers (2 warm): at most 2 compute at once.
    assert max(crunched(flexible, cpu, max_workers=2, warm_pool={1024: 2})) == pytest.approx(
        1.0, rel=0.01
    )


def test_samples_learn_the_time_alone_from_runs_that_shared_the_cores():
    """Four runs of one task alone (1 s, 0.97 s on a CPU), and one run of four at once on 2
    cores, each stretched to 0.03 + 0.97 * 3.88 / 2 s as processor sharing says: learnt as
    1 s each, since the timing model shares the cores again for the run it predicts. A run
    slowed by load from outside (one task, 1.5 s) keeps its time: the next run meets it too."""
    alone = [
        TaskSample("crunch", 1024, 100, 10, 1.0, cpu_s=0.97, run_id=f"r{i}", started_at=10.0 * i)
        for i in range(4)
    ]
    shared_s = 0.03 + 0.97 * 3.88 / 2
    shared = [
        TaskSample("crunch", 1024, 100, 10, shared_s, cpu_s=0.97, run_id="r9", started_at=90.0)
    ] * 4
    predictor = Predictor(HistorySnapshot("h", 5, alone + shared), cpu_enforced=False, cores=2)
    assert predictor.cpu_fraction("crunch") == pytest.approx(0.97)
    assert predictor.exec_s("crunch", 100, 1024) == pytest.approx(1.0, rel=0.005)
    loaded = [
        TaskSample("crunch", 1024, 100, 10, 1.5, cpu_s=0.97, run_id=f"r{i}", started_at=10.0 * i)
        for i in range(4)
    ]
    predictor = Predictor(HistorySnapshot("h", 4, loaded), cpu_enforced=False, cores=2)
    assert predictor.exec_s("crunch", 100, 1024) == pytest.approx(1.5)
    with pytest.raises(ValueError, match="cores=0"):
        SharedCores(0)


def test_shared_cores_retime_remaining_work_when_a_task_ends():
    cores = SharedCores(1)
    (first,) = cores.start(0.0, "a", 1.0, 1.0)
    assert first == (1.0, "a", 1)
    moved = cores.start(0.0, "b", 3.0, 1.0)  # two tasks on one core: each at half speed
    assert sorted(moved) == [(2.0, "a", 2), (6.0, "b", 1)]
    assert cores.finish(1.0, "a", 1) is None  # stale: "a" was re-timed
    assert cores.finish(2.0, "a", 2) == [(4.0, "b", 2)]  # 2 s of b's work left, alone


def test_shared_cores_time_every_end_as_a_full_retiming_would():
    """Below the cores only the starting task is timed (no other speed moves); the ends must be
    those of re-timing every task at every start and end (processor sharing, by hand here)."""

    def by_hand(events: list[tuple[str, float, str, float, float]]) -> dict[str, float]:
        # (kind, time, task, work, demand) -> each task's end, simulated in small steps
        left: dict[str, tuple[float, float]] = {}
        ends: dict[str, float] = {}
        time_s, step = 0.0, 1e-4
        queue = sorted(events, key=lambda e: e[1])
        while queue or left:
            while queue and queue[0][1] <= time_s + 1e-12:
                _, _, task, work, demand = queue.pop(0)
                left[task] = (work, demand)
            total = sum(d for _, d in left.values())
            share = min(1.0, 2 / total) if total else 1.0
            for task, (work, demand) in list(left.items()):
                work -= step / ((1 - demand) + demand / share)
                if work <= 1e-12:
                    ends[task] = time_s + step
                    del left[task]
                else:
                    left[task] = (work, demand)
            time_s += step
        return ends

    rng = random.Random(3)
    starts = [
        ("start", round(rng.uniform(0, 1), 3), f"t{i}", rng.uniform(0.05, 0.5), demand)
        for i, demand in enumerate([0.0, 0.1, 0.3, 1.0, 0.9, 0.05, 1.0, 0.6, 0.8, 1.0, 0.2])
    ]
    cores = SharedCores(2)
    pending: list[tuple[float, str, int]] = []
    ends: dict[str, float] = {}

    def fire_ends_until(time_s: float) -> None:
        while pending and min(pending)[0] <= time_s:
            end = min(pending)
            pending.remove(end)
            moved = cores.finish(*end)
            if moved is not None:  # else stale: the task was re-timed since
                ends[end[1]] = end[0]
                pending.extend(moved)

    for _, time_s, task, work, demand in sorted(starts, key=lambda e: e[1]):
        fire_ends_until(time_s)
        pending.extend(cores.start(time_s, task, work, demand))
    fire_ends_until(float("inf"))
    expected = by_hand(starts)
    assert ends.keys() == expected.keys()
    for task, end in ends.items():
        assert end == pytest.approx(expected[task], abs=2e-3), task


def test_a_run_on_no_more_workers_than_cores_is_learnt_as_measured():
    """Four CPU-bound samples of one run: on four workers at once on 2 cores they shared the
    cores and are corrected; on two workers, two after two (a worker runs one task at a
    time), they never did and are kept as measured."""
    at_once = [
        TaskSample("crunch", 1024, 100, 10, 1.9, cpu_s=1.84, run_id="r", worker_id=f"w{i}")
        for i in range(4)
    ]
    predictor = Predictor(HistorySnapshot("h", 1, at_once), cpu_enforced=False, cores=2)
    assert predictor.exec_s("crunch", 100, 1024) < 1.5
    two_by_two = [
        TaskSample(
            "crunch",
            1024,
            100,
            10,
            1.9,
            cpu_s=1.84,
            run_id="r",
            started_at=1.9 * (i // 2),
            worker_id=f"w{i % 2}",
        )
        for i in range(4)
    ]
    predictor = Predictor(HistorySnapshot("h", 1, two_by_two), cpu_enforced=False, cores=2)
    assert predictor.exec_s("crunch", 100, 1024) == pytest.approx(1.9)


def test_transfers_are_predicted_per_size_bucket():
    """A machine where small values cost 2 ms (serialization, round trips) and 10 MB values
    move at 500 MB/s: one latency and one bandwidth cannot fit both ends."""
    tasks = [
        TaskSample("f", 1024, 100, 1000, 0.1, upload_bytes=1000, upload_s=0.002),
        TaskSample("f", 1024, 100, 1000, 0.1, upload_bytes=1000, upload_s=0.002),
        TaskSample("f", 1024, 100, 200_000, 0.1, download_bytes=200_000, download_s=0.003),
        TaskSample("f", 1024, 100, 200_000, 0.1, download_bytes=200_000, download_s=0.003),
        TaskSample("f", 1024, 100, 10**7, 0.1, upload_bytes=10**7, upload_s=0.02),
        TaskSample("f", 1024, 100, 10**7, 0.1, upload_bytes=10**7, upload_s=0.02),
    ]
    predictor = Predictor(HistorySnapshot("h", 2, tasks))
    assert predictor.transfer_s(1000) == pytest.approx(0.002)
    assert predictor.transfer_s(200_000) == pytest.approx(0.003)
    assert predictor.transfer_s(10**7) == pytest.approx(0.02)
    # An unseen size borrows the nearest bucket's correction; 0 bytes move nothing.
    assert predictor.transfer_s(1500) == pytest.approx(0.002, rel=0.05)
    assert predictor.transfer_s(0) == 0.0


def test_output_sizes_follow_input_sizes_and_reach_the_timing():
    rng = random.Random(3)
    snapshot = HistorySnapshot("h", 10, noisy_linear(rng, 40), STARTUPS)
    predictor = Predictor(snapshot)
    assert predictor.output_bytes("count", 4_000_000) == pytest.approx(400_000, rel=0.01)
    dag = fan(3).dag
    memory = dict.fromkeys(dag.tasks, 1024)
    timing = simulate(dag, memory, dict.fromkeys(dag.tasks), Predictor(history(0.1, 0.0)))
    assert {t.output_bytes for t in timing.tasks.values()} == {100}


def test_a_worker_fetches_each_value_once_per_run():
    """Workers keep what they fetched for the rest of the run: of the crunch tasks a worker
    other than split's runs, only its first downloads split's output."""
    dag = fan(6).dag
    memory = dict.fromkeys(dag.tasks, 1024)
    predictor = Predictor(history(0.2, 0.0))
    timing = simulate(dag, memory, dict.fromkeys(dag.tasks), predictor, max_workers=2)
    crunched = [timing.tasks[t] for t in dag.tasks if t.startswith("crunch")]
    source_worker = timing.tasks["split#0"].worker
    others = {t.worker for t in crunched} - {source_worker}
    assert others  # the fan-out did spread
    downloads = [t for t in crunched if t.download_s > 0]
    assert len(downloads) == len(others)
    assert all(t.worker != source_worker for t in downloads)


@dagkube.task
def measure(blob: bytes) -> int:
    return len(blob)


def test_a_large_constant_is_downloaded_with_the_inputs():
    blob = b"x" * 5_000_000  # above the inline budget: stored once as a constant
    dag = dagkube.Workflow(measure(blob), name="const").dag
    assert dag.constants
    tasks = [
        TaskSample("measure", 1024, 5_000_000, 10, 0.1, download_bytes=5_000_000, download_s=0.05)
    ] * 3
    predictor = Predictor(HistorySnapshot("h", 3, tasks, STARTUPS))
    timing = simulate(dag, {"measure#0": 1024}, {"measure#0": None}, predictor)
    assert timing.tasks["measure#0"].download_s == pytest.approx(0.05, rel=0.01)


def test_prewarm_times_its_workers_by_earlier_pre_warmed_starts_once_it_has_some():
    """Pre-warmed workers start in groups (locally sharing the cores): their spawn -> ready is
    learnt apart from lone cold starts, and used for pre-warmed workers only."""
    lone = [StartupSample(1024, True, 3.3)] * 6 + [StartupSample(1024, False, 0.01)] * 3
    two = [StartupSample(1024, True, 4.0, prewarmed=True)] * 2
    three = [StartupSample(1024, True, 4.0, prewarmed=True)] * 3
    few = Predictor(HistorySnapshot("h", 3, [], lone + two), "avg")
    # Too few pre-warmed starts: they count as cold starts like any other.
    assert few.startup_s(1024, True, prewarmed=True) == pytest.approx((6 * 3.3 + 2 * 4.0) / 8)
    enough = Predictor(HistorySnapshot("h", 3, [], lone + three), "avg")
    assert enough.startup_s(1024, True, prewarmed=True) == pytest.approx(4.0)
    # A worker spawned on demand is predicted from the starts on demand; warm ones untouched.
    assert enough.startup_s(1024, True) == pytest.approx(3.3)
    assert enough.startup_s(1024, False) == pytest.approx(0.01)
    # Fewer than three starts on demand: every cold start.
    mostly = Predictor(HistorySnapshot("h", 3, [], lone[:2] + lone[6:] + three), "avg")
    assert mostly.startup_s(1024, True) == pytest.approx((2 * 3.3 + 3 * 4.0) / 5)
    # The nearest class's pre-warmed starts serve a class without samples of its own (scaled
    # by CPU share as cold starts are).
    scale = enough.startup_s(2048, True) / enough.startup_s(1024, True)
    assert enough.startup_s(2048, True, prewarmed=True) == pytest.approx(4.0 * scale)
