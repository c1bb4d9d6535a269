"""The optimizations' runtime hooks: small pure functions of the plan's marks.

Each hook is asked at one point of a task's life, and at each point in this order (the
instructions come out in it too):

======================  =============================================================
point                   hooks, in order
======================  =============================================================
invocation starts       ``preload`` (a bound worker that hosts pre-loads starts them)
before a task           ``preload`` (a flexible worker hosting ``@task`` starts them),
                        ``prewarm`` (requests due after the task's start), then the task
                        runs; ``clustering`` decides with the upload rule whether its
                        output is stored (:meth:`RunView.must_store`)
after a task            ``delayed-io`` (a flexible worker may keep the output for the
                        fan-in instead of uploading it)
after its completion    ``delayed-io`` (uploads a kept output after all when the fan-in
                        did not come here)
bound worker idle       ``taskdup`` (re-run a late upstream of a waiting task here)
======================  =============================================================

Each hook reads its optimization's parameters in one place, here.
"""

from __future__ import annotations

from collections.abc import Iterable

from dagkube.planning.model import TaskdupParams
from dagkube.runtime.workercore.messages import (
    DelayUpload,
    PrewarmRequest,
    RequestPrewarm,
    StartPreload,
)
from dagkube.runtime.workercore.run import RunView

# A bound worker with taskdup candidates checks its upstreams when it first waits, then when
# the earliest of them could turn late (:func:`next_late_s`), never sooner than this after a
# check. Checking every DUP_POLL_S instead had each waiting worker make three Redis calls 20
# times a second: 13 waiting workers on Cycles-100 took CPU the tasks needed.
DUP_POLL_S = 0.05
LATE_FACTOR = 1.5  # an upstream running this many times its predicted time is a straggler
LATE_GRACE_S = 0.05


def preload(run: RunView, host: str) -> list[StartPreload]:
    """preload: start fetching in the background when this worker is a pre-load ``host``
    (a bound worker's logical id, or ``@<task>`` for the flexible worker running it)."""
    return [StartPreload(host=host)] if host in run.opts.hosts else []


def prewarm(run: RunView, task_id: str) -> list[RequestPrewarm]:
    """prewarm: the workers the start of ``task_id`` asks the scaler for."""
    requests = run.opts.prewarm.get(task_id, ())
    if not requests:
        return []
    wanted = tuple(
        PrewarmRequest(
            memory_mib=params.memory_mib,
            count=params.count,
            delay_s=params.delay_s,
            targets=tuple(params.targets),
        )
        for params in requests
    )
    return [RequestPrewarm(trigger=task_id, requests=wanted)]


def delayed_io(run: RunView, task_id: str, me: str | None) -> DelayUpload | None:
    """delayed-io: a flexible worker waits for the fan-in's other inputs before uploading
    an output the plan marked (when they are done, this worker runs the fan-in)."""
    if me is not None or task_id not in run.opts.delayed:
        return None
    fan_in, wait_s = run.opts.delayed[task_id]
    others = tuple(d for d in run.dag.tasks[fan_in].deps if d != task_id)
    return DelayUpload(task_id=task_id, fan_in=fan_in, others=others, wait_s=wait_s)


def duplicate_candidates(run: RunView, waiting: Iterable[str]) -> list[tuple[str, TaskdupParams]]:
    """taskdup: (consumer, parameters) for the waiting tasks that may re-run an upstream,
    consumers in sorted order."""
    return [(t, p) for t in sorted(waiting) for p in run.opts.dups.get(t, ())]


def late(params: TaskdupParams, started_at: float | None, now_s: float) -> bool:
    """taskdup's test, on times relative to the run's submission: is the upstream a
    straggler (running ``LATE_FACTOR`` times its prediction, or not started past its
    predicted end), or does the prediction say a re-run here ends before the original?"""
    original_exec, original_end = params.original_exec_s, params.original_end_s
    here = now_s + params.exec_s
    if started_at is not None:
        if now_s - started_at > LATE_FACTOR * original_exec + LATE_GRACE_S:
            return True
        return here < started_at + original_exec - LATE_GRACE_S
    if now_s > original_end + LATE_GRACE_S:
        return True  # not even started when it was predicted to have ended
    return here < max(original_end, now_s + original_exec) - LATE_GRACE_S


def next_late_s(params: TaskdupParams, started_at: float | None) -> float:
    """When :func:`late` turns true at the earliest for an upstream it is false for now, if
    nothing else is learnt meanwhile (times relative to the run's submission): its other
    tests only turn false as time passes, and one that is true when the upstream starts was
    true before it started. Not started: past its predicted end; started: past
    ``LATE_FACTOR`` times its predicted execution."""
    if started_at is not None:
        return started_at + LATE_FACTOR * params.original_exec_s + LATE_GRACE_S
    return params.original_end_s + LATE_GRACE_S
