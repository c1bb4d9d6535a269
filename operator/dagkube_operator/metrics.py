"""The operator's own metrics and its HTTP endpoints: ``/metrics`` (Prometheus text format)
and ``/healthz`` (the Deployment's liveness and readiness probe)."""

from __future__ import annotations

import asyncio
import time
from collections import Counter as Tally
from collections.abc import Callable, Iterable
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from dagkube.kubernetes.workflow_cr import Phase


class _PhaseCollector:
    """``dagkube_operator_workflows{phase}``: Workflows this operator knows, by phase."""

    def __init__(self, phases: Callable[[], dict[str, str]]) -> None:
        self._phases = phases

    def collect(self) -> Iterable[GaugeMetricFamily]:
        counts = Tally(self._phases().values())
        family = GaugeMetricFamily(
            "dagkube_operator_workflows",
            "Workflows the operator watches, by phase",
            labels=["phase"],
        )
        for phase in Phase:
            family.add_metric([phase], counts.get(phase, 0))
        yield family


class OperatorMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.phases: dict[str, str] = {}  # Workflow uid -> phase
        self.registry.register(_PhaseCollector(lambda: dict(self.phases)))
        self.finished = Counter(
            "dagkube_operator_workflows_finished",
            "Workflows that reached a final phase",
            ["phase"],
            registry=self.registry,
        )
        self.pods_created = Counter(
            "dagkube_operator_pods_created",
            "Worker Pods created, by memory class (pre-warmed ones included)",
            ["memory_class"],
            registry=self.registry,
        )
        self.pods_prewarmed = Counter(
            "dagkube_operator_pods_prewarmed",
            "Worker Pods created ahead of demand for a pre-warm request",
            registry=self.registry,
        )
        self.errors = Counter(
            "dagkube_operator_errors",
            "Workflows failed before running, and handler errors, by reason",
            ["reason"],
            registry=self.registry,
        )
        self.api_errors = Counter(
            "dagkube_operator_api_errors",
            "Kubernetes API requests of the operator that failed, by operation",
            ["operation"],
            registry=self.registry,
        )
        self.reconcile_errors = Counter(
            "dagkube_operator_reconcile_errors",
            "Unexpected errors handling a Workflow (each ends it Failed, reason InternalError)",
            registry=self.registry,
        )
        # Worker pools the operator scales now (pool -> its backend): their queue depth and
        # workers by state are on /metrics (dagkube.metrics.exporter).
        self.live_pools: dict[str, Any] = {}
        self.planning_seconds = Histogram(
            "dagkube_operator_planning_seconds",
            "Time from a Workflow's first sight to its launched run (build, plan, launch)",
            buckets=(0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
            registry=self.registry,
        )
        self.active = Gauge(
            "dagkube_operator_active",
            "1 while this operator replica acts on Workflows, 0 while it stands by for an "
            "older one (kopf peering); the run history is served by the acting one only",
            registry=self.registry,
        )

    def set_phase(self, uid: str, phase: str | None) -> None:
        if phase:
            self.phases[uid] = phase

    def forget(self, uid: str) -> None:
        self.phases.pop(uid, None)

    def pools(self) -> list[str]:
        return list(self.live_pools)

    def workers_alive(self) -> list[Any]:
        """Workers the live pools' backends created and know alive."""
        return [handle for backend in list(self.live_pools.values()) for handle in backend.alive()]


class HealthServer:
    """aiohttp server on ``port``: ``/metrics`` and ``/healthz``. Healthy = the operator's
    event loop answers and kopf reported ready; Redis reachability is reported in the body
    (the operator keeps retrying while Redis is away, restarting it would not help)."""

    def __init__(
        self,
        metrics: OperatorMetrics,
        ready: Callable[[], bool],
        redis_ok: Callable[[], Any],
        port: int,
        host: str = "0.0.0.0",
    ) -> None:
        self.metrics = metrics
        self.ready = ready
        self.redis_ok = redis_ok
        self.port = port
        self.host = host
        self._runner: web.AppRunner | None = None
        self.started_at = time.time()

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/healthz", self._healthz)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _metrics(self, request: web.Request) -> web.Response:
        # The run-history collector reads Redis synchronously: off the event loop.
        body = await asyncio.to_thread(generate_latest, self.metrics.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _healthz(self, request: web.Request) -> web.Response:
        try:
            redis = await asyncio.wait_for(self.redis_ok(), 2.0)
        except Exception as exc:  # reported, not fatal
            redis = f"unreachable: {type(exc).__name__}: {exc}"
        ready = self.ready()
        body = {
            "status": "ok" if ready else "starting",
            "redis": "ok" if redis is True else str(redis),
            "uptime_s": round(time.time() - self.started_at, 1),
            "workflows": len(self.metrics.phases),
        }
        return web.json_response(body, status=200 if ready else 503)
