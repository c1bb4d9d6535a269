"""Every Lua script, called through its typed call on a real Redis: the arguments it encodes
are those the Lua reads, its reply decodes to what happened, and every key it touched for a
run of a namespace lies under that namespace's prefix (what a worker's Redis user may touch)."""

from __future__ import annotations

import fnmatch
import itertools
import json
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

from dagkube.planning.rules import Route, route
from dagkube.store import calls
from dagkube.store.calls import (
    AddToRunCall,
    CancelCall,
    CompleteCall,
    Completion,
    Downstream,
    FailCall,
    FinishCall,
    ForceEndCall,
    LengthsCall,
    PruneIndexesCall,
    PruneStructureCall,
    RenewCall,
    RequeueCall,
    StealCall,
)
from dagkube.store.cleanup import delete_pool_keys, delete_run_keys
from dagkube.store.keys import (
    PoolKeys,
    RunKeys,
    hist_all_runs,
    hist_run,
    hist_structure_runs,
    namespace_pattern,
    namespaced,
    worker_heartbeat,
    worker_proc,
    worker_task,
)
from dagkube.store.scripts import SOURCES, Scripts

pytestmark = pytest.mark.integration

DB = 6  # a database of its own: the tests look at every key in it
NAMESPACE = "team-a"
POOL = namespaced(NAMESPACE, "wf-1")


@pytest.fixture
async def redis(redis_server) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_server.url.rsplit("/", 1)[0] + f"/{DB}")
    await client.flushdb()
    yield client
    # Whatever a script wrote lies under the namespace of the runs it was called for.
    stray = [k.decode() for k in await client.keys("*")]
    await client.flushdb()
    await client.aclose()
    assert not [k for k in stray if not fnmatch.fnmatchcase(k, namespace_pattern(NAMESPACE))]


async def start_run(redis: aioredis.Redis, name: str, *, tasks_total: int = 2) -> str:
    run = namespaced(NAMESPACE, name)
    await redis.hset(
        RunKeys(run).meta,
        mapping={
            "status": "running",
            "active": 1,
            "tasks_total": tasks_total,
            "tasks_done": 0,
            "submitted_at": 1.0,
            "workflow": "etl",
            "structure_hash": f"s-{name}",
            "ttl_s": 600,
            "history_cap": 10,
            "pool": POOL,
        },
    )
    return run


def invocation(run: str, roots: list[str], **extra: object) -> str:
    return json.dumps({"run": run, "mem": 512, "roots": roots, "queued_at": 1.0, **extra})


def finish_call(run: str, worker: str, *, next_queue: str | None = None) -> FinishCall:
    record = json.dumps({"worker_id": worker, "peak_memory_bytes": 4096})
    return FinishCall(
        run_id=run,
        pool=POOL,
        worker_id=worker,
        worker_field=worker,
        worker_record_json=record,
        gb_s=0.5,
        cpu_s_allocated=0.25,
        cpu_s_used=0.125,
        cold=True,
        prewarmed=False,
        now=10.0,
        run_ttl_s=600,
        history_cap=10,
        next_queue=next_queue,
    )


def test_every_script_has_a_typed_call():
    typed = {
        cls.script
        for cls in vars(calls).values()
        if isinstance(cls, type) and "script" in vars(cls)
    }
    assert typed == set(SOURCES)


ROUTE_CASES = list(
    itertools.product((None, "w1"), (None, "w1", "w2"), (False, True), (False, True))
)


@pytest.mark.parametrize(("producer", "consumer", "clustered", "after_flexible"), ROUTE_CASES)
async def test_complete_routes_a_ready_consumer_as_the_rule_says(
    redis, producer, consumer, clustered, after_flexible
):
    """COMPLETE (Lua) and :func:`dagkube.planning.rules.route` (the worker's core and the
    timing model) send a ready consumer to the same place, case for case."""
    run = await start_run(redis, f"route-{len(await redis.keys('*'))}", tasks_total=4)
    keys, pool = RunKeys(run), PoolKeys(POOL)
    # An earlier flexible consumer of the same completion may take the continuation first.
    first = [Downstream("first", 1, 512, clustered=clustered)] if after_flexible else []
    call = CompleteCall(
        run_id=run,
        pool=POOL,
        worker_id="pod-1",
        logical_worker=producer,
        memory_mib=512,
        run_ttl_s=600,
        completions=(
            Completion(
                "a",
                "{}",
                "a",
                b"out",
                5.0,
                (*first, Downstream("down", 1, 1024, worker=consumer, clustered=clustered)),
            ),
        ),
    )
    reply = await Scripts(redis).complete(call)
    queued = [json.loads(raw)["roots"] for raw in await redis.lrange(pool.queue(1024), 0, -1)]
    inbox = [] if consumer is None else await redis.lrange(keys.inbox(consumer), 0, -1)
    where = {
        Route.CONTINUE: reply.continuation == "down",
        Route.LOCAL: "down" in reply.local_ready,
        Route.QUEUE: ["down"] in queued,
        Route.INBOX: inbox == [b"down"],
    }
    assert [r for r, happened in where.items() if happened] == [
        route(
            producer_worker=producer,
            consumer_worker=consumer,
            clustered=clustered,
            continuation_taken=after_flexible and producer is None,
        )
    ]


async def test_complete_counts_inputs_routes_ready_consumers_and_guards_duplicates(redis):
    run = await start_run(redis, "complete", tasks_total=4)
    keys, pool = RunKeys(run), PoolKeys(POOL)
    proc, task = worker_proc("w1", POOL), worker_task("w1", POOL)
    await redis.rpush(proc, invocation(run, ["a"]))
    await redis.set(task, "{}")
    call = CompleteCall(
        run_id=run,
        pool=POOL,
        worker_id="w1",
        logical_worker=None,
        memory_mib=512,
        run_ttl_s=600,
        pending_roots=("p",),
        completions=(
            Completion(
                "a",
                json.dumps({"task_id": "a"}),
                "a",
                b"out-a",
                5.0,
                (
                    Downstream("b", dependencies=1, memory_mib=512),
                    Downstream("c", dependencies=1, memory_mib=1024, worker="w2", preload_host="h"),
                    Downstream("d", dependencies=2, memory_mib=512, clustered=True),
                ),
            ),
        ),
    )
    reply = await Scripts(redis).complete(call)
    assert reply.running and reply.continuation == "b" and not reply.duplicate
    assert reply.local_ready == ()
    assert await redis.hget(keys.outputs, "a") == b"out-a"
    assert await redis.smembers(keys.done) == {b"a"}
    assert await redis.hget(keys.dep_counts, "d") == b"1"
    assert await redis.lrange(keys.inbox("w2"), 0, -1) == [b"c"]
    assert await redis.lrange(keys.preload("h"), 0, -1) == [b"a"]
    [queued] = await redis.lrange(pool.queue(1024), 0, -1)
    assert json.loads(queued)["worker"] == "w2"
    assert await redis.hget(keys.meta, "active") == b"2"
    assert not await redis.exists(task)
    [held] = await redis.lrange(proc, 0, -1)
    assert json.loads(held)["roots"] == ["b", "p"]
    assert await redis.hkeys(hist_run(run, "tasks")) == [b"a"]

    again = await Scripts(redis).complete(call)
    assert again.duplicate and again.running
    assert await redis.hget(keys.meta, "tasks_done") == b"1"


def on_w1(run: str, *completions: Completion, next_claim: str = "") -> CompleteCall:
    """COMPLETE of ``completions`` by bound worker w1 (worker process w1, class 512 MiB)."""
    return CompleteCall(
        run_id=run,
        pool=POOL,
        worker_id="w1",
        logical_worker="w1",
        memory_mib=512,
        run_ttl_s=600,
        completions=completions,
        next_claim=next_claim,
    )


async def test_complete_writes_the_next_tasks_claim_while_the_run_goes_on(redis):
    run = await start_run(redis, "claim", tasks_total=3)
    task = worker_task("w1", POOL)
    claim = json.dumps({"run": run, "task": "b", "function": "f"})

    def completing(task_id: str) -> CompleteCall:
        record = json.dumps({"task_id": task_id})
        return on_w1(run, Completion(task_id, record, task_id, None, 5.0), next_claim=claim)

    await redis.set(task, "{}")
    assert (await Scripts(redis).complete(completing("a"))).running
    assert await redis.get(task) == claim.encode()
    assert 0 < await redis.ttl(task) <= 600
    await redis.delete(task)
    again = await Scripts(redis).complete(completing("a"))  # a duplicate completion
    # the worker runs its next task all the same: the claim says so
    assert again.duplicate and await redis.get(task) == claim.encode()
    await redis.hset(RunKeys(run).meta, "status", "cancelling")
    assert not (await Scripts(redis).complete(completing("c"))).running
    assert not await redis.exists(task)


async def test_complete_of_several_tasks_completes_each_in_order_and_routes_their_consumers(
    redis,
):
    """A bound worker's group commit: the tasks that ended while its last COMPLETE was under
    way go in one call; each is counted once, its consumers' inputs counted and routed, and
    the call's tasks done before (a duplicate's) are skipped as a single call would."""
    run = await start_run(redis, "group", tasks_total=5)
    keys, task = RunKeys(run), worker_task("w1", POOL)
    claim = json.dumps({"run": run, "task": "e", "function": "f"})
    await redis.sadd(keys.done, "b")  # a duplicate completed b first

    def completion(task_id: str, *downstream: Downstream) -> Completion:
        record = json.dumps({"task_id": task_id})
        return Completion(task_id, record, task_id, task_id.encode(), 5.0, downstream)

    merge = Downstream("m", dependencies=3, memory_mib=512, worker="w1")
    call = on_w1(
        run,
        completion("a", merge),
        completion("b", merge),
        Completion("c", json.dumps({"task_id": "c"}), "c", b"c", 6.0, (merge,)),
        next_claim=claim,
    )
    reply = await Scripts(redis).complete(call)
    assert reply.running and not reply.duplicate
    assert reply.local_ready == ()  # b's input was not counted again: m waits for a third
    assert await redis.hget(keys.meta, "tasks_done") == b"2"
    assert await redis.hget(keys.dep_counts, "m") == b"2"
    assert await redis.hmget(keys.outputs, ["a", "b", "c"]) == [b"a", None, b"c"]
    assert sorted(await redis.hkeys(hist_run(run, "tasks"))) == [b"a", b"b", b"c"]
    assert await redis.get(task) == claim.encode()

    last = Completion("d", "{}", "d", b"d", 7.0, (merge,))
    reply = await Scripts(redis).complete(
        on_w1(run, last, Completion("c", "{}", "c", b"c", 7.0, (merge,)))
    )  # d, then c again (a duplicate completion, last)
    assert reply.running and reply.duplicate and reply.local_ready == ("m",)
    assert await redis.hget(keys.meta, "tasks_done") == b"3"


async def test_complete_routes_a_wide_fan_out_sent_as_one_argument(redis):
    """A source's 1,000 consumers ride on the call as one JSON argument: each is counted and
    routed (its own half back to w1, the other half to w2's inbox), ids of any script kept;
    the tasks' fields ride as one argument too, binary outputs and records byte for byte."""
    run = await start_run(redis, "wide", tasks_total=1002)
    keys = RunKeys(run)
    ids = [f"nöop-{n}#{n}" if n % 2 else f"调用#{n}" for n in range(1000)]
    consumers = tuple(
        Downstream(task_id, 1, 512, worker="w1" if n < 500 else "w2", offer=True)
        for n, task_id in enumerate(ids)
    )
    output, record = b"\x00:12:\xff\n" * 3, json.dumps({"note": "é:1:"}, ensure_ascii=False)
    reply = await Scripts(redis).complete(
        on_w1(run, Completion("source#0", record, "source#0", output, 5.0, consumers))
    )
    assert await redis.hget(keys.outputs, "source#0") == output
    assert await redis.hget(hist_run(run, "tasks"), "source#0") == record.encode()
    assert reply.local_ready == tuple(ids[:500])
    inbox = await redis.lrange(keys.inbox("w2"), 0, -1)
    assert [task_id.decode() for task_id in inbox] == ids[500:]
    assert await redis.hlen(keys.dep_counts) == 0  # each had one input: nothing to count
    assert await redis.llen(keys.offers("w1")) == await redis.llen(keys.offers("w2")) == 500


async def test_steal_takes_offered_ready_tasks_from_the_end_and_their_worker_learns_of_it(
    redis,
):
    """Work stealing: COMPLETE offers the ready consumers that may run elsewhere (in their
    worker's order) and withdraws a task its worker completes; STEAL takes from the end of the
    longest list, half beyond what the victim keeps, skipping done ones; the victim's next
    COMPLETE lists what was taken, once."""
    run = await start_run(redis, "steal", tasks_total=12)
    offers = RunKeys(run).offers("w1")
    scripts = Scripts(redis)

    def complete(task_id: str, *downstream: Downstream, offered: bool = False) -> CompleteCall:
        return on_w1(
            run, Completion(task_id, "{}", task_id, b"x", 5.0, downstream, offered=offered)
        )

    fan = [Downstream(f"b{i}", 1, 512, worker="w1", offer=True) for i in range(10)]
    reply = await scripts.complete(complete("s", *fan, Downstream("x", 1, 512, worker="w1")))
    assert reply.local_ready == (*(f"b{i}" for i in range(10)), "x") and reply.taken == ()
    assert await redis.lrange(offers, 0, -1) == [f"b{i}".encode() for i in range(10)]
    assert offers.encode() in await redis.smembers(RunKeys(run).keyset)
    await scripts.complete(complete("b0", offered=True))  # withdrawn by its worker
    await redis.sadd(RunKeys(run).done, "b9")  # done already (a duplicate's): skipped
    steal = StealCall(run_id=run, thief="w2", victims=["w1", "w3"], most=8, keep=2)
    await redis.rpush(RunKeys(run).inbox("w2"), "y")  # the thief's own come first
    assert (await scripts.steal(steal)).taken == ()
    await redis.delete(RunKeys(run).inbox("w2"))
    # 9 offered beyond the 2 kept: half of 7 = 3, from the end, b9 skipped
    assert (await scripts.steal(steal)).taken == ("b8", "b7", "b6")
    assert await redis.hget(RunKeys(run).meta, "tasks_stolen") == b"3"
    reply = await scripts.complete(complete("b1", offered=True))
    assert sorted(reply.taken) == ["b6", "b7", "b8"]
    assert (await scripts.complete(complete("b2", offered=True))).taken == ()  # told once
    assert await redis.lrange(offers, 0, -1) == [b"b3", b"b4", b"b5"]
    # at least one beyond the kept ones, none past them, none once the run ended
    assert (await scripts.steal(steal)).taken == ("b5",)
    assert (await scripts.steal(steal)).taken == ()
    await redis.hset(RunKeys(run).meta, "status", "cancelled")
    await redis.rpush(offers, "b10", "b11", "b12")
    assert (await scripts.steal(steal)).taken == ()


async def test_fail_fails_the_run_once_and_stops_its_bound_workers(redis):
    run = await start_run(redis, "fail")
    keys = RunKeys(run)
    await redis.sadd(keys.keyset, keys.inbox("w2"))
    call = FailCall(run_id=run, task_id="a", record_json="{}", error_json='{"message": "no"}')
    assert (await Scripts(redis).fail(call)).previous_status == "running"
    assert await redis.hmget(keys.meta, "status", "failed_task") == [b"failed", b"a"]
    assert await redis.lrange(keys.inbox("w2"), 0, -1) == [b""]
    assert (await Scripts(redis).fail(call)).previous_status == "failed"
    missing = FailCall(
        run_id=namespaced(NAMESPACE, "none"), task_id="a", record_json="{}", error_json="{}"
    )
    assert (await Scripts(redis).fail(missing)).previous_status == "missing"


async def test_renew_and_cancel_act_on_live_runs_only(redis):
    run = await start_run(redis, "lease")
    keys, scripts = RunKeys(run), Scripts(redis)
    assert (await scripts.renew(RenewCall(run_id=run, shortest_lease_s=1000))).renewed
    assert 900 < await redis.ttl(keys.meta) <= 1000
    cancel = CancelCall(run_id=run, reason_json='{"message": "stop"}', now=7.0)
    assert (await scripts.cancel(cancel)).cancelled
    assert await redis.hmget(keys.meta, "status", "cancelled_at") == [b"cancelling", b"7.0"]
    assert not (await scripts.cancel(cancel)).cancelled
    assert (await scripts.renew(RenewCall(run_id=run, shortest_lease_s=1))).renewed  # cancelling
    await redis.hset(keys.meta, "status", "failed")
    assert not (await scripts.renew(RenewCall(run_id=run, shortest_lease_s=1))).renewed


async def test_finish_ends_the_run_with_its_last_invocation_and_takes_the_next(redis):
    run = await start_run(redis, "finish", tasks_total=1)
    other = await start_run(redis, "next")
    keys, pool, proc = RunKeys(run), PoolKeys(POOL), worker_proc("w1", POOL)
    await redis.hset(keys.meta, "tasks_done", 1)
    await redis.rpush(proc, invocation(run, ["a"]))
    await redis.rpush(pool.queue(512), invocation(other, ["x"]))
    reply = await Scripts(redis).finish(finish_call(run, "w1", next_queue=pool.queue(512)))
    assert reply.finalized and reply.status == "succeeded"
    assert reply.next_invocation is not None and json.loads(reply.next_invocation)["run"] == other
    assert reply.next_run_status == "running"
    assert await redis.lrange(keys.result, 0, -1) == [b"succeeded"]
    assert await redis.hget(keys.meta, "peak_memory_bytes") == b"4096"
    assert await redis.hkeys(hist_run(run, "workers")) == [b"w1"]
    assert await redis.lrange(hist_all_runs(NAMESPACE), 0, -1) == [run.encode()]
    assert await redis.lrange(hist_structure_runs("s-finish", NAMESPACE), 0, -1) == [run.encode()]

    alone = await Scripts(redis).finish(finish_call(other, "w1"))
    assert (alone.finalized, alone.status) == (True, "failed")  # no task of it completed
    assert alone.next_invocation is None and alone.next_run_status is None


async def test_requeue_puts_a_lost_workers_work_back_and_records_the_loss(redis):
    run = await start_run(redis, "requeue")
    pool = PoolKeys(POOL)
    proc, task, beat = (
        worker_proc("w1", POOL),
        worker_task("w1", POOL),
        worker_heartbeat("w1", POOL),
    )
    await redis.rpush(proc, invocation(run, ["a"]))
    await redis.set(task, json.dumps({"run": run, "task": "a", "function": "f"}))
    await redis.set(beat, "1")
    await redis.hset(pool.workers, "w1", 512)
    call = RequeueCall(
        pool=POOL,
        worker_id="w1",
        memory_mib=512,
        spawned_at=2.0,
        now=4.0,
        oom_killed=False,
        peak_memory_bytes=None,
        exit_code=137,
        max_requeues=3,
    )
    assert (await Scripts(redis).requeue(call)).requeued == 1
    [queued] = await redis.lrange(pool.queue(512), 0, -1)
    assert json.loads(queued)["resume"] is True
    assert json.loads(queued)["requeues"] == {"a": 1}
    assert not await redis.exists(proc, task, beat)
    assert not await redis.hexists(pool.workers, "w1")
    lost = json.loads(await redis.hget(hist_run(run, "workers"), "w1:lost"))
    assert (lost["lost_task"], lost["exit_code"]) == ("a", 137)


async def test_requeue_fails_a_crash_loop_but_not_losses_between_stored_outputs(redis):
    """The same task losing its worker more than max_requeues times with nothing done in
    between fails the run; outputs stored in between (upstreams re-run from their lineage,
    STORE) are progress, so such losses go on being re-queued."""
    pool = PoolKeys(POOL)

    async def lose(run: str, item: bytes | str, now: float) -> int:
        await redis.rpush(worker_proc("w1", POOL), item)
        await redis.set(
            worker_task("w1", POOL), json.dumps({"run": run, "task": "b", "function": "f"})
        )
        call = RequeueCall(
            pool=POOL,
            worker_id="w1",
            memory_mib=512,
            spawned_at=2.0,
            now=now,
            oom_killed=False,
            peak_memory_bytes=None,
            exit_code=-9,
            max_requeues=3,
        )
        return (await Scripts(redis).requeue(call)).requeued

    for name, stores in (("looping", False), ("recomputing", True)):
        run = await start_run(redis, name)
        item: bytes | str = invocation(run, ["a"])
        for loss in range(1, 6):
            if stores:  # what the next worker re-ran before it was lost too
                reply = await Scripts(redis).store(
                    calls.StoreCall(run, {f"a{loss}": b"x" * 10}, 600)
                )
                assert reply.status == "running"
            requeued = await lose(run, item, 4.0 + loss)
            if not stores and loss == 4:
                assert requeued == 0
                break
            assert requeued == 1, (name, loss)
            item = await redis.lpop(pool.queue(512))
        meta = await redis.hgetall(RunKeys(run).meta)
        if stores:
            assert meta[b"status"] == b"running" and meta[b"outputs_stored"] == b"5"
        else:
            assert meta[b"status"] == b"failed"
            error = json.loads(meta[b"error"])
            assert (error["exc_type"], error["task_id"]) == ("WorkerLost", "b")
            assert "died 4 times" in error["message"]


async def test_force_end_drops_queued_work_and_ends_the_run_once(redis):
    run = await start_run(redis, "force")
    keys, pool = RunKeys(run), PoolKeys(POOL)
    await redis.sadd(pool.classes, 512)
    await redis.rpush(pool.queue(512), invocation(run, ["a"]))
    reply = await Scripts(redis).force_end(ForceEndCall(run_id=run, now=3.0))
    assert reply.status == "cancelled"
    assert await redis.llen(pool.queue(512)) == 0
    assert await redis.lrange(keys.result, 0, -1) == [b"cancelled"]
    assert (await Scripts(redis).force_end(ForceEndCall(run_id=run, now=4.0))).status is None


async def test_add_to_run_adds_to_the_live_run_then_to_its_history(redis):
    run = await start_run(redis, "add")
    scripts, keys = Scripts(redis), RunKeys(run)
    add = AddToRunCall(run_id=run, increments={"prewarm_requested": 2, "prewarm_gb_s": 0.5})
    assert (await scripts.add_to_run(add)).added
    assert await redis.hmget(keys.meta, "prewarm_requested", "prewarm_gb_s") == [b"2", b"0.5"]
    await scripts.force_end(ForceEndCall(run_id=run, now=3.0))
    assert (await scripts.add_to_run(add)).added
    assert await redis.hget(hist_run(run, "meta"), "prewarm_requested") == b"4"
    nobody = AddToRunCall(run_id=namespaced(NAMESPACE, "none"), increments={"gb_s": 1})
    assert not (await scripts.add_to_run(nobody)).added


async def test_prune_structure_and_indexes_drop_runs_with_their_index_entries(redis):
    scripts = Scripts(redis)
    ended = []
    for name in ("old", "new"):
        run = await start_run(redis, name)
        await redis.hset(RunKeys(run).meta, "structure_hash", "shared")
        await scripts.force_end(ForceEndCall(run_id=run, now=3.0 if name == "old" else 5.0))
        ended.append(run)
    old, new = ended

    def prune(dry_run: bool) -> PruneStructureCall:
        return PruneStructureCall(
            namespace=NAMESPACE,
            structure_hash="shared",
            keep_runs=1,
            finished_before=None,
            dry_run=dry_run,
            workflow=None,
        )

    dry = await scripts.prune_structure(prune(True))
    assert [r.run_id for r in dry.removed] == [old] and (dry.kept, dry.left) == (1, 1)
    assert await redis.exists(hist_run(old, "meta"))
    done = await scripts.prune_structure(prune(False))
    assert [(r.run_id, r.status) for r in done.removed] == [(old, "cancelled")]
    assert not await redis.exists(hist_run(old, "meta"))
    assert await redis.lrange(hist_all_runs(NAMESPACE), 0, -1) == [new.encode()]

    gone = namespaced(NAMESPACE, "gone")
    await redis.lpush(hist_all_runs(NAMESPACE), gone)
    indexes = PruneIndexesCall(
        namespace=NAMESPACE, indexes=[hist_all_runs(NAMESPACE)], dry_run=False
    )
    assert (await scripts.prune_indexes(indexes)).missing == (gone,)
    assert await redis.lrange(hist_all_runs(NAMESPACE), 0, -1) == [new.encode()]


async def test_lengths_gives_each_values_length_and_place_in_the_order_asked(redis):
    run = await start_run(redis, "lengths")
    keys = RunKeys(run)
    await redis.hset(keys.outputs, mapping={"a": b"x" * 70_000, "b": b"yy"})
    await redis.set(keys.output("big"), b"q" * 100_000)  # a large output, under its own key
    await redis.hset(keys.constants, "c", b"zzz")
    asked = [
        (keys.outputs, "b"),
        (keys.constants, "c"),
        (keys.outputs, "gone"),
        (keys.outputs, "big"),
        (keys.outputs, "a"),
    ]
    call = LengthsCall(asked)
    assert call.keys()[6:8] == [keys.outputs, keys.output("big")]
    reply = await Scripts(redis).call(call)
    assert reply.lengths == (2, 3, 0, 100_000, 70_000)
    assert reply.apart == (False, False, False, True, False)


async def test_cleanup_removes_every_key_of_a_pool_and_of_a_run(redis):
    """What the local runtime and the operator delete when a pool or a run goes: every key
    the scripts made for them, the dynamic ones included, and nothing of another run."""
    run = await start_run(redis, "doomed", tasks_total=4)
    other = await start_run(redis, "kept")
    keys, pool = RunKeys(run), PoolKeys(POOL)
    # A completion that queues, fills a bound worker's inbox and claim, and a pre-load list.
    await Scripts(redis).complete(
        CompleteCall(
            run_id=run,
            pool=POOL,
            worker_id="pod-1",
            logical_worker=None,
            memory_mib=512,
            run_ttl_s=600,
            completions=(
                Completion(
                    "a",
                    "{}",
                    "a",
                    b"out",
                    5.0,
                    (
                        Downstream("b", 1, 512),
                        Downstream("c", 1, 1024),
                        Downstream("d", 1, 512, worker="w2", preload_host="h"),
                    ),
                ),
            ),
        )
    )
    await redis.hset(pool.workers, "pod-1", 512)
    await redis.zadd(pool.prewarm, {"req": 1.0})
    await redis.rpush(worker_proc("pod-2", POOL), invocation(run, ["x"]))  # never registered
    assert await redis.keys(f"{keys.prefix}:inbox:*") and await redis.keys(f"{pool.prefix}:q:*")

    await delete_pool_keys(redis, POOL, ["pod-2"])
    await redis.set("dk:ns:team-a:message:doomed", "x")
    await delete_run_keys(redis, run, "dk:ns:team-a:message:doomed")
    left = sorted(k.decode() for k in await redis.keys("*"))
    # The run's history stays (it has limits of its own), and the other run is untouched.
    assert left == sorted([hist_run(run, "tasks"), RunKeys(other).meta])
