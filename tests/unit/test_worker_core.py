"""The worker's core without Redis: events in, instructions out (as dask/distributed tests its
worker state machine), the optimization hooks' order, and the rules the timing model shares."""

from __future__ import annotations

from dataclasses import replace

import pytest

from dagkube.dag import DagSpec, TaskSpec
from dagkube.planning.history import HistorySnapshot, TaskSample
from dagkube.planning.model import (
    Clustering,
    ClusteringParams,
    DelayedIo,
    DelayedIoParams,
    OptimizationIndex,
    Plan,
    Preload,
    PreloadParams,
    Prewarm,
    PrewarmParams,
    Taskdup,
    TaskdupParams,
    TaskPlan,
)
from dagkube.planning.predictions import Predictor
from dagkube.planning.rules import Route, flexible_next, route, start_charge
from dagkube.planning.timing import simulate
from dagkube.runtime.workercore import hooks
from dagkube.runtime.workercore.machine import TAKEN_POLL_S, TAKEN_POLLS, InvocationMachine
from dagkube.runtime.workercore.messages import (
    CheckDuplicated,
    CheckTaken,
    ClaimDuplicate,
    Complete,
    Completed,
    DelayUpload,
    DoneRead,
    DuplicateClaimed,
    DuplicatedChecked,
    Execute,
    Executed,
    Fail,
    Failed,
    Finish,
    PrewarmRequest,
    ReadDone,
    ReadStatus,
    ReadUpstreams,
    RequestPrewarm,
    StartPreload,
    StatusRead,
    Steal,
    Stole,
    Stop,
    StoreOutput,
    TakenChecked,
    TaskReady,
    UploadDelayed,
    UpstreamsRead,
    WaitInbox,
    WorkerIdle,
)
from dagkube.runtime.workercore.run import RunView

BLOCK_S = 5.0
SUBMITTED = 1000.0


def dag_of(deps: dict[str, list[str]], outputs: list[str] | None = None) -> DagSpec:
    """A DAG of tasks of function ``work`` (ids in topological order), sinks as outputs."""
    tasks = {
        task_id: TaskSpec(task_id, "work", "work", b"", tuple(upstream))
        for task_id, upstream in deps.items()
    }
    for task_id, spec in tasks.items():
        for upstream in spec.deps:
            tasks[upstream].downstream.append(task_id)
    sinks = [t for t, spec in tasks.items() if not spec.downstream]
    return DagSpec("test", "h", tasks, {}, None, outputs if outputs is not None else sinks)


def run_of(
    deps: dict[str, list[str]],
    workers: dict[str, str] | None = None,
    optimizations: dict[str, list] | None = None,
) -> RunView:
    workers, optimizations = workers or {}, optimizations or {}
    dag = dag_of(deps)
    plan = Plan(
        planner="test",
        sla="avg",
        classes_mib=[512],
        memory_per_cpu_mib=1024,
        max_cpu=1.0,
        tasks={
            t: TaskPlan(
                memory_mib=512, worker_id=workers.get(t), optimizations=optimizations.get(t, [])
            )
            for t in dag.tasks
        },
    )
    return RunView(
        run_id="r",
        dag=dag,
        plan=plan,
        ttl_s=60,
        history_cap=10,
        task_index={t: i for i, t in enumerate(dag.tasks)},
        submitted_at=SUBMITTED,
        opts=OptimizationIndex.of({t: p.optimizations for t, p in plan.tasks.items()}),
    )


def flexible(run: RunView, *roots: str, resume: bool = False) -> InvocationMachine:
    return InvocationMachine(run, roots=roots, worker=None, resume=resume, block_s=BLOCK_S)


def bound(run: RunView, me: str, *roots: str, resume: bool = False) -> InvocationMachine:
    return InvocationMachine(run, roots=roots, worker=me, resume=resume, block_s=BLOCK_S)


def running(task_id: str, continuation: str | None = None, *local: str) -> Completed:
    return Completed(
        task_id=task_id, status="running", continuation=continuation, local_ready=local
    )


CHAIN = {"a": [], "b": ["a"], "c": ["b"]}


# ------------------------------------------------------------------ flexible invocations
def test_a_flexible_worker_runs_its_root_then_each_continuation_and_finishes():
    core = flexible(run_of(CHAIN), "a")
    # a's output stays local (one flexible consumer); c is the run's output: stored
    assert core.start() == [Execute(task_id="a", store=False)]
    assert core.handle(Executed(task_id="a", ok=True, started_at=10.0)) == [
        Complete(task_id="a", pending=())
    ]
    assert core.handle(running("a", "b")) == [Execute.match(task_id="b", store=False)]
    core.handle(Executed(task_id="b", ok=True, started_at=11.0))
    assert core.handle(running("b", "c")) == [Execute.match(task_id="c", store=True)]
    core.handle(Executed(task_id="c", ok=True, started_at=12.0))
    assert core.handle(running("c")) == [Finish(served=3, first_task_at=10.0)]


def test_clustered_children_run_here_after_the_continuation_and_travel_as_pending():
    run = run_of(
        {"a": [], "b": ["a"], "c": ["a"], "d": ["a"]},
        optimizations={"a": [Clustering(params=ClusteringParams(children=["b", "c", "d"]))]},
    )
    core = flexible(run, "a", "z")  # z: a second root of the invocation
    assert core.start() == [Execute(task_id="a", store=False)]  # clustering keeps it local
    core.handle(Executed(task_id="a", ok=True, started_at=1.0))
    # COMPLETE chose b as the continuation and routed c and d here: depth first, before z
    assert core.handle(running("a", "b", "c", "d")) == [Execute.match(task_id="b")]
    assert core.handle(Executed(task_id="b", ok=True, started_at=2.0)) == [
        Complete(task_id="b", pending=("c", "d", "z"))
    ]


def test_a_resumed_invocation_skips_completed_roots_and_stores_every_output():
    core = flexible(run_of(CHAIN), "a", "b", resume=True)
    assert core.start() == [ReadDone(task_id="a")]
    assert core.handle(DoneRead(done=frozenset({"a"}))) == [ReadDone(task_id="b")]
    # a checkpoint: b's output is stored although its consumer would run here
    assert core.handle(DoneRead(done=frozenset())) == [Execute(task_id="b", store=True)]


def test_a_failed_task_fails_the_run_and_ends_the_invocation():
    core = flexible(run_of(CHAIN), "a")
    core.start()
    assert core.handle(Executed(task_id="a", ok=False, started_at=5.0)) == [Fail(task_id="a")]
    assert core.handle(Failed(task_id="a")) == [Finish(served=1, first_task_at=5.0)]


def test_a_run_that_stopped_running_ends_the_invocation_after_the_completion():
    core = flexible(run_of(CHAIN), "a")
    core.start()
    core.handle(Executed(task_id="a", ok=True, started_at=5.0))
    ended = Completed(task_id="a", status="cancelled", continuation=None)
    assert core.handle(ended) == [Finish(served=1, first_task_at=5.0)]


# ------------------------------------------------------------------ the hooks and their order
def test_before_a_task_preload_then_prewarm_then_the_task():
    run = run_of(
        {"a": [], "b": [], "f": ["a", "b"]},
        optimizations={
            "f": [Preload(params=PreloadParams(host="@a", inputs=["b"]))],
            "a": [
                Prewarm(params=PrewarmParams(memory_mib=1024, count=2, delay_s=0.5, targets=["f"]))
            ],
        },
    )
    assert flexible(run, "a").start() == [
        StartPreload(host="@a"),
        RequestPrewarm(
            trigger="a",
            requests=(PrewarmRequest(memory_mib=1024, count=2, delay_s=0.5, targets=("f",)),),
        ),
        Execute(task_id="a", store=True),
    ]


def delayed_run() -> RunView:
    return run_of(
        {"a": [], "b": [], "f": ["a", "b"]},
        optimizations={"a": [DelayedIo(params=DelayedIoParams(fan_in="f", wait_s=0.3))]},
    )


def test_delayed_io_waits_for_the_fan_ins_other_inputs_before_completing():
    core = flexible(delayed_run(), "a")
    core.start()
    assert core.handle(Executed(task_id="a", ok=True, started_at=1.0)) == [
        DelayUpload(task_id="a", fan_in="f", others=("b",), wait_s=0.3)
    ]
    assert core.handle(UploadDelayed(task_id="a", kept=True)) == [Complete(task_id="a")]
    # the fan-in came here: nothing more to upload
    assert core.handle(running("a", "f")) == [Execute.match(task_id="f")]


def test_a_kept_output_is_stored_after_all_when_the_fan_in_goes_elsewhere():
    core = flexible(delayed_run(), "a")
    core.start()
    core.handle(Executed(task_id="a", ok=True, started_at=1.0))
    core.handle(UploadDelayed(task_id="a", kept=True))
    assert core.handle(running("a")) == [StoreOutput(task_id="a"), Finish.match(served=1)]


def test_an_uploaded_output_is_not_stored_twice():
    core = flexible(delayed_run(), "a")
    core.start()
    core.handle(Executed(task_id="a", ok=True, started_at=1.0))
    core.handle(UploadDelayed(task_id="a", kept=False))
    assert core.handle(running("a")) == [Finish.match(served=1)]


def test_delayed_io_is_a_flexible_workers_hook_only():
    run = run_of(
        {"a": [], "b": [], "f": ["a", "b"]},
        workers={"a": "w1", "f": "w1"},
        optimizations={"a": [DelayedIo(params=DelayedIoParams(fan_in="f", wait_s=0.3))]},
    )
    assert hooks.delayed_io(run, "a", None) == DelayUpload(
        task_id="a", fan_in="f", others=("b",), wait_s=0.3
    )
    assert hooks.delayed_io(run, "a", "w1") is None
    assert hooks.delayed_io(run, "b", None) is None


# ------------------------------------------------------------------ bound invocations
PAIR = {"a": [], "b": [], "c": ["a", "b"]}


def test_a_bound_worker_waits_for_its_inbox_and_counts_the_blocked_time():
    run = run_of(PAIR, workers={"a": "w1", "b": "w2", "c": "w1"})
    core = bound(run, "w1", "a")
    assert core.start() == [Execute(task_id="a", store=False, blocked_since=None)]
    core.handle(Executed(task_id="a", ok=True, started_at=1.0))
    assert core.handle(running("a")) == [WaitInbox(timeout_s=BLOCK_S)]
    # nothing yet: the run still runs, so wait again, blocked since the first wait
    assert core.handle(WorkerIdle(waited_from=2.0)) == [ReadStatus()]
    assert core.handle(StatusRead(running=True)) == [WaitInbox(timeout_s=BLOCK_S)]
    assert core.handle(TaskReady(task_ids=("c",), waited_from=7.0)) == [
        Execute(task_id="c", store=True, blocked_since=2.0)
    ]
    core.handle(Executed(task_id="c", ok=True, started_at=8.0))
    assert core.handle(running("c")) == [Finish(served=2, first_task_at=1.0)]


def test_the_stop_token_or_an_ended_run_ends_a_waiting_bound_worker():
    run = run_of(PAIR, workers={"a": "w1", "b": "w2", "c": "w1"})
    core = bound(run, "w1")
    assert core.start() == [WaitInbox(timeout_s=BLOCK_S)]
    assert core.handle(Stop()) == [Finish(served=0, first_task_at=None)]
    core = bound(run, "w1")
    core.start()
    core.handle(WorkerIdle(waited_from=1.0))
    assert core.handle(StatusRead(running=False)) == [Finish.match(served=0)]


def test_a_resumed_bound_worker_runs_what_is_left_whose_inputs_are_done():
    run = run_of(
        {"a": [], "b": ["a"], "c": ["b"], "d": ["c"]},
        workers={"a": "w1", "b": "w1", "c": "w1", "d": "w1"},
    )
    core = bound(run, "w1", resume=True)
    assert core.start() == [ReadDone(task_id=None)]
    assert core.handle(DoneRead(done=frozenset({"a", "b"}))) == [Execute(task_id="c", store=True)]


def test_a_bound_worker_names_its_next_ready_task_in_each_completion():
    """What the inbox gave at once runs in order; each COMPLETE names the next task (its
    claim rides on the step), except a task a duplicate may have completed, and the last."""
    run = run_of(
        {"s": [], "b1": ["s"], "b2": ["s"], "b3": ["s"], "x": [], "t": ["x"]},
        workers={"s": "w0", "b1": "w1", "b2": "w1", "b3": "w1", "x": "w2", "t": "w1"},
        optimizations={
            "t": [
                Taskdup(
                    params=TaskdupParams(
                        upstream="b3", exec_s=0.05, original_end_s=0.2, original_exec_s=0.1
                    )
                )
            ]
        },
    )
    core = bound(run, "w1")
    assert core.start() == [WaitInbox(timeout_s=hooks.DUP_POLL_S)]
    assert core.handle(TaskReady(task_ids=("b1", "b2", "b3"), waited_from=1.0)) == [
        Execute.match(task_id="b1")
    ]
    # b2 is ready: b1's step is overlapped with b2's execution
    assert core.handle(Executed(task_id="b1", ok=True, started_at=2.0)) == [
        Complete(task_id="b1", next_task="b2", overlapped=True),
        Execute.match(task_id="b2"),
    ]
    assert core.handle(running("b1")) == []
    # b3 may be completed by a consumer's duplicate: it is checked before it runs
    assert core.handle(Executed(task_id="b2", ok=True, started_at=3.0)) == [
        Complete(task_id="b2", next_task=None)
    ]
    assert core.handle(running("b2")) == [CheckDuplicated(task_id="b3")]
    assert core.handle(DuplicatedChecked(task_id="b3", done=False)) == [Execute.match(task_id="b3")]
    assert core.handle(Executed(task_id="b3", ok=True, started_at=4.0)) == [
        Complete(task_id="b3", next_task=None)
    ]


MIB = 1024 * 1024
FOUR = {"a": [], "b": [], "c": [], "d": ["a", "b", "c"]}


def test_the_step_of_a_task_overlaps_the_next_ready_tasks_execution():
    """The COMPLETE of a task (and its upload) runs while the next ready task executes; its
    reply comes before that task's end and adds what it routed here to the queue."""
    run = run_of(FOUR, workers={"a": "w1", "b": "w1", "c": "w1", "d": "w1"})
    core = bound(run, "w1")
    assert core.start() == [WaitInbox(timeout_s=BLOCK_S)]
    assert core.handle(TaskReady(task_ids=("a", "b"), waited_from=1.0)) == [
        Execute(task_id="a", store=False, blocked_since=1.0)
    ]
    assert core.handle(Executed(task_id="a", ok=True, started_at=2.0, output_bytes=0)) == [
        Complete(task_id="a", next_task="b", overlapped=True),
        Execute(task_id="b", store=False),
    ]
    assert core.handle(Completed(task_id="a", status="running", continuation=None)) == []
    # b's step is not overlapped: nothing is ready after it (c came with no step yet)
    assert core.handle(Executed(task_id="b", ok=True, started_at=3.0)) == [
        Complete(task_id="b", next_task=None)
    ]
    assert core.handle(running("b")) == [WaitInbox(timeout_s=BLOCK_S)]
    core.handle(TaskReady(task_ids=("c",), waited_from=4.0))
    core.handle(Executed(task_id="c", ok=True, started_at=5.0))
    assert core.handle(running("c", None, "d")) == [Execute(task_id="d", store=True)]


def test_a_ready_consumer_the_overlapped_step_routed_here_runs_after_the_executing_task():
    run = run_of(
        {"a": [], "b": [], "c": ["a"], "d": ["b", "c"]},
        workers={"a": "w1", "b": "w1", "c": "w1", "d": "w1"},
    )
    core = bound(run, "w1", "a", "b")
    core.start()
    assert core.handle(Executed(task_id="a", ok=True, started_at=1.0)) == [
        Complete(task_id="a", next_task="b", overlapped=True),
        Execute.match(task_id="b"),
    ]
    assert core.handle(running("a", None, "c")) == []
    # the queue now holds c: b's step overlaps c's execution
    assert core.handle(Executed(task_id="b", ok=True, started_at=2.0)) == [
        Complete(task_id="b", next_task="c", overlapped=True),
        Execute.match(task_id="c"),
    ]


def test_overlapped_steps_may_land_after_later_tasks_and_before_a_step_that_is_not():
    """Group commit: tasks shorter than a step's round trip leave several overlapped steps
    under way; their replies come later, together, and what they routed here is queued."""
    run = run_of(FOUR, workers={"a": "w1", "b": "w1", "c": "w1", "d": "w1"})
    core = bound(run, "w1", "a", "b", "c")
    core.start()
    assert core.handle(Executed(task_id="a", ok=True, started_at=1.0)) == [
        Complete(task_id="a", next_task="b", overlapped=True),
        Execute.match(task_id="b"),
    ]
    assert core.handle(Executed(task_id="b", ok=True, started_at=2.0)) == [
        Complete(task_id="b", next_task="c", overlapped=True),
        Execute.match(task_id="c"),
    ]
    # c ends with nothing queued: its step is not overlapped
    assert core.handle(Executed(task_id="c", ok=True, started_at=3.0)) == [
        Complete(task_id="c", next_task=None)
    ]
    assert core.handle(running("a")) == []
    assert core.handle(running("b")) == []
    assert core.completing == set()
    assert core.handle(running("c", None, "d")) == [Execute(task_id="d", store=True)]


def test_a_run_that_ended_during_an_overlapped_step_ends_after_the_executing_task():
    run = run_of(FOUR, workers={"a": "w1", "b": "w1", "c": "w1", "d": "w1"})
    core = bound(run, "w1", "a", "b", "c")
    core.start()
    core.handle(Executed(task_id="a", ok=True, started_at=1.0))
    cancelled = Completed(task_id="a", status="cancelled", continuation=None)
    assert core.handle(cancelled) == []
    # b's result is not completed, c does not start
    assert core.handle(Executed(task_id="b", ok=True, started_at=2.0)) == [
        Finish(served=2, first_task_at=1.0)
    ]


def test_a_large_output_is_not_uploaded_while_the_next_task_runs():
    """Its serialized copy would be held beside the next task's memory: above 1/16 of the
    task's memory (512 MiB here) the step is waited for, as before."""
    run = run_of(FOUR, workers={"a": "w1", "b": "w1", "c": "w1", "d": "w1"})
    core = bound(run, "w1", "a", "b")
    core.start()
    assert core.handle(Executed(task_id="a", ok=True, started_at=1.0, output_bytes=33 * MIB)) == [
        Complete(task_id="a", next_task="b")
    ]
    core = bound(run, "w1", "a", "b")
    core.start()
    assert core.handle(Executed(task_id="a", ok=True, started_at=1.0, output_bytes=32 * MIB)) == [
        Complete(task_id="a", next_task="b", overlapped=True),
        Execute.match(task_id="b"),
    ]


def test_a_bound_worker_hosting_preloads_starts_them_first():
    run = run_of(
        PAIR,
        workers={"a": "w1", "b": "w2", "c": "w1"},
        optimizations={"c": [Preload(params=PreloadParams(host="w1", inputs=["b"]))]},
    )
    assert bound(run, "w1", "a").start() == [
        StartPreload(host="w1"),
        Execute.match(task_id="a"),
    ]


# ------------------------------------------------------------------ taskdup
def dup_run(**params: float) -> RunView:
    values = {"exec_s": 0.05, "original_end_s": 0.2, "original_exec_s": 0.1, **params}
    return run_of(
        PAIR,
        workers={"a": "w1", "b": "w2", "c": "w1"},
        optimizations={"c": [Taskdup(params=TaskdupParams(upstream="b", **values))]},
    )


def idle_dup_worker(run: RunView) -> InvocationMachine:
    core = bound(run, "w1", "a")
    core.start()
    core.handle(Executed(task_id="a", ok=True, started_at=SUBMITTED))
    assert core.handle(running("a")) == [WaitInbox(timeout_s=hooks.DUP_POLL_S)]
    assert core.handle(WorkerIdle(waited_from=SUBMITTED + 0.1)) == [ReadUpstreams(upstreams=("b",))]
    return core


def test_a_straggling_upstream_is_claimed_and_run_here_as_a_duplicate():
    run = dup_run()
    core = idle_dup_worker(run)
    # b started 0.1 s after submission and still runs 1 s later: 10 times its prediction
    late = UpstreamsRead(done=frozenset(), started={"b": SUBMITTED + 0.1}, at=SUBMITTED + 1.1)
    assert core.handle(late) == [ClaimDuplicate(upstream="b", consumer="c")]
    assert core.handle(DuplicateClaimed(upstream="b", won=True)) == [
        Execute(task_id="b", store=True, duplicate=True)
    ]
    assert run.duplicated == {"c": ["b"]}
    core.handle(Executed(task_id="b", ok=True, started_at=SUBMITTED + 1.2))
    assert core.handle(running("b", None, "c")) == [ReadStatus()]
    assert core.handle(StatusRead(running=True)) == [
        Execute(task_id="c", store=True, blocked_since=SUBMITTED + 0.1)
    ]
    core.handle(Executed(task_id="c", ok=True, started_at=SUBMITTED + 1.3))
    # the duplicate is served but not the invocation's first task
    assert core.handle(running("c")) == [Finish(served=3, first_task_at=SUBMITTED)]


def test_a_lost_claim_or_an_upstream_on_time_means_no_duplicate():
    core = idle_dup_worker(dup_run())
    late = UpstreamsRead(done=frozenset(), started={"b": SUBMITTED + 0.1}, at=SUBMITTED + 1.1)
    core.handle(late)
    assert core.handle(DuplicateClaimed(upstream="b", won=False)) == [ReadStatus()]
    # predicted to end long after now, and a re-run here would not be sooner: not late
    core = idle_dup_worker(dup_run(exec_s=20.0, original_end_s=10.0, original_exec_s=10.0))
    on_time = UpstreamsRead(done=frozenset(), started={"b": SUBMITTED}, at=SUBMITTED + 1.0)
    assert core.handle(on_time) == [ReadStatus()]
    # No polling meanwhile: the next check is when b could be late (1.5 x 10 s after its
    # start, plus the grace), the inbox waited on until then.
    (wait,) = core.handle(StatusRead(running=True))
    assert wait == WaitInbox(timeout_s=core.block_s, until=pytest.approx(SUBMITTED + 15.05))
    assert core.handle(WorkerIdle(waited_from=SUBMITTED + 1.0)) == [ReadUpstreams(upstreams=("b",))]
    # Not started yet: late once past its predicted end (10 s) and the grace, checked no
    # sooner than the poll after this check.
    not_started = UpstreamsRead(done=frozenset(), started={}, at=SUBMITTED + 5.0)
    assert core.handle(not_started) == [ReadStatus()]
    (wait,) = core.handle(StatusRead(running=True))
    assert wait.until == pytest.approx(SUBMITTED + 10.05)
    core.handle(WorkerIdle(waited_from=SUBMITTED + 5.0))
    assert core.handle(replace(not_started, at=SUBMITTED + 10.03)) == [ReadStatus()]
    (wait,) = core.handle(StatusRead(running=True))
    assert wait.until == pytest.approx(SUBMITTED + 10.03 + hooks.DUP_POLL_S)
    core = idle_dup_worker(dup_run())
    done = UpstreamsRead(done=frozenset({"b"}), started={}, at=SUBMITTED + 9.0)
    assert core.handle(done) == [ReadStatus()]


def test_a_task_a_consumer_may_duplicate_is_checked_first_and_skipped_if_done():
    run = run_of(
        {"a": [], "b": [], "c": ["a", "b"]},
        workers={"a": "w2", "b": "w2", "c": "w1"},
        optimizations={
            "c": [
                Taskdup(
                    params=TaskdupParams(
                        upstream="b", exec_s=0.1, original_end_s=0.2, original_exec_s=0.1
                    )
                )
            ]
        },
    )
    core = bound(run, "w2", "a", "b")
    assert core.start() == [Execute.match(task_id="a")]
    core.handle(Executed(task_id="a", ok=True, started_at=1.0))
    assert core.handle(running("a")) == [CheckDuplicated(task_id="b")]
    assert core.handle(DuplicatedChecked(task_id="b", done=True)) == [Finish.match(served=1)]


@pytest.mark.parametrize(
    ("started_s", "now_s", "exec_here_s", "late"),
    [
        (0.0, 0.25, 0.1, True),  # running 2.5 times its predicted 0.1 s: a straggler
        (0.0, 0.1, 0.1, False),  # on time, and a re-run here would end later
        (None, 0.3, 0.5, True),  # not started past its predicted end (0.2 s)
        (None, 0.0, 0.3, False),  # not started, not due yet, a re-run here would end later
        (None, 0.0, 0.1, True),  # not started, and a re-run here ends before its predicted end
    ],
)
def test_lateness(started_s, now_s, exec_here_s, late):
    params = TaskdupParams(
        upstream="b", exec_s=exec_here_s, original_end_s=0.2, original_exec_s=0.1
    )
    assert hooks.late(params, started_s, now_s) is late


# ------------------------------------------------------------------ the shared rules
@pytest.mark.parametrize(
    ("producer", "consumer", "clustered", "taken", "expected"),
    [
        (None, None, False, False, Route.CONTINUE),
        (None, None, False, True, Route.QUEUE),
        (None, None, True, True, Route.LOCAL),
        ("w1", None, False, False, Route.QUEUE),
        ("w1", "w1", False, False, Route.LOCAL),
        ("w1", "w2", False, False, Route.INBOX),
        (None, "w2", False, False, Route.INBOX),
    ],
)
def test_routing_of_a_ready_consumer(producer, consumer, clustered, taken, expected):
    found = route(
        producer_worker=producer,
        consumer_worker=consumer,
        clustered=clustered,
        continuation_taken=taken,
    )
    assert found is expected


def test_a_flexible_worker_goes_depth_first():
    assert flexible_next("b", ["c", "d"], ["z"]) == ["b", "c", "d", "z"]
    assert flexible_next(None, [], ["z"]) == ["z"]


@pytest.mark.parametrize(
    ("first", "spawned", "queued", "prewarmed", "cold", "charged_from", "spawn_recorded"),
    [
        (True, 10.0, 9.0, False, True, 10.0, 10.0),  # spawned for this demand
        (True, 10.0, 12.0, False, False, 20.0, None),  # idle since an earlier spawn
        (True, 10.0, 12.0, True, False, 10.0, 10.0),  # pre-warmed: its wait is the run's
        (False, 10.0, 9.0, False, False, 20.0, None),  # a later invocation: warm
        (True, None, 12.0, False, True, 20.0, None),  # spawn unknown: cold, from the take
        (True, 10.0, 0.0, False, True, 10.0, 10.0),  # queueing unknown: cold
    ],
)
def test_start_charge(first, spawned, queued, prewarmed, cold, charged_from, spawn_recorded):
    charge = start_charge(
        first=first, spawned_s=spawned, queued_s=queued, prewarmed=prewarmed, taken_s=20.0
    )
    assert (charge.cold, charge.charged_from_s, charge.spawned_s) == (
        cold,
        charged_from,
        spawn_recorded,
    )


def completion(run: RunView, task_id: str, me: str | None, remaining: dict[str, int]) -> Completed:
    """What the COMPLETE step replies, by the shared routing rule (one worker's view)."""
    continuation = None
    local: list[str] = []
    for down in run.dag.tasks[task_id].downstream:
        remaining[down] -= 1
        if remaining[down]:
            continue
        where = route(
            producer_worker=me,
            consumer_worker=run.plan.tasks[down].worker_id,
            clustered=task_id in run.opts.clustered,
            continuation_taken=continuation is not None,
        )
        if where is Route.CONTINUE:
            continuation = down
        elif where is Route.LOCAL:
            local.append(down)
    return running(task_id, continuation, *local)


def test_the_timing_model_predicts_the_order_a_flexible_worker_runs_its_tasks_in():
    deps = {"a": [], "b": ["a"], "c": ["a"], "d": ["a"], "e": ["b"], "f": ["c"]}
    marks = {"a": [Clustering(params=ClusteringParams(children=["b", "c", "d"]))]}
    run = run_of(deps, optimizations=marks)
    remaining = {t: len(spec.deps) for t, spec in run.dag.tasks.items()}
    core = flexible(run, "a")
    ran: list[str] = []
    instructions = core.start()
    while not isinstance(instructions[-1], Finish):
        (execute,) = instructions
        assert isinstance(execute, Execute)
        ran.append(execute.task_id)
        core.handle(Executed(task_id=execute.task_id, ok=True, started_at=0.0))
        instructions = core.handle(completion(run, execute.task_id, None, remaining))
    predictor = Predictor(HistorySnapshot("h", 3, [TaskSample("work", 512, 100, 100, 0.1)] * 3))
    timing = simulate(
        run.dag,
        dict.fromkeys(deps, 512),
        dict.fromkeys(deps),
        predictor,
        optimizations={t: p.optimizations for t, p in run.plan.tasks.items()},
    )
    (activity,) = timing.activities
    assert ran == activity.tasks == ["a", "b", "e", "c", "f", "d"]


# ------------------------------------------------------------------ work stealing
FAN = {"s": [], "b1": ["s"], "b2": ["s"], "b3": ["s"], "b4": ["s"], "c": ["b1", "b2", "b3", "b4"]}


def stealing_run() -> RunView:
    """s, b1, b2 and c on w1, b3 and b4 on w2; every task predicted at 10 ms."""
    run = run_of(
        FAN, workers={"s": "w1", "b1": "w1", "b2": "w1", "c": "w1", "b3": "w2", "b4": "w2"}
    )
    for planned in run.plan.tasks.values():
        planned.predicted_exec_s = 0.01
    return run


def test_which_tasks_may_be_stolen_and_by_whom():
    run = stealing_run()
    # the b's read only s, stored (it has consumers on both workers); c reads outputs kept on
    # w1, and s has no inputs
    assert {t for t in FAN if run.stealable(t)} == {"b1", "b2", "b3", "b4"}
    assert run.victims("w2") == ("w1",) and run.victims("w1") == ("w2",)
    assert run.steal_most("w2") == int(0.05 / 0.0105)
    run = stealing_run()
    run.plan.tasks["b3"].predicted_exec_s = 0.5  # too long to run twice
    assert not run.stealable("b3") and run.stealable("b4")
    run = stealing_run()
    run.plan.tasks["b1"].memory_mib = 1024  # a larger class than w2's
    assert run.victims("w2") == () and run.victims("w1") == ("w2",)


def test_a_bound_worker_with_nothing_ready_takes_tasks_and_stores_their_outputs():
    run = stealing_run()
    core = bound(run, "w2")
    most = run.steal_most("w2")
    # nothing ready yet: try to take before waiting, once until something arrives
    assert core.start() == [Steal(victims=("w1",), most=most)]
    assert core.handle(Stole(task_ids=())) == [WaitInbox(timeout_s=BLOCK_S)]
    assert core.handle(TaskReady(task_ids=("b3", "b4"), waited_from=1.0)) == [
        Execute.match(task_id="b3", store=True)
    ]
    core.handle(Executed(task_id="b3", ok=True, started_at=2.0))
    core.handle(running("b3"))
    core.handle(Executed(task_id="b4", ok=True, started_at=3.0))
    # its own done: take more; a taken task's output is stored (its consumer is elsewhere)
    assert core.handle(running("b4")) == [Steal(victims=("w1",), most=most)]
    assert core.handle(Stole(task_ids=("b2",))) == [Execute.match(task_id="b2", store=True)]
    core.handle(Executed(task_id="b2", ok=True, started_at=4.0))
    assert core.handle(running("b2")) == [Steal(victims=("w1",), most=most)]
    assert core.handle(Stole(task_ids=())) == [Finish(served=3, first_task_at=2.0)]


def test_a_worker_skips_its_tasks_others_took_and_runs_those_not_done_in_time():
    run = stealing_run()
    core = bound(run, "w1", "s")
    assert core.start() == [Execute.match(task_id="s")]
    core.handle(Executed(task_id="s", ok=True, started_at=1.0))
    ready = Completed(
        task_id="s", status="running", continuation=None, local_ready=("b1", "b2"), taken=("b2",)
    )
    assert core.handle(ready) == [Execute.match(task_id="b1")]  # b2 was taken: not run here
    core.handle(Executed(task_id="b1", ok=True, started_at=2.0))
    # nothing else ready: is the taken one done?
    assert core.handle(running("b1")) == [CheckTaken(task_ids=("b2",))]
    assert core.handle(TakenChecked(done=frozenset())) == [Steal.match(victims=("w2",))]
    assert core.handle(Stole(task_ids=())) == [WaitInbox(timeout_s=TAKEN_POLL_S)]
    # polled until done: then only c is left, which waits for the inbox as usual
    assert core.handle(WorkerIdle(waited_from=3.0)) == [CheckTaken(task_ids=("b2",))]
    assert core.handle(TakenChecked(done=frozenset({"b2"}))) == [Steal.match(victims=("w2",))]
    assert core.handle(Stole(task_ids=())) == [WaitInbox(timeout_s=BLOCK_S)]
    assert "b2" not in core.remaining
    # a taken task still not done after TAKEN_POLLS checks runs here (its thief may be lost)
    core = bound(run, "w1", "s")
    core.start()
    core.handle(Executed(task_id="s", ok=True, started_at=1.0))
    core.handle(ready)
    core.handle(Executed(task_id="b1", ok=True, started_at=2.0))
    found = core.handle(running("b1"))
    for _ in range(TAKEN_POLLS):
        assert found == [CheckTaken(task_ids=("b2",))]
        found = core.handle(TakenChecked(done=frozenset()))
        while found and not isinstance(found[0], CheckTaken | Execute):
            event = Stole(task_ids=()) if isinstance(found[0], Steal) else WorkerIdle(waited_from=3)
            found = core.handle(event)
    assert found == [Execute.match(task_id="b2", store=False)]
