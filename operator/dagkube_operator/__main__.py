"""``python -m dagkube_operator``: the dagkube Kubernetes operator (kopf, standalone).

Settings come from the environment (see :mod:`dagkube_operator.config`); ``--help`` lists them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
from typing import Any

import kopf

from dagkube import __version__
from dagkube.errors import DagkubeError
from dagkube.kubernetes.backend import connect as connect_api
from dagkube.metrics.exporter import RunHistoryCollector
from dagkube.runtime.connection import connect as connect_redis
from dagkube.runtime.connection import redact, sync_client
from dagkube_operator import config as config_module
from dagkube_operator.config import ConfigError, OperatorConfig
from dagkube_operator.handlers import Operator, register
from dagkube_operator.metrics import HealthServer, OperatorMetrics

log = logging.getLogger("dagkube.operator")
FINALIZER = "dagkube.io/cleanup"
USER_AGENT = "dagkube-operator"  # its own API requests; kopf's say "kopf/<version>"


def settings_for(config: OperatorConfig) -> kopf.OperatorSettings:
    settings = kopf.OperatorSettings()
    # One operator at a time (the chart's Deployment: 1 replica, Recreate): no peering.
    settings.peering.standalone = True
    settings.peering.mandatory = False
    # Namespaces are given, not discovered (the chart's Role is namespaced).
    settings.scanning.disabled = True
    # kopf waits this long for more events of one object before handling them (0.1 s by
    # default), once for the event that adds the finalizer and once more for the create: a
    # Workflow changes rarely, so 20 ms coalesces enough and takes ~0.16 s off each start.
    settings.batching.batch_window = 0.02
    # Watches end server-side after this long and are renewed; the client gives up a little
    # later, so a connection that silently stalls is noticed and replaced.
    settings.watching.server_timeout = config.watch_timeout_s
    settings.watching.client_timeout = config.watch_timeout_s + 30
    settings.watching.connect_timeout = 30
    settings.networking.request_timeout = 60
    settings.persistence.finalizer = FINALIZER
    # Events the handlers post (kopf.info/warn); log lines are not posted as Events.
    settings.posting.level = logging.INFO
    return settings


async def _redis_when_ready(config: OperatorConfig) -> Any:
    """Connect to Redis, waiting (and saying so) while it is not up yet."""
    delay = 1.0
    while True:
        try:
            return await connect_redis(config.redis_url)
        except DagkubeError as exc:
            log.warning("Redis %s: %s; retrying in %.0fs", redact(config.redis_url), exc, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 30.0)


async def run(config: OperatorConfig, stop_flag: asyncio.Event | None = None) -> None:
    metrics = OperatorMetrics()
    holder: dict[str, Any] = {}
    ready = asyncio.Event()

    async def redis_ok() -> Any:
        redis = holder.get("redis")
        if redis is None:
            return "not connected yet"
        return bool(await redis.ping())

    server = HealthServer(metrics, ready.is_set, redis_ok, config.metrics_port)
    await server.start()
    log.info("serving /metrics and /healthz on port %d", config.metrics_port)
    api = None
    try:
        redis = holder["redis"] = await _redis_when_ready(config)
        # The run history of every Workflow (and local runs sharing this Redis) on /metrics,
        # with the live state of the pools of Running Workflows.
        metrics.registry.register(
            RunHistoryCollector(
                sync_client(config.redis_url),
                metrics.pools,
                workers_alive=metrics.workers_alive,
            )
        )
        api = await connect_api(config.kube_api_url, user_agent=f"{USER_AGENT}/{__version__}")
        operator = Operator(config=config, redis=redis, api=api, metrics=metrics)
        registry = kopf.OperatorRegistry()
        register(registry, operator)

        @kopf.on.login(registry=registry)
        def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
            if config.kube_api_url:
                return kopf.ConnectionInfo(server=config.kube_api_url, insecure=True)
            with contextlib.suppress(Exception):
                info = kopf.login_with_service_account(**kwargs)
                if info is not None:
                    return info
            return kopf.login_with_kubeconfig(**kwargs)

        log.info(
            "dagkube operator: watching %s, Redis %s, worker image %s",
            f"namespace {config.namespace!r}" if config.namespace else "every namespace",
            redact(config.redis_url),
            config.worker_image,
        )
        await kopf.operator(
            registry=registry,
            settings=settings_for(config),
            standalone=True,
            clusterwide=config.namespace is None,
            namespaces=[config.namespace] if config.namespace else (),
            ready_flag=ready,
            stop_flag=stop_flag,
        )
    finally:
        await server.stop()
        if api is not None:
            await api.close()
        if "redis" in holder:
            await holder["redis"].aclose()


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args and args[0] in ("-h", "--help"):
        print(__doc__)
        print(config_module.__doc__)
        return 0
    if args:
        print(f"unexpected arguments {args!r}: settings come from the environment (see --help)")
        return 2
    level = os.environ.get("DAGKUBE_LOG_LEVEL", "INFO").strip().upper() or "INFO"
    if level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        print(f"DAGKUBE_LOG_LEVEL={level!r}: use DEBUG, INFO, WARNING or ERROR", file=sys.stderr)
        return 2
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = OperatorConfig.from_env()
    except ConfigError as exc:
        print(f"dagkube operator: {exc}", file=sys.stderr)
        return 2
    asyncio.run(run(config))
    return 0


if __name__ == "__main__":
    sys.exit(main())
