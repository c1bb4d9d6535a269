"""Launching a run (DAG + plan into Redis, first invocations and early pre-warm requests
queued) and waiting for its end.

Used by the local runtime and by the operator. Waiters block on the run's ``result`` list
(a rotating BLMOVE, so several waiters can see the same result); nobody polls the run state
to learn that it ended.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import numbers
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from dagkube.dag import DagSpec, resolve
from dagkube.errors import InvalidOption, RunTimeout, TaskFailed
from dagkube.planning.model import OptimizationIndex, Plan
from dagkube.planning.rules import source_order
from dagkube.runtime.inputs import deserialize
from dagkube.runtime.invocation import Invocation
from dagkube.runtime.scaler import prewarm_entry
from dagkube.store import scripts
from dagkube.store.calls import CancelCall, ForceEndCall, RenewCall
from dagkube.store.cleanup import drop_run_data
from dagkube.store.connection import MAX_BLOCK_S, BulkReader, block_timeout
from dagkube.store.keys import PoolKeys, RunKeys, hist_run
from dagkube.store.objects import ObjectStore, delete_names, spill
from dagkube.store.records import RunRecord, RunStatus, is_live

DEFAULT_RUN_TTL_S = 3600
RENEW_EVERY_S = 60.0  # a waiter renews its run's lease this often (the lease is the run TTL)
DEFAULT_HISTORY_CAP = 100


def new_run_id(name: str) -> str:
    """``<name>-<time>-<random>``: ASCII letters, digits, '-' and '_', starting with a letter or
    digit, so that it is also a valid Kubernetes label value."""
    stem = "".join(c if (c.isascii() and c.isalnum()) or c in "-_" else "-" for c in name.lower())
    stem = stem[:40].strip("-_") or "run"
    return f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"


def initial_invocations(dag: DagSpec, plan: Plan, run_id: str, now: float) -> list[Invocation]:
    """One invocation per flexible source task, and one per logical worker holding sources,
    queued as the timing model queued them: in the DAG's order, or the longest path first
    where the plan says so (:func:`~dagkube.planning.rules.source_order` on its predicted
    execution times)."""
    invocations: list[Invocation] = []
    bound: dict[str, Invocation] = {}
    order = list(dag.sources)
    if plan.longest_first:
        exec_s = {
            t: p.predicted_exec_s for t, p in plan.tasks.items() if p.predicted_exec_s is not None
        }
        if len(exec_s) == len(dag.tasks):
            order = source_order(dag, exec_s)
    for task_id in order:
        task_plan = plan.tasks[task_id]
        if task_plan.worker_id is None:
            invocations.append(
                Invocation(run=run_id, mem=task_plan.memory_mib, roots=[task_id], queued_at=now)
            )
            continue
        invocation = bound.get(task_plan.worker_id)
        if invocation is None:
            invocation = bound[task_plan.worker_id] = Invocation(
                run=run_id, mem=task_plan.memory_mib, worker=task_plan.worker_id, queued_at=now
            )
            invocations.append(invocation)
        invocation.roots.append(task_id)
    return invocations


def submission_prewarms(plan: Plan, run_id: str, now: float) -> dict[str, float]:
    """prewarm: the requests due before their trigger task can start (a negative ``delay_s``),
    which the driver sends at submission instead: request -> when it is due, the trigger's
    predicted start plus the delay from ``now`` (at once if that is already past). The
    trigger's worker sends the same request again when the trigger starts; the scaler serves
    it once, at the earlier of the two."""
    index = OptimizationIndex.of({t: p.optimizations for t, p in plan.tasks.items()})
    due: dict[str, float] = {}
    for trigger, requests in index.prewarm.items():
        trigger_start_s = plan.tasks[trigger].predicted_start_s or 0.0
        for params in requests:
            if params.delay_s < 0:
                entry = prewarm_entry(run_id, params.memory_mib, params.count, trigger)
                due[entry] = now + max(0.0, trigger_start_s + params.delay_s)
    return due


async def launch(
    redis: Any,
    dag: DagSpec,
    plan: Plan,
    pool: str,
    *,
    run_id: str | None = None,
    ttl_s: int = DEFAULT_RUN_TTL_S,
    history_cap: int = DEFAULT_HISTORY_CAP,
    history_structures: int = scripts.DEFAULT_HISTORY_STRUCTURES,
    history_retention_s: int = scripts.DEFAULT_HISTORY_RETENTION_S,
    startup_delay_s: float = 0.0,
    enforced: bool = False,
    objects: ObjectStore | None = None,
) -> str:
    """Store the DAG and plan, queue the first invocations and the pre-warm requests due
    before their trigger can start (:func:`submission_prewarms`); returns the run id. ``enforced``:
    the workers run under their class's memory and CPU limits (recorded with the run).
    ``objects``: the object store the workers read from; constants of at least its threshold
    are put there and Redis holds references (16 MiB of NumPy blocks: an HSET of 0.12-0.17 s
    through the append-only file, 8-14 ms as files).
    ``history_*``: the history's limits applied when the run ends (runs kept per structure,
    structures kept, seconds an unused structure is kept)."""
    run_id = run_id or new_run_id(dag.name)
    now = time.time()
    invocations = initial_invocations(dag, plan, run_id, now)
    meta: dict[str, Any] = {
        "run_id": run_id,
        "workflow": dag.name,
        "structure_hash": dag.structure_hash,
        "planner": plan.planner,
        "candidate": plan.chosen_planner() or "",
        "sla": plan.sla,
        "pool": pool,
        "status": RunStatus.RUNNING,
        "submitted_at": now,
        "tasks_total": len(dag.tasks),
        "tasks_done": 0,
        "tasks_failed": 0,
        "active": len(invocations),
        "ttl_s": ttl_s,
        "history_cap": history_cap,
        "history_structures": history_structures,
        "history_retention_s": history_retention_s,
        "startup_delay_s": startup_delay_s,
        "predicted_makespan_s": plan.predicted_makespan_s if plan.predicted_makespan_s else "",
        "model_makespan_s": plan.model_makespan_s if plan.model_makespan_s else "",
        "plan_history_runs": plan.history_runs,
        "optimizations": ",".join(plan.optimizations),
        "enforced": 1 if enforced else 0,
        # a worker killed for memory has its work re-queued one class up, within these
        "classes": ",".join(str(c) for c in sorted(plan.classes_mib)),
    }
    constants, names = dag.constants, list[str]()
    if objects is not None and constants:
        constants, names = await asyncio.to_thread(_spill_constants, objects, run_id, constants)
    keys, pool_keys = RunKeys(run_id), PoolKeys(pool)
    plan_json = plan.model_dump_json()
    try:
        async with redis.pipeline(transaction=True) as pipe:
            pipe.set(keys.dag, dag.to_bytes())
            pipe.set(keys.plan, plan_json)
            pipe.set(hist_run(run_id, "plan"), plan_json)
            # The graph's edges, for reports (the DAG itself expires with the run's data).
            edges = {task.id: list(task.deps) for task in dag.tasks.values()}
            pipe.set(hist_run(run_id, "edges"), json.dumps(edges))
            if constants:
                pipe.hset(keys.constants, mapping=constants)
            pipe.hset(keys.meta, mapping=meta)
            for invocation in invocations:
                if invocation.worker is not None:
                    pipe.set(keys.claim(invocation.worker), "1")
                    pipe.sadd(keys.keyset, keys.claim(invocation.worker))
                pipe.sadd(pool_keys.classes, invocation.mem)
                pipe.rpush(pool_keys.queue(invocation.mem), invocation.to_json())
            prewarms = submission_prewarms(plan, run_id, now)
            if prewarms:
                pipe.zadd(pool_keys.prewarm, prewarms)
            pipe.lpush(pool_keys.wake, "1")
            pipe.ltrim(pool_keys.wake, 0, 0)
            await pipe.execute()
    except BaseException:
        if objects is not None and names:  # no run will read them (nor wait for the sweep)
            await asyncio.to_thread(delete_names, objects, names)
        raise
    await renew(redis, run_id)  # its keys expire from now unless a waiter renews them
    return run_id


CONSTANT_OBJECT = "const:"  # + a constant's key (no "#": every task id has one)


def _spill_constants(
    objects: ObjectStore, run_id: str, constants: dict[str, bytes]
) -> tuple[dict[str, bytes], list[str]]:
    """The constants with each large one put in ``objects`` (named apart from any task id:
    ``const:`` + its key) and replaced by its reference."""
    kept, names = spill(objects, run_id, {CONSTANT_OBJECT + k: v for k, v in constants.items()})
    return {k[len(CONSTANT_OBJECT) :]: v for k, v in kept.items()}, names


async def renew(redis: Any, run_id: str) -> bool:
    """Extend a live run's lease (its keys expire one run TTL after this); False once it
    ended."""
    shortest = 3 * RENEW_EVERY_S  # a short run TTL must not let a waited-for run expire
    reply = await scripts.Scripts(redis).renew(RenewCall(run_id=run_id, shortest_lease_s=shortest))
    return reply.renewed


async def wait_for_end(
    redis: Any,
    run_id: str,
    *,
    timeout_s: float | None = None,
    on_progress: Callable[[int, int], None] | None = None,
    progress_every_s: float = 0.2,
) -> str:
    """Block until the run ends; returns its final status. Progress callbacks (tasks done,
    total) are refreshed between blocking waits when asked for. The run's lease is renewed
    while it is waited for."""
    keys = RunKeys(run_id)
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    block_s = progress_every_s if on_progress else MAX_BLOCK_S
    total = int(await redis.hget(keys.meta, "tasks_total") or 0)
    renewed = time.monotonic()
    while True:
        if time.monotonic() - renewed >= RENEW_EVERY_S:
            await renew(redis, run_id)
            renewed = time.monotonic()
        if deadline is not None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise RunTimeout(f"Run {run_id} did not finish within {timeout_s:g}s")
            block = block_timeout(min(block_s, remaining))
        else:
            block = block_s
        status = await redis.blmove(keys.result, keys.result, block, "LEFT", "RIGHT")
        if on_progress:
            done = await redis.hget(keys.meta, "tasks_done")
            on_progress(int(done or 0), total)
        if status is not None:
            return status.decode()


def check_timeout(value: object) -> float:
    """A run's timeout in seconds: a positive, finite number (a bool is no number here)."""
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        seconds = float(value)
        if math.isfinite(seconds) and seconds > 0:
            return seconds
    raise InvalidOption(
        f"Timeout {value!r} is not valid: use a positive number of seconds (e.g. 30 or 0.5)"
    )


async def cancel(redis: Any, run_id: str, reason: str = "cancelled by the user") -> bool:
    """Ask every worker of the run to stop at its next task boundary."""
    call = CancelCall(run_id=run_id, reason_json=json.dumps({"message": reason}), now=time.time())
    return (await scripts.Scripts(redis).cancel(call)).cancelled


async def force_end(redis: Any, run_id: str) -> str:
    """End a run without waiting for its workers (busy in a long task, stopped, or none took
    it): recorded as cancelled (failed if it had failed), its keys expiring, its queued
    invocations dropped. Returns the status it ended with, "" if it had already ended."""
    reply = await scripts.Scripts(redis).force_end(ForceEndCall(run_id=run_id, now=time.time()))
    return reply.status or ""


async def fail_run(redis: Any, run_id: str, message: str) -> str:
    """End a run as failed without its workers, whatever state it is in (the Redis it ran on
    restarted: its state may have lost writes, so it is not resumed). Returns the status it
    ended with, "" if it had already ended or the server does not know it."""
    meta = RunKeys(run_id).meta
    if is_live(await redis.hget(meta, "status")):
        await redis.hset(
            meta, mapping={"status": RunStatus.FAILED, "error": json.dumps({"message": message})}
        )
    return await force_end(redis, run_id)


async def cancel_and_end(redis: Any, run_id: str, reason: str, *, grace_s: float) -> str:
    """Cancel a run, give its workers ``grace_s`` to stop at a task boundary, then force-end
    it: the run has ended when this returns, whatever its workers do. Returns its final
    status (a run that ended on its own meanwhile keeps the status it ended with; "" for a run
    whose state is gone from Redis)."""
    await cancel(redis, run_id, reason)
    # The grace counts from the first cancellation (a follower that restarts does not extend it).
    began = float(await redis.hget(RunKeys(run_id).meta, "cancelled_at") or time.time())
    remaining = began + grace_s - time.time()
    if remaining > 0:
        with contextlib.suppress(RunTimeout):
            return await wait_for_end(redis, run_id, timeout_s=remaining)
    ended = await force_end(redis, run_id)
    if not ended:  # its last worker ended it just after the grace
        ended = (await redis.lindex(RunKeys(run_id).result, 0) or b"").decode()
    return ended


async def fetch_outputs(reader: BulkReader, dag: DagSpec, run_id: str) -> Any:
    """The run's outputs, in the shape the workflow's outputs were given."""
    (blobs,) = await reader.hmget_many([(RunKeys(run_id).outputs, dag.output_ids)])
    values = {}
    for task_id, blob in zip(dag.output_ids, blobs, strict=True):
        if blob is None:
            raise RuntimeError(f"Run {run_id}: output of {task_id} is missing (expired?)")
        values[task_id] = deserialize(blob)
    return resolve(dag.output_template, values, {})


async def drop_data(redis: Any, run_id: str, objects: ObjectStore | None = None) -> None:
    """Free a finished run's intermediate data (outputs, constants, its objects in
    ``objects``) once its only consumer has its outputs; the history is kept."""
    await drop_run_data(redis, run_id, objects)


async def fetch_run_record(redis: Any, run_id: str) -> RunRecord:
    fields = await redis.hgetall(hist_run(run_id, "meta"))
    if not fields:
        fields = await redis.hgetall(RunKeys(run_id).meta)
    return RunRecord.from_hash({k.decode(): v.decode() for k, v in fields.items()})


def task_failed_from(record: RunRecord) -> TaskFailed | None:
    """The TaskFailed a failed run raises, from its stored error."""
    error = record.error or {}
    if record.status == RunStatus.SUCCEEDED:
        return None
    return TaskFailed(
        run_id=record.run_id,
        task_id=error.get("task_id", record.failed_task or "?"),
        function=error.get("function", "?"),
        exc_type=error.get("exc_type", record.status),
        message=error.get("message", f"run {record.status}"),
        remote_traceback=error.get("traceback", ""),
    )


@dataclass
class RunResult:
    """What a finished run gives back: outputs (when it succeeded) and its record."""

    run_id: str
    status: str
    record: RunRecord
    outputs: Any = None
