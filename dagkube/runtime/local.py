"""LocalRuntime: Redis (embedded by default), the scaler and warm worker processes, kept alive
across runs. ``wf.run()`` without a runtime opens one for that run and closes it after."""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import logging
import os
import secrets
import threading
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

from redis import exceptions as redis_errors

from dagkube import planning
from dagkube.dag import DagSpec
from dagkube.errors import DagkubeError, RedisRestarted, RedisUnavailable, RunTimeout
from dagkube.metrics.history import SnapshotCache, load_snapshot, read_record
from dagkube.planning import PlanningOptions
from dagkube.planning.model import Plan
from dagkube.planning.options import DEFAULT_CLUSTER_SIZE
from dagkube.resources import DEFAULT_MAX_CPU, DEFAULT_MEMORY_PER_CPU_MIB
from dagkube.runtime import launcher
from dagkube.runtime.embedded import (
    EmbeddedRedis,
    dagkube_home,
    default_object_dir,
    make_private_dir,
)
from dagkube.runtime.local_backend import LocalBackend
from dagkube.runtime.scaler import Scaler
from dagkube.store import scripts
from dagkube.store.cleanup import delete_pool_keys
from dagkube.store.connection import BulkReader, ServerReplaced, ServerWatch, redact
from dagkube.store.objects import (
    STORE_URL_ENV,
    THRESHOLD_ENV,
    ObjectStore,
    ObjectStoreError,
    open_store,
    parse_threshold,
    sweep_orphans,
)
from dagkube.store.records import RunRecord, RunStatus

log = logging.getLogger("dagkube.runtime")
T = TypeVar("T")

# A timed-out run's workers get this long to stop at a task boundary; one busy in a long task
# never reaches one, so the run is then ended without it. Short: the caller is waiting.
DEFAULT_CANCEL_GRACE_S = 5.0
# Clean-up after an interruption or a lost Redis gives each Redis step this long: a stopped
# server must not keep Ctrl-C waiting (the run's keys expire by their TTL instead).
CLEANUP_STEP_S = 3.0


class LocalRuntime:
    """Runs workflows on worker processes of this machine.

    ``redis_url``: a Redis to use; default ``$DAGKUBE_REDIS_URL``, else the embedded server
    under ``$DAGKUBE_HOME``. ``max_workers``: cap on concurrent worker processes.
    ``idle_timeout_s``: an idle worker exits after this long (its next start is cold).
    ``startup_delay_s``: extra start-up per worker, to make local cold starts behave like Pods
    (it passes before the worker's imports, as a Pod's scheduling and container start do).
    ``cancel_grace_s``: after a run's timeout, how long its workers get to stop at a task
    boundary before the run is ended without them.
    ``history_cap``, ``history_structures``, ``history_retention_s``: the run history keeps
    this many runs per workflow structure, this many most recently run structures, and a
    structure not run for this long is dropped (docs/architecture.md, "History").
    ``enforce``: run every worker under its class's memory limit and CPU quota (a cgroup per
    worker). None (default): where this machine allows it (root, or a delegated cgroup v2
    subtree), else not, with a notice (``enforcement_note``); True: required; False: never.
    Plans follow: with enforcement, a class's CPU share speeds its tasks up or slows them down.
    ``object_store``: where outputs of at least ``object_threshold_bytes`` (default 1 MiB) go
    instead of Redis (``file:///dir``, ``s3://bucket/prefix?endpoint_url=…&region=…``, ``off``);
    default ``$DAGKUBE_OBJECT_STORE_URL``, else a directory of the embedded server's, else none
    (docs/architecture.md, "Large outputs and the object store").
    """

    def __init__(
        self,
        redis_url: str | None = None,
        *,
        home: str | Path | None = None,
        max_workers: int | None = None,
        idle_timeout_s: float = 30.0,
        startup_delay_s: float = 0.0,
        history_cap: int = launcher.DEFAULT_HISTORY_CAP,
        history_structures: int = scripts.DEFAULT_HISTORY_STRUCTURES,
        history_retention_s: int = scripts.DEFAULT_HISTORY_RETENTION_S,
        run_ttl_s: int = launcher.DEFAULT_RUN_TTL_S,
        memory_per_cpu_mib: int = DEFAULT_MEMORY_PER_CPU_MIB,
        max_cpu: float = DEFAULT_MAX_CPU,
        cancel_grace_s: float = DEFAULT_CANCEL_GRACE_S,
        enforce: bool | None = None,
        object_store: str | None = None,
        object_threshold_bytes: int | None = None,
    ) -> None:
        if max_workers is not None and max_workers < 1:
            raise DagkubeError(f"max_workers={max_workers} must be >= 1")
        if not 0 < idle_timeout_s <= 86400:  # also refuses nan
            raise DagkubeError(
                f"idle_timeout_s={idle_timeout_s} must be a number of seconds > 0 and <= 86400"
            )
        if history_cap < 1:
            raise DagkubeError(f"history_cap={history_cap} must be >= 1")
        if history_structures < 1:
            raise DagkubeError(f"history_structures={history_structures} must be >= 1")
        if history_retention_s < 1:
            raise DagkubeError(
                f"history_retention_s={history_retention_s} must be a number of seconds >= 1"
            )
        if not 0 <= cancel_grace_s < float("inf"):
            raise DagkubeError(f"cancel_grace_s={cancel_grace_s} must be a number of seconds >= 0")
        self.redis_url = redis_url or os.environ.get("DAGKUBE_REDIS_URL") or None
        self.home = Path(home).expanduser() if home else dagkube_home()
        self.max_workers = max_workers
        self.idle_timeout_s = idle_timeout_s
        self.startup_delay_s = startup_delay_s
        self.history_cap = history_cap
        self.history_structures = history_structures
        self.history_retention_s = history_retention_s
        self.run_ttl_s = run_ttl_s
        self.memory_per_cpu_mib = memory_per_cpu_mib
        self.max_cpu = max_cpu
        self.cancel_grace_s = cancel_grace_s
        self.enforce = enforce
        self.object_store_url = object_store or os.environ.get(STORE_URL_ENV) or None
        if object_threshold_bytes is None:
            object_threshold_bytes = parse_threshold(os.environ.get(THRESHOLD_ENV) or "")
        self.object_threshold_bytes = object_threshold_bytes
        self.objects: ObjectStore | None = None  # where large outputs go, once started
        self.pool = f"local-{os.getpid()}-{secrets.token_hex(3)}"
        self.url: str | None = None  # the server in use, once started
        self._redis_lost = False  # it stopped answering: clean-up skips its Redis steps
        self.watch: ServerWatch | None = None  # rides out outages, notices restarts
        self._embedded: EmbeddedRedis | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._scaler_task: concurrent.futures.Future | None = None
        self.redis: Any = None
        self.reader: BulkReader | None = None
        self.backend: LocalBackend | None = None
        self.scaler: Scaler | None = None
        self._active_runs: set[str] = set()
        self._history_cache = SnapshotCache()  # parsed runs of the history (immutable)

    # ----------------------------------------------------------------- lifecycle
    def __enter__(self) -> LocalRuntime:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def started(self) -> bool:
        return self._loop is not None

    def start(self) -> None:
        if self.started:
            return
        make_private_dir(self.home)
        url = self.redis_url
        if url is None:
            self._embedded = EmbeddedRedis(self.home)
            url = self._embedded.acquire()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="dagkube-runtime", daemon=True
        )
        self._thread.start()
        self.watch = ServerWatch(url)
        try:
            self.redis = self.call(self.watch.connect())
        except BaseException:
            self.close()
            raise
        self.url = url
        self.backend = LocalBackend(
            url,
            self.pool,
            self.home / "logs",
            max_workers=self.max_workers,
            idle_timeout_s=self.idle_timeout_s,
            memory_per_cpu_mib=self.memory_per_cpu_mib,
            max_cpu=self.max_cpu,
            startup_delay_s=self.startup_delay_s,
            enforce=self.enforce,
        )
        if self.backend.note:
            log.info("%s", self.backend.note)
        try:
            self.objects = self.backend.object_store = self._open_objects()
        except BaseException:
            self.close()
            raise
        self.reader = BulkReader(url, watch=self.watch, objects=self.objects)
        self.scaler = Scaler(self.redis, self.pool, self.backend)
        self._scaler_task = asyncio.run_coroutine_threadsafe(self.scaler.run(), self._loop)
        atexit.register(self.close)

    def close(self) -> None:
        """Cancel runs still going, stop workers and the scaler, release Redis."""
        loop = self._loop
        if loop is not None:
            try:
                reachable = self.redis is not None and not self._redis_lost
                for run_id in list(self._active_runs):
                    reachable = reachable and self._cleanup(
                        launcher.cancel(self.redis, run_id, "the runtime was closed"),
                        f"cancel run {run_id}",
                    )
                if self.scaler is not None:
                    self.scaler.stop()
                if self._scaler_task is not None:
                    self._scaler_task.cancel()
                if self.backend is not None:
                    self.call(self.backend.stop_all())
                for run_id in list(self._active_runs):
                    reachable = reachable and self._cleanup(
                        launcher.force_end(self.redis, run_id), f"end run {run_id}"
                    )
                    self._drop_objects(run_id)
                if reachable:
                    self._cleanup(self._forget_pool(), f"remove pool {self.pool}")
                if self.redis is not None:
                    self._cleanup(self.redis.aclose(), "close the connection")
                if self.reader is not None:
                    self.reader.close()
                    self.reader = None
            finally:
                loop.call_soon_threadsafe(loop.stop)
                if self._thread is not None:
                    self._thread.join(timeout=5)
                loop.close()
                self._loop = None
        if self._embedded is not None:
            self._embedded.release()
            self._embedded = None
        atexit.unregister(self.close)

    def _cleanup(self, step: Coroutine[Any, Any, Any], what: str) -> bool:
        """One Redis step of a clean-up, bounded in time; False (logged) if Redis did not
        answer, so the caller skips the steps after it."""
        try:
            self.call(step, timeout_s=CLEANUP_STEP_S)
            return True
        except (RedisUnavailable, TimeoutError) as exc:
            self._redis_lost = True
            reason = str(exc) or f"no answer within {CLEANUP_STEP_S:g}s"
            log.warning("cannot %s at %s: %s", what, redact(self.url or ""), reason)
            return False

    def _end_after_restart(self, message: str) -> None:
        """The server restarted under the runs being waited for: its append-only file may
        still hold them as running, with their queued work. End them there as failed (history
        written, keys expiring) and forget this runtime's pool, so that nothing waits for them
        or hands their work to a worker. Its workers exit on their own (their watch saw the
        restart) or are stopped by close()."""
        assert self.url is not None
        try:
            redis = self.call(ServerWatch(self.url).connect(), timeout_s=CLEANUP_STEP_S)
        except (RedisUnavailable, TimeoutError) as exc:
            log.warning("cannot end the runs on the restarted Redis: %s", exc or "no answer")
            return
        for run_id in list(self._active_runs):
            if self._cleanup(launcher.fail_run(redis, run_id, message), f"fail run {run_id}"):
                self._active_runs.discard(run_id)
        self._cleanup(self._forget_pool(redis), f"remove pool {self.pool}")
        self._cleanup(redis.aclose(), "close the connection")

    def _open_objects(self) -> ObjectStore | None:
        """The object store for large outputs: the one configured (``off``: none), else, with
        the embedded server, a directory of its own (:func:`default_object_dir`); none with
        another Redis. Objects of runs whose keys are gone are swept here."""
        url = self.object_store_url
        if url is None and self._embedded is not None:  # measured faster than its AOF
            assert self.backend is not None
            directory = default_object_dir(self.home, in_memory=not self.backend.enforced)
            make_private_dir(directory.parent)
            url = directory.as_uri()
        if not url or url == "off":
            return None
        objects = open_store(url, self.object_threshold_bytes)
        swept = self.call(sweep_orphans(self.redis, objects))
        if swept:
            log.info("removed the objects of %d ended runs from %s", len(swept), url)
        return objects

    def _drop_objects(self, run_id: str) -> None:
        """A run ended by this runtime, its workers stopped: nothing will read its objects."""
        if self.objects is None:
            return
        try:
            self.objects.delete_run(run_id)
        except ObjectStoreError as exc:  # the sweep of a later runtime takes them
            log.warning("run %s: its objects were not deleted: %s", run_id, exc)

    async def _forget_pool(self, redis: Any = None) -> None:
        spawned = self.backend.spawned_ids if self.backend is not None else ()
        await delete_pool_keys(redis or self.redis, self.pool, spawned)

    def call(self, coro: Coroutine[Any, Any, T], timeout_s: float | None = None) -> T:
        """Run a coroutine on the runtime's loop from this thread; Ctrl-C stays responsive."""
        loop = self._loop
        if loop is None:
            raise DagkubeError("The runtime is not started: use it as a context manager")
        future = asyncio.run_coroutine_threadsafe(coro, loop)
        try:
            while True:
                try:
                    return future.result(timeout=0.1 if timeout_s is None else timeout_s)
                except TimeoutError:
                    if timeout_s is not None:
                        raise
                    if not loop.is_running():  # closed by another thread: nothing will answer
                        future.cancel()
                        raise DagkubeError("The runtime was closed while this waited") from None
        except (redis_errors.ConnectionError, redis_errors.TimeoutError) as exc:
            # A server that died or stopped answering for longer than the watch's grace: one
            # clear error (the CLI exits 3), not a traceback from inside redis-py.
            self._redis_lost = True
            waited = f" (retried for {self.watch.grace_s:g}s)" if self.watch else ""
            raise RedisUnavailable(
                f"Lost the connection to Redis at {redact(self.url or '')}{waited}: {exc}"
            ) from None
        except ServerReplaced as exc:
            self._redis_lost = True  # the old server's state is gone: nothing to clean there
            raise RedisRestarted(str(exc)) from None
        except BaseException:
            future.cancel()
            raise

    # ----------------------------------------------------------------- runs
    def run(
        self,
        dag: DagSpec,
        plan: Plan,
        *,
        timeout_s: float | None = None,
        on_progress: Callable[[int, int], None] | None = None,
        on_launch: Callable[[str], None] | None = None,
    ) -> launcher.RunResult:
        """Launch a planned DAG and wait for it; returns outputs and the run's record.

        Past ``timeout_s`` the run is cancelled, its workers get ``cancel_grace_s`` to stop at a
        task boundary, then it is ended without them (recorded as cancelled, its keys expiring)
        and :class:`RunTimeout` is raised. A run that ended on its own meanwhile is returned as
        it ended.
        """
        if timeout_s is not None:
            timeout_s = launcher.check_timeout(timeout_s)
        self.start()
        run_id = self.call(
            launcher.launch(
                self.redis,
                dag,
                plan,
                self.pool,
                ttl_s=self.run_ttl_s,
                history_cap=self.history_cap,
                history_structures=self.history_structures,
                history_retention_s=self.history_retention_s,
                startup_delay_s=self.startup_delay_s,
                enforced=self.enforced,
                objects=self.objects,
            )
        )
        self._active_runs.add(run_id)
        if on_launch:
            on_launch(run_id)
        timed_out = False
        try:
            try:
                status = self.call(
                    launcher.wait_for_end(
                        self.redis, run_id, timeout_s=timeout_s, on_progress=on_progress
                    )
                )
            except RunTimeout:
                timed_out = True
                reason = f"timed out after {timeout_s:g}s (timeout)"
                log.info("run %s %s: cancelling", run_id, reason)
                status = self.call(
                    launcher.cancel_and_end(self.redis, run_id, reason, grace_s=self.cancel_grace_s)
                )
        except RedisRestarted:
            assert self.watch is not None
            message = (
                f"{self.watch.describe(f'during run {run_id}')}: the run was failed; run it again"
            )
            self._end_after_restart(message)
            raise RedisRestarted(message) from None
        except BaseException:
            self._cleanup(
                launcher.cancel(self.redis, run_id, "the waiting client stopped"),
                f"cancel run {run_id}",
            )
            raise
        self._active_runs.discard(run_id)
        if timed_out and status == RunStatus.CANCELLED:
            raise RunTimeout(f"Run {run_id} timed out after {timeout_s:g}s and was cancelled")
        record = self.call(launcher.fetch_run_record(self.redis, run_id))
        outputs = None
        if status == RunStatus.SUCCEEDED:
            assert self.reader is not None
            outputs = self.call(launcher.fetch_outputs(self.reader, dag, run_id))
        # This caller is the run's only consumer: its data need not wait for the TTL.
        self.call(launcher.drop_data(self.redis, run_id, self.objects))
        return launcher.RunResult(run_id=run_id, status=status, record=record, outputs=outputs)

    def plan(
        self,
        dag: DagSpec,
        planner: str = "auto",
        sla: str = "avg",
        classes: Any = None,
        *,
        cluster_size: int = DEFAULT_CLUSTER_SIZE,
        optimizations: Any = None,
        objective: str = "makespan",
        max_gb_s: float | None = None,
    ) -> Plan:
        """Plan with this runtime's history, its warm workers, worker cap and timeouts;
        ``objective`` and ``max_gb_s`` decide between the candidate plans."""
        self.start()
        options = PlanningOptions.for_run(
            classes,
            sla=sla,
            history=self.call(
                load_snapshot(self.redis, dag.structure_hash, cache=self._history_cache)
            ),
            memory_per_cpu_mib=self.memory_per_cpu_mib,
            max_cpu=self.max_cpu,
            max_workers=self.backend.max_workers if self.backend else self.max_workers,
            idle_timeout_s=self.idle_timeout_s,
            warm_pool=self.call(self._idle_workers()),
            startup_delay_s=self.startup_delay_s,
            cluster_size=cluster_size,
            cpu_enforced=self.enforced,  # with cgroups, a class's CPU share is all it gets
            optimizations=optimizations,
            objective=objective,
            max_gb_s=max_gb_s,
        )
        return planning.plan(dag, planner, options)

    async def _idle_workers(self) -> dict[int, int]:
        """Idle workers per class, for the planner's warm starts: only those whose process is
        alive. A stopped worker can leave its idle entry for a moment (seen right after
        :meth:`cool_down`, until the scaler reaps it), and a plan must not start warm on it."""
        assert self.backend is not None and self.scaler is not None
        alive = {handle.worker_id for handle in self.backend.alive()}
        idle = await self.scaler.idle_ids()
        counts = {memory: len(ids & alive) for memory, ids in idle.items()}
        return {memory: count for memory, count in counts.items() if count}

    @property
    def enforced(self) -> bool:
        """Workers run under their class's memory limit and CPU quota (see ``enforce``)."""
        self.start()
        assert self.backend is not None
        return self.backend.enforced

    @property
    def enforcement_note(self) -> str:
        """Why limits are not enforced ("" when they are)."""
        self.start()
        assert self.backend is not None
        return self.backend.note

    def cool_down(self) -> None:
        """Stop every worker (between runs they are idle), so the next run starts cold."""
        self.start()
        assert self.backend is not None
        self.call(self.backend.stop_all())

    def run_record(self, run_id: str) -> RunRecord | None:
        """A finished run's record as the history holds it now (late charges included)."""
        self.start()
        return self.call(read_record(self.redis, run_id))

    def worker_pids(self) -> dict[str, int]:
        """Worker processes alive now (tests kill one to check recovery)."""
        return self.backend.pids() if self.backend else {}
