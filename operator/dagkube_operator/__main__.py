"""``python -m dagkube_operator``: the dagkube Kubernetes operator (kopf).

Alone, or as one of several replicas that share a kopf peering object: then the oldest live
replica acts and the others stand by, paused, until its record expires.

Settings come from the environment (see :mod:`dagkube_operator.config`); ``--help`` lists them.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import kopf

from dagkube import __version__
from dagkube.errors import DagkubeError
from dagkube.kubernetes.backend import connect as connect_api
from dagkube.metrics.exporter import RunHistoryCollector
from dagkube.store.connection import connect as connect_redis
from dagkube.store.connection import redact, sync_client
from dagkube.store.keys import NAMESPACES
from dagkube_operator import config as config_module
from dagkube_operator.config import ConfigError, OperatorConfig
from dagkube_operator.core import Operator
from dagkube_operator.handlers import register
from dagkube_operator.metrics import HealthServer, OperatorMetrics

log = logging.getLogger("dagkube.operator")
FINALIZER = "dagkube.io/cleanup"
USER_AGENT = "dagkube-operator"  # its own API requests; kopf's say "kopf/<version>"


PEERING_LOGGER = "kopf._core.engines.peering"


def peering_priority() -> int:
    """This replica's kopf peering priority: the older a replica, the higher, so a replica
    that starts (a rolling update, a replacement) stands by while the one acting lives, and
    the acting one never has to hand over to a newcomer. Microseconds: two replicas starting
    together still differ (an equal priority would pause both)."""
    return -(time.time_ns() // 1000)


class PeeringState(logging.Filter):
    """Whether kopf lets this replica act: it pauses and resumes the whole operator as peers
    come and go, and says so on its peering logger (these lines are logged whatever the
    level); we follow them to serve the run history on /metrics from the acting replica only
    (several replicas serving it would double every sum on the dashboards)."""

    def __init__(self, peering: bool) -> None:
        super().__init__()
        self.active = not peering  # with peering kopf starts paused, until the first check
        self.logger = logging.getLogger(PEERING_LOGGER)
        self._level = self.logger.level

    def attach(self) -> None:
        # kopf says it at INFO: the logger must pass INFO even when the operator logs less.
        self.logger.setLevel(min(self.logger.getEffectiveLevel(), logging.INFO))
        self.logger.addFilter(self)

    def detach(self) -> None:
        self.logger.removeFilter(self)
        self.logger.setLevel(self._level)

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if message.startswith("Pausing"):
            self.active = False
            log.info("standing by: another replica acts (%s)", message)
        elif message.startswith("Resuming"):
            self.active = True
            log.info("acting: no older replica is alive")
        return True


class WhenActive:
    """A collector that collects only while this replica acts."""

    def __init__(self, collector: Any, active: Callable[[], bool]) -> None:
        self.collector = collector
        self.active = active

    def collect(self) -> Iterator[Any]:
        if self.active():
            yield from self.collector.collect()


def settings_for(config: OperatorConfig, priority: int = 0) -> kopf.OperatorSettings:
    settings = kopf.OperatorSettings()
    if config.peering is None:  # one operator at a time (the chart: 1 replica, Recreate)
        settings.peering.standalone = True
        settings.peering.mandatory = False
    else:  # replicas: the oldest acts, the others stand by (paused) until it is gone
        settings.peering.standalone = False
        settings.peering.mandatory = True  # start paused, until the peers are known
        settings.peering.name = config.peering
        settings.peering.priority = priority
        settings.peering.lifetime = config.peering_lifetime_s
        settings.peering.stealth = True  # no log line per keep-alive
    # Namespaces are given, not discovered (the chart's Role is namespaced).
    settings.scanning.disabled = True
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
    peering = PeeringState(config.peering is not None)
    peering.attach()
    metrics.active.set_function(lambda: float(peering.active))
    priority = peering_priority()
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
    operator: Operator | None = None
    try:
        redis = holder["redis"] = await _redis_when_ready(config)
        # The run history of every Workflow (and local runs sharing this Redis) on /metrics,
        # with the live state of the pools of Running Workflows.
        store = sync_client(config.redis_url)
        history = RunHistoryCollector(
            store,
            metrics.pools,
            workers_alive=metrics.workers_alive,
            # Each namespace's runs write their history under its prefix (their workers'
            # Redis users may touch nothing else): fold every namespace that ran Workflows.
            namespaces=lambda: sorted(
                n.decode() if isinstance(n, bytes) else n for n in store.smembers(NAMESPACES)
            ),
        )
        metrics.registry.register(WhenActive(history, lambda: peering.active))
        api = await connect_api(config.kube_api_url, user_agent=f"{USER_AGENT}/{__version__}")
        operator = Operator(config=config, redis=redis, api=api, metrics=metrics)
        registry = kopf.OperatorRegistry()
        register(registry, operator)

        @kopf.on.login(registry=registry)
        def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
            if config.kube_api_url:
                return kopf.ConnectionInfo(server=config.kube_api_url, insecure=True)
            try:  # None outside a Pod (no token file): a kubeconfig then
                info = kopf.login_with_service_account(**kwargs)
            except OSError as exc:  # its token or namespace file unreadable
                log.warning("cannot read the service account (%s): trying a kubeconfig", exc)
                info = None
            return info if info is not None else kopf.login_with_kubeconfig(**kwargs)

        log.info(
            "dagkube operator: watching %s, Redis %s, worker image %s, %s",
            f"namespace {config.namespace!r}" if config.namespace else "every namespace",
            redact(config.redis_url),
            config.worker_image,
            f"peering {config.peering!r} (priority {priority}, standing by until it acts)"
            if config.peering
            else "standalone",
        )
        await kopf.operator(
            registry=registry,
            settings=settings_for(config, priority),
            standalone=config.peering is None,
            clusterwide=config.namespace is None,
            namespaces=[config.namespace] if config.namespace else (),
            ready_flag=ready,
            stop_flag=stop_flag,
        )
    finally:
        peering.detach()
        if operator is not None:  # the pools' scalers; their Pods stay for the next operator
            await operator.pools.close()
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
