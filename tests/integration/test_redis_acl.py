"""Redis users on a real redis-server: a namespace's worker credential runs whole workflows
(every script a worker calls, bound and flexible workers, optimizations, a failing task, the
history's caps) and is refused everything else: CONFIG, FLUSHALL, KEYS, DEBUG, and another
namespace's keys, directly and through a script. The operator's credential drives the runs
(launch, scaler, waiting, cancel, force-end, history, stored DAGs) and manages worker users.

The server's default user holds the admin password (``requirepass``), as in the chart; the
tests use it only to set up users and to look at what the runs left."""

from __future__ import annotations

import asyncio
import json
import re
import secrets
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import redis

import dagkube
from dagkube import planning
from dagkube.errors import RedisUnavailable
from dagkube.kubernetes.submit import store_dag
from dagkube.metrics.exporter import RunHistoryCollector
from dagkube.metrics.history import load_snapshot, run_ids
from dagkube.planning.options import PlanningOptions
from dagkube.resources import parse_classes
from dagkube.runtime import launcher
from dagkube.runtime.local_backend import LocalBackend
from dagkube.runtime.scaler import Scaler, WorkerExit, WorkerHandle
from dagkube.store import acl
from dagkube.store.calls import AddToRunCall, FailCall
from dagkube.store.connection import BulkReader, connect
from dagkube.store.keys import (
    HIST_ALL_RUNS,
    PoolKeys,
    RunKeys,
    hist_all_runs,
    hist_run,
    key_root,
    namespaced,
    stored_dag,
    worker_heartbeat,
    worker_proc,
)
from dagkube.store.scripts import call_sync
from tests.conftest import RedisServer
from tests.k8s.test_chart import Tools, only, tools  # noqa: F401  (the fixture)
from tests.tasks import add, total

pytestmark = pytest.mark.integration

NS_A, NS_B = "team-a", "team-b"
REFUSED = ("no permissions", "NOPERM", "can't access", "can't run")


@dagkube.task
def numbers(count: int) -> list[int]:
    return list(range(count))


@dagkube.task
def pick(values: list[int], index: int) -> int:
    return values[index] * 10


@dagkube.task
def explode(value: int) -> int:
    raise ValueError(f"refusing {value}")


@dataclass
class AclRedis:
    server: RedisServer
    passwords: dict[str, str] = field(default_factory=dict)  # user -> password

    def url(self, user: str) -> str:
        return acl.user_url(self.server.url, user, self.passwords[user])

    @property
    def operator_url(self) -> str:
        return self.url(acl.OPERATOR_USER)

    def worker_url(self, namespace: str) -> str:
        return self.url(acl.worker_user(namespace).name)

    def admin(self) -> redis.Redis:
        return self.server.client()

    @classmethod
    def with_users(cls, server: RedisServer, *namespaces: str) -> AclRedis:
        """The operator's user and a worker user per namespace, each with a new password, made
        on ``server`` with its admin (default) user."""
        setup = cls(server)

        async def create_users() -> None:
            admin = await connect(server.url)
            try:
                for user in (acl.operator_user(), *map(acl.worker_user, namespaces)):
                    setup.passwords[user.name] = acl.new_password()
                    await acl.apply_user(admin, user, [setup.passwords[user.name]])
            finally:
                await admin.aclose()

        asyncio.run(create_users())
        return setup


@pytest.fixture(scope="module")
def acl_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AclRedis]:
    server = RedisServer(tmp_path_factory.mktemp("acl-redis"))
    setup = AclRedis.with_users(server, NS_A, NS_B)
    yield setup
    server.stop()


def fan_out_in(count: int, name: str) -> dagkube.Workflow:
    values = numbers(count)
    picked = [pick(values, i) for i in range(count)]
    return dagkube.Workflow(add(total(picked), 1), name=name)


@dataclass
class Ran:
    run_id: str
    status: str
    outputs: object
    logs: str


async def run_in_namespace(
    setup: AclRedis,
    namespace: str,
    wf: dagkube.Workflow,
    planner: str,
    log_dir: Path,
    *,
    history_cap: int = 100,
) -> Ran:
    """As the operator does: launch with the operator's credential into the namespace's pool,
    scale workers that hold the namespace's worker credential, wait for the end."""
    redis_client = await connect(setup.operator_url)
    token = secrets.token_hex(3)
    pool = namespaced(namespace, f"wf-{token}")
    log_dir.mkdir(parents=True, exist_ok=True)
    backend = LocalBackend(
        setup.worker_url(namespace), pool, log_dir, max_workers=3, idle_timeout_s=3, enforce=False
    )
    scaler = Scaler(redis_client, pool, backend)
    scaling = asyncio.create_task(scaler.run())
    reader = BulkReader(setup.operator_url)
    try:
        options = PlanningOptions(
            classes_mib=parse_classes([512, 1024]),
            history=await load_snapshot(redis_client, wf.structure_hash, namespace=namespace),
            max_workers=3,
            cpu_enforced=False,
        )
        plan = planning.plan(wf.dag, planner, options)
        run_id = await launcher.launch(
            redis_client,
            wf.dag,
            plan,
            pool,
            run_id=namespaced(namespace, f"{wf.name}-{token}"),
            history_cap=history_cap,
        )
        status = await launcher.wait_for_end(redis_client, run_id, timeout_s=90)
        outputs = (
            await launcher.fetch_outputs(reader, wf.dag, run_id) if status == "succeeded" else None
        )
    finally:
        scaler.stop()
        scaling.cancel()
        await backend.stop_all()
        reader.close()
        await redis_client.aclose()
    logs = "\n".join(p.read_text(errors="replace") for p in sorted(log_dir.glob("*.log")))
    return Ran(run_id, status, outputs, logs)


def all_keys(client: redis.Redis) -> set[str]:
    return {k.decode() for k in client.scan_iter(count=1000)}


def test_a_worker_credential_runs_whole_workflows_in_its_namespace(acl_redis, tmp_path):
    admin = acl_redis.admin()
    admin.acl_log_reset()
    before = all_keys(admin)

    async def scenario() -> list[Ran]:
        ran = []
        # flexible workers with clustering, delayed I/O and pre-warming; then bound workers
        # (inboxes, claims, waiting) with pre-loading; then a failing task (FAIL, stop
        # tokens); the last runs keep one run per structure, so their ends drop earlier
        # history (the history scripts' drop paths)
        for planner, wf, cap in (
            ("wukong-opt", fan_out_in(4, "acl-fan"), 100),
            ("uniform-opt", fan_out_in(4, "acl-fan"), 1),
            ("uniform", fan_out_in(3, "acl-small"), 100),
            ("wukong", dagkube.Workflow(add(explode(1), 1), name="acl-fail"), 1),
        ):
            ran.append(
                await run_in_namespace(
                    acl_redis, NS_A, wf, planner, tmp_path / f"logs-{len(ran)}", history_cap=cap
                )
            )
        return ran

    wukong, uniform, small, failing = asyncio.run(scenario())
    assert (wukong.status, wukong.outputs) == ("succeeded", 61)
    assert (uniform.status, uniform.outputs) == ("succeeded", 61)
    assert (small.status, small.outputs) == ("succeeded", 31)
    assert failing.status == "failed"
    for ran in (wukong, uniform, small, failing):
        assert not any(word in ran.logs for word in REFUSED), ran.logs[-3000:]
        assert ran.run_id.startswith(f"{NS_A}.")
    # Nothing was refused, not even what a client swallows (a pipeline whose MULTI is refused
    # runs its commands one by one and only then fails). Except CLIENT SETINFO, which redis-py
    # sends on connecting and whose refusal it ignores (allowing it would make the rules fail
    # on Redis 7.0 and 7.1, which do not know that subcommand).
    assert refused_so_far(admin) == set()
    error = json.loads(admin.hget(hist_run(failing.run_id, "meta"), "error"))
    assert (error["exc_type"], error["message"]) == ("ValueError", "refusing 1")
    # Everything the runs wrote lies in the namespace: its runs, pools, workers and history.
    created = all_keys(admin) - before
    assert created, "the runs left no keys at all"
    outside = sorted(k for k in created if not k.startswith(key_root(NS_A)))
    assert outside == [], outside
    history = [r.decode() for r in admin.lrange(hist_all_runs(NS_A), 0, -1)]
    assert failing.run_id in history and small.run_id in history
    assert wukong.run_id not in history, "history_cap=1 should have dropped the first run"
    assert not admin.exists(hist_run(wukong.run_id, "meta"))
    assert admin.llen(HIST_ALL_RUNS) == 0, "a namespace's runs went into the local history"
    # /metrics, with the operator's credential: the namespace's history is folded
    client = redis.Redis.from_url(acl_redis.operator_url)
    try:
        assert folded_runs(RunHistoryCollector(client)) == 0
        assert folded_runs(RunHistoryCollector(client, namespaces=[NS_A])) == len(history)
    finally:
        client.close()


def refused_so_far(admin: redis.Redis) -> set[tuple[str, str]]:
    """(user, command or key) refused since the ACL log was reset (failed logins aside).
    Except CLIENT SETINFO, which redis-py sends on connecting and whose refusal it ignores
    (allowing it would make the rules fail on Redis 7.0 and 7.1, which do not know it)."""
    return {
        (entry["username"], entry["object"])
        for entry in admin.acl_log(count=1000)
        if entry["reason"] != "auth" and entry["object"] != "client"
    }


def folded_runs(collector: RunHistoryCollector) -> float:
    return sum(
        sample.value
        for family in collector.collect()
        for sample in family.samples
        if sample.name == "dagkube_runs_total"
    )


def refusals(client: redis.Redis, other_run: str) -> dict[str, str | None]:
    """Each probe: the error it got (None: allowed). Dangerous commands, listing keys, and
    reading, writing or scripting another namespace's run."""
    other = RunKeys(other_run)
    fail = FailCall(run_id=other_run, task_id="t", record_json="{}", error_json="{}")
    add_to_run = AddToRunCall(run_id=other_run, increments={"gb_s": 1})
    probes = {
        "CONFIG GET": lambda: client.config_get("*"),
        "FLUSHALL": lambda: client.execute_command("FLUSHALL", "ASYNC"),
        "FLUSHDB": lambda: client.execute_command("FLUSHDB", "ASYNC"),
        "KEYS": lambda: client.keys("*"),
        "SCAN": lambda: client.scan(0),
        "DEBUG": lambda: client.execute_command("DEBUG", "SLEEP", "0"),
        "EVAL": lambda: client.eval("return 1", 0),
        "ACL SETUSER": lambda: client.execute_command("ACL", "SETUSER", "intruder", "on"),
        "GET other dag": lambda: client.get(other.dag),
        "HGETALL other meta": lambda: client.hgetall(other.meta),
        "HGETALL other history": lambda: client.hgetall(hist_run(other_run, "meta")),
        "RPUSH other result": lambda: client.rpush(other.result, "succeeded"),
        "DEL other meta": lambda: client.delete(other.meta),
        "EVALSHA FAIL on other run": lambda: call_sync(client, fail),
        "EVALSHA ADD_TO_RUN on other run": lambda: call_sync(client, add_to_run),
        "GET stored DAG": lambda: client.get(stored_dag("any")),
        "GET local run": lambda: client.hgetall(RunKeys("local-run").meta),
        "LRANGE local history": lambda: client.lrange(HIST_ALL_RUNS, 0, -1),
    }
    found: dict[str, str | None] = {}
    for name, probe in probes.items():
        try:
            probe()
            found[name] = None
        except redis.exceptions.ResponseError as exc:
            found[name] = str(exc)
    return found


def test_a_worker_credential_is_refused_outside_its_namespace(acl_redis):
    admin = acl_redis.admin()

    async def launch_b() -> str:
        operator = await connect(acl_redis.operator_url)
        try:
            wf = fan_out_in(2, "acl-secret")
            plan = planning.plan(wf.dag, "wukong")
            return await launcher.launch(
                operator, wf.dag, plan, namespaced(NS_B, "wf-b"), run_id=namespaced(NS_B, "secret")
            )
        finally:
            await operator.aclose()

    other_run = asyncio.run(launch_b())
    admin.hset(hist_run(other_run, "meta"), "status", "running")  # a history record to read
    keys_before = admin.dbsize()
    meta_before = admin.hgetall(RunKeys(other_run).meta)
    worker_a = redis.Redis.from_url(acl_redis.worker_url(NS_A))
    try:
        assert worker_a.ping()  # the credential itself works
        found = refusals(worker_a, other_run)
    finally:
        worker_a.close()
    allowed = [name for name, error in found.items() if error is None]
    assert allowed == [], f"worker of {NS_A} was allowed: {allowed}"
    for name, error in found.items():
        assert error is not None and any(word in error for word in REFUSED), (name, error)
    # Nothing changed: no flush, no write into the other namespace's run.
    assert admin.dbsize() == keys_before
    assert admin.hgetall(RunKeys(other_run).meta) == meta_before
    assert admin.llen(RunKeys(other_run).result) == 0
    # Its own namespace: allowed, the same commands.
    own = redis.Redis.from_url(acl_redis.worker_url(NS_A))
    try:
        own.set(f"{key_root(NS_A)}probe", "1")
        assert own.get(f"{key_root(NS_A)}probe") == b"1"
        own.delete(f"{key_root(NS_A)}probe")
    finally:
        own.close()


def test_the_probes_catch_a_permissive_user(acl_redis):
    """The refusals above come from the rules, not from the probes: a user allowed
    everything (``+@all ~*``) passes every probe."""
    admin = acl_redis.admin()
    password = acl.new_password()
    admin.execute_command(
        "ACL", "SETUSER", "too-broad", "reset", "on", f">{password}", "+@all", "~*", "&*"
    )
    client = redis.Redis.from_url(acl.user_url(acl_redis.server.url, "too-broad", password))
    try:
        found = refusals(client, namespaced(NS_B, "nothing-here"))
    finally:
        client.close()
        admin.execute_command("ACL", "DELUSER", "too-broad")
    assert [name for name, error in found.items() if error is not None] == []


def test_the_operator_credential_drives_runs_and_manages_worker_users(acl_redis, tmp_path):
    admin = acl_redis.admin()
    admin.acl_log_reset()

    async def scenario() -> dict[str, object]:
        operator = await connect(acl_redis.operator_url)
        submitter = await connect(acl_redis.server.url)
        try:
            # a stored DAG (the SDK's submit; the operator reads it for spec.source.ref)
            wf = fan_out_in(2, "acl-operator")
            key = stored_dag(await store_dag(submitter, wf.dag))
            stored = (await operator.type(key), await operator.get(key) is not None)
            # a worker of team-b takes the run's invocation and is lost: the scaler re-queues
            # it (REQUEUE, with the worker's keys in the pool's namespace)
            pool = PoolKeys(namespaced(NS_B, "wf-cancelled"))
            run_id = await launcher.launch(
                operator,
                wf.dag,
                planning.plan(wf.dag, "wukong"),
                pool.pool,
                run_id=namespaced(NS_B, "cancelled"),
            )
            assert await launcher.renew(operator, run_id)
            worker = await connect(acl_redis.worker_url(NS_B))
            proc, beat = worker_proc("w-lost", pool.pool), worker_heartbeat("w-lost", pool.pool)
            [memory] = [int(m) for m in await operator.smembers(pool.classes)]
            taken = await worker.blmove(pool.queue(memory), proc, 1, "LEFT", "RIGHT")
            await worker.set(beat, "1")
            await worker.aclose()
            backend = LocalBackend("", pool.pool, tmp_path / "logs", enforce=False)
            scaler = Scaler(operator, pool.pool, backend)
            await scaler._on_exit(WorkerExit(WorkerHandle("w-lost", memory, 0.0), 1))
            requeued = (
                json.loads(await operator.lindex(pool.queue(memory), 0))["requeued_from"],
                await operator.exists(proc, beat),
                taken is not None,
            )
            # the run cancelled before another worker took it: CANCEL, FORCE_END (drops its
            # queue)
            ended = await launcher.cancel_and_end(operator, run_id, "test", grace_s=0)
            snapshot = await load_snapshot(operator, wf.structure_hash, namespace=NS_B)
            ids = await run_ids(operator, namespace=NS_B)
            # clean-up as the delete handler does
            keys = RunKeys(run_id)
            dynamic = [k.decode() for k in await operator.smembers(keys.keyset)]
            await operator.unlink(keys.meta, keys.dag, keys.plan, keys.result, *dynamic)
            # a new namespace's worker user, its rotation, and its removal
            password, url = await acl.ensure_worker_user(operator, acl_redis.server.url, "team-c")
            second = acl.new_password()
            await acl.ensure_worker_user(
                operator, acl_redis.server.url, "team-c", [password, second]
            )
            both = [await _can_ping(acl.user_url(url, "dagkube-worker-team-c", p))
                    for p in (password, second)]  # fmt: skip
            await acl.ensure_worker_user(operator, acl_redis.server.url, "team-c", [second])
            after = [await _can_ping(acl.user_url(url, "dagkube-worker-team-c", p))
                     for p in (password, second)]  # fmt: skip
            removed = await acl.delete_user(operator, "dagkube-worker-team-c")
            return {
                "stored": stored,
                "ended": ended,
                "history": (snapshot.runs, run_id in ids),
                "rotation": (both, after),
                "removed": removed,
                "requeued": requeued,
            }
        finally:
            await submitter.aclose()
            await operator.aclose()

    found = asyncio.run(scenario())
    assert found["stored"] == (b"string", True)
    assert found["ended"] == "cancelled"
    assert found["history"] == (0, True)  # cancelled: in the index, not a sample
    assert found["rotation"] == ([True, True], [False, True])
    assert found["removed"] is True
    assert found["requeued"] == ("w-lost", 0, True)
    assert refused_so_far(admin) == set()
    # the operator's own limits
    client = redis.Redis.from_url(acl_redis.operator_url)
    try:
        for command in (
            ("CONFIG", "GET", "*"),
            ("FLUSHALL",),
            ("KEYS", "*"),
            ("DEBUG", "SLEEP", "0"),
        ):
            with pytest.raises(redis.exceptions.NoPermissionError):
                client.execute_command(*command)
        with pytest.raises(redis.exceptions.NoPermissionError):
            client.get("not-dagkube")
    finally:
        client.close()


async def _can_ping(url: str) -> bool:
    try:
        client = await connect(url)
    except RedisUnavailable:
        return False
    await client.aclose()
    return True


# ---------------------------------------------------------------- the chart's bundled Redis
def test_the_charts_redis_gives_the_operator_a_user_of_its_own(tools: Tools, tmp_path):  # noqa: F811
    """The chart's Redis as `helm template` renders it (its arguments, with Kubernetes'
    $(VAR) filled from the Secret's passwords) on a real redis-server: the operator's user makes
    worker users and launches runs under dk:, and is refused FLUSHALL, CONFIG and KEYS; the
    default user keeps the admin password and every right."""
    [container] = only(tools.template(), "StatefulSet")["spec"]["template"]["spec"]["containers"]
    passwords = {
        "REDIS_PASSWORD": acl.new_password(),
        "REDIS_OPERATOR_PASSWORD": f"{acl.new_password()} with 'quotes\" and spaces",
    }
    args = [re.sub(r"\$\((\w+)\)", lambda m: passwords[m[1]], arg) for arg in container["args"]]
    args[args.index("--dir") + 1] = str(tmp_path)  # the volume's mount
    server = RedisServer(tmp_path, password=passwords["REDIS_PASSWORD"], args=args)
    operator_url = acl.user_url(server.url, acl.OPERATOR_USER, passwords["REDIS_OPERATOR_PASSWORD"])
    admin = server.client()
    admin.acl_log_reset()

    async def as_the_operator() -> tuple[str, bool]:
        operator = await connect(operator_url)
        try:
            _, worker_url = await acl.ensure_worker_user(operator, server.url, NS_A)
            wf = fan_out_in(2, "chart-redis")
            run_id = await launcher.launch(
                operator,
                wf.dag,
                planning.plan(wf.dag, "wukong"),
                namespaced(NS_A, "wf-chart"),
                run_id=namespaced(NS_A, "chart"),
            )
        finally:
            await operator.aclose()
        return run_id, await _can_ping(worker_url)

    try:
        run_id, worker_can_ping = asyncio.run(as_the_operator())
        assert worker_can_ping
        assert admin.hget(RunKeys(run_id).meta, "status") is not None
        assert refused_so_far(admin) == set()
        client = redis.Redis.from_url(operator_url)
        try:
            assert client.hget(RunKeys(run_id).meta, "status") is not None
            for command in (
                ("FLUSHALL",),
                ("CONFIG", "GET", "maxmemory"),
                ("KEYS", "*"),
                ("GET", "not-dagkube"),
            ):
                with pytest.raises(redis.exceptions.NoPermissionError):
                    client.execute_command(*command)
        finally:
            client.close()
        # the default user: the admin password, every right; not the operator's password
        assert admin.acl_whoami() == "default"
        assert admin.config_get("maxmemory") == {"maxmemory": str(768 * 1024 * 1024)}
        assert admin.set("not-dagkube", "1") and admin.exists(RunKeys(run_id).meta)
        wrong = redis.Redis(port=server.port, password=passwords["REDIS_OPERATOR_PASSWORD"])
        try:
            with pytest.raises(redis.exceptions.AuthenticationError):
                wrong.ping()
        finally:
            wrong.close()
    finally:
        admin.close()
        server.stop()
