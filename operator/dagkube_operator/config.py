"""The operator's settings, from its environment (the Helm chart sets these variables).

Every variable, its meaning and its default:

- DAGKUBE_REDIS_URL: the Redis the operator and its workers share, with the operator's user
  name when it has one (the chart: redis://dagkube-operator@<release>-redis...) (required)
- DAGKUBE_REDIS_PASSWORD: the password of the URL's user (else the default user), when not in
  the URL (from the chart's Secret)
- DAGKUBE_WORKER_USERS: true: the workers of each namespace get a Redis user of their own,
  limited to that namespace's keys, made by the operator with a Secret `dagkube-worker-redis`
  in the namespace; false: every worker Pod gets the shared URL below (a Redis without ACL
  users) (true)
- DAGKUBE_REDIS_CA_FILE: with a TLS Redis (a rediss:// URL), the CA file (PEM) that signed
  its certificate: the operator copies it into each namespace's `dagkube-worker-redis` Secret
  (key ca.crt) and its worker and build Pods verify Redis with it; needs worker users (none)
- DAGKUBE_REDIS_URL_SECRET, DAGKUBE_REDIS_URL_SECRET_KEY: the Secret (name, key) holding the
  full URL for worker Pods without worker users (dagkube-redis, redis-url)
- DAGKUBE_WATCH_NAMESPACE: the namespace to watch; empty: every namespace (cluster-wide RBAC)
- DAGKUBE_WORKER_IMAGE: the worker image of Workflows without spec.image
  (ghcr.io/dagkube/worker:<version>)
- DAGKUBE_ALLOWED_CLASSES: memory classes Workflows may use, comma-separated (any from 128Mi
  to 16Gi)
- DAGKUBE_MAX_WORKERS: worker Pods per run without spec.resources.maxWorkers (50)
- DAGKUBE_MAX_WORKERS_LIMIT: the most worker Pods per run a Workflow may ask for in
  spec.resources.maxWorkers; above it the Workflow fails (MaxWorkersAboveLimit) (200)
- DAGKUBE_ALLOWED_IMAGES: spec.image values Workflows may use, comma-separated prefixes or
  glob patterns (registry.example.org/team/*); the worker image is always allowed (any image)
- DAGKUBE_ALLOWED_SOURCES: the spec.source kinds Workflows may use, comma-separated, of
  inline, module and ref; another ends the Workflow Failed (SourceNotAllowed) (all three)
- DAGKUBE_ALLOWED_MODULES: spec.source.module names Workflows may use, comma-separated:
  packages or modules (`team.flows` allows `team.flows.etl:build`), exact `mod:function`
  names or glob patterns; another ends the Workflow Failed (ModuleNotAllowed) (any module)
- DAGKUBE_WORKER_EPHEMERAL_STORAGE: ephemeral storage (request = limit, and the size limit
  of its /tmp emptyDir) of each worker Pod, a quantity like 512Mi or 2Gi (1Gi)
- DAGKUBE_IDLE_TIMEOUT: seconds an idle worker Pod waits for work before it exits; until
  then it serves the next Workflows of its shared pool as warm starts (30)
- DAGKUBE_STARTUP_DELAY: extra seconds each worker waits before serving, for experiments (0)
- DAGKUBE_BUILD_TIMEOUT: seconds a module or inline source may take to build its DAG in its
  build Pod, the Pod's start included (120)
- DAGKUBE_MAX_CONCURRENT_BUILDS: build Pods (user code building a DAG) at once; more
  Workflows wait for their turn in phase Planning (2)
- DAGKUBE_BUILD_MEMORY, DAGKUBE_BUILD_CPU: memory (a quantity, 512Mi) and CPU (cores, 0.5) of
  each build Pod, request = limit
- DAGKUBE_RUN_TTL: seconds a finished run's keys (its outputs) stay in Redis (3600)
- DAGKUBE_METRICS_PORT: port of /metrics and /healthz (8080)
- DAGKUBE_KUBE_API_URL: an API server URL without credentials, e.g. `kubectl proxy`'s
  (default: in-cluster service account, else the kubeconfig)
- DAGKUBE_WATCH_TIMEOUT: seconds before the API server ends a watch, which is then renewed;
  the client gives up 30 s later, so a silently stalled watch is replaced (300)
- DAGKUBE_PENDING_TIMEOUT: seconds a worker Pod may stay Pending for a reason of the
  scheduler's or the kubelet's (unschedulable, image pull failure, missing Secret) before its
  run fails with that reason (300); the reason is reported in .status within seconds
- DAGKUBE_DEFAULT_TIMEOUT: seconds a run may take when its Workflow sets no
  spec.timeoutSeconds; past it the run is cancelled and ends Failed, and the worker Pods
  still in its tasks are deleted; 0: no limit (3600)
- DAGKUBE_PEERING: the name of the kopf peering object (a KopfPeering in the watched
  namespace, a ClusterKopfPeering when watching every namespace) the operator's replicas
  share; only one replica acts at a time, the oldest; empty: no peering, this operator acts
  alone (empty)
- DAGKUBE_PEERING_LIFETIME: seconds a replica's peering record stays valid without a
  keep-alive; a replica killed without a goodbye is replaced by a standby this long after its
  last keep-alive (8; keep-alives come every 1-3 s at 8)
- DAGKUBE_LOG_LEVEL: DEBUG, INFO, WARNING or ERROR (INFO)
"""

from __future__ import annotations

import math
import os
import re
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TypeVar

from dagkube import __version__
from dagkube.errors import DagkubeError
from dagkube.kubernetes.pods import DEFAULT_EPHEMERAL_STORAGE_MIB
from dagkube.resources import parse_memory

N = TypeVar("N", int, float)
# A module allowlist entry: dotted names, an optional ':function', glob characters.
MODULE_PATTERN = re.compile(r"[A-Za-z0-9_.*?\[\]!-]+(:[A-Za-z0-9_*?\[\]!-]+)?")
# A DNS-1123 subdomain, what the API server accepts as an object's name.
PEERING_NAME = re.compile(
    r"(?=.{1,253}$)[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*"
)


class ConfigError(DagkubeError):
    """An operator setting is missing or malformed (named, with the accepted form)."""


@dataclass(frozen=True)
class OperatorConfig:
    redis_url: str
    redis_url_secret: tuple[str, str] = ("dagkube-redis", "redis-url")
    worker_users: bool = True  # a Redis user per namespace for its workers (else the shared URL)
    # A TLS Redis' CA (PEM file): copied into each namespace's worker Secret for its Pods.
    redis_ca_file: str | None = None
    namespace: str | None = None
    worker_image: str = f"ghcr.io/dagkube/worker:{__version__}"
    allowed_classes: list[int] | None = None
    max_workers: int = 50
    max_workers_limit: int = 200
    allowed_images: list[str] | None = None
    allowed_sources: frozenset[str] | None = None  # None: inline, module and ref
    allowed_modules: list[str] | None = None  # None: any module
    worker_ephemeral_storage_mib: int = DEFAULT_EPHEMERAL_STORAGE_MIB
    idle_timeout_s: float = 30.0
    startup_delay_s: float = 0.0
    build_timeout_s: float = 120.0
    max_concurrent_builds: int = 2
    build_memory_mib: int = 512
    build_cpu: float = 0.5
    run_ttl_s: int = 3600
    metrics_port: int = 8080
    kube_api_url: str | None = None
    watch_timeout_s: int = 300
    progress_every_s: float = 1.0
    cancel_grace_s: float = 10.0  # a cancelled run's workers get this long to stop by themselves
    pending_timeout_s: float = 300.0
    pending_report_after_s: float = 3.0  # a Pod stuck this long is reported (not a blip)
    default_timeout_s: float = 3600.0  # runs without spec.timeoutSeconds; 0: no limit
    peering: str | None = None  # kopf peering object shared by replicas; None: standalone
    peering_lifetime_s: int = 8

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> OperatorConfig:
        """The settings from ``environ`` (default: the process' environment); a ConfigError
        names the first variable that is missing or malformed and what it accepts."""
        env = os.environ if environ is None else environ
        url = env.get("DAGKUBE_REDIS_URL", "").strip()
        if not url:
            raise ConfigError(
                "DAGKUBE_REDIS_URL is not set: give the Redis URL the operator and its workers "
                "share, e.g. redis://dagkube-redis:6379/0"
            )
        password = env.get("DAGKUBE_REDIS_PASSWORD", "")
        allowed = env.get("DAGKUBE_ALLOWED_CLASSES", "").strip()
        try:
            allowed_classes = (
                sorted({parse_memory(v) for v in allowed.split(",") if v.strip()})
                if allowed
                else None
            )
        except DagkubeError as exc:
            raise ConfigError(f"DAGKUBE_ALLOWED_CLASSES={allowed!r}: {exc}") from exc
        allowed_images = _patterns(
            env,
            "DAGKUBE_ALLOWED_IMAGES",
            lambda pattern: not any(c.isspace() for c in pattern),
            "an image prefix or pattern (no spaces; separate patterns with commas)",
        )
        allowed_sources = _allowed_sources(env.get("DAGKUBE_ALLOWED_SOURCES", ""))
        allowed_modules = _patterns(
            env,
            "DAGKUBE_ALLOWED_MODULES",
            lambda pattern: MODULE_PATTERN.fullmatch(pattern) is not None,
            "a module, 'module:function' or glob pattern (separate them with commas)",
        )
        ephemeral_storage_mib = _memory_mib(
            env, "DAGKUBE_WORKER_EPHEMERAL_STORAGE", DEFAULT_EPHEMERAL_STORAGE_MIB
        )
        build_memory_mib = _memory_mib(env, "DAGKUBE_BUILD_MEMORY", cls.build_memory_mib)
        max_workers, max_workers_limit = _worker_counts(env)
        worker_users, redis_ca_file = _worker_users_and_ca(env)
        return cls(
            redis_url=with_password(url, password),
            redis_url_secret=(
                env.get("DAGKUBE_REDIS_URL_SECRET") or "dagkube-redis",
                env.get("DAGKUBE_REDIS_URL_SECRET_KEY") or "redis-url",
            ),
            namespace=env.get("DAGKUBE_WATCH_NAMESPACE", "").strip() or None,
            worker_image=env.get("DAGKUBE_WORKER_IMAGE") or cls.worker_image,
            allowed_classes=allowed_classes,
            max_workers=max_workers,
            max_workers_limit=max_workers_limit,
            allowed_images=allowed_images or None,
            allowed_sources=allowed_sources,
            allowed_modules=allowed_modules or None,
            worker_ephemeral_storage_mib=ephemeral_storage_mib,
            idle_timeout_s=_number(env, "DAGKUBE_IDLE_TIMEOUT", 30.0, float, 0.1),
            startup_delay_s=_number(env, "DAGKUBE_STARTUP_DELAY", 0.0, float, 0.0),
            build_timeout_s=_number(env, "DAGKUBE_BUILD_TIMEOUT", 120.0, float, 1.0),
            max_concurrent_builds=_number(env, "DAGKUBE_MAX_CONCURRENT_BUILDS", 2, int, 1),
            build_memory_mib=build_memory_mib,
            build_cpu=_number(env, "DAGKUBE_BUILD_CPU", 0.5, float, 0.001),
            run_ttl_s=_number(env, "DAGKUBE_RUN_TTL", 3600, int, 1),
            metrics_port=_number(env, "DAGKUBE_METRICS_PORT", 8080, int, 0),
            kube_api_url=env.get("DAGKUBE_KUBE_API_URL") or None,
            watch_timeout_s=_number(env, "DAGKUBE_WATCH_TIMEOUT", 300, int, 1),
            pending_timeout_s=_number(env, "DAGKUBE_PENDING_TIMEOUT", 300.0, float, 1.0),
            default_timeout_s=_number(env, "DAGKUBE_DEFAULT_TIMEOUT", 3600.0, float, 0.0),
            worker_users=worker_users,
            redis_ca_file=redis_ca_file,
            peering=_peering_name(env.get("DAGKUBE_PEERING", "")),
            peering_lifetime_s=_number(env, "DAGKUBE_PEERING_LIFETIME", 8, int, 2),
        )


def _patterns(
    env: Mapping[str, str], name: str, valid: Callable[[str], bool], expected: str
) -> list[str]:
    """A comma-separated allowlist; a ConfigError names the first entry that is not
    ``expected``."""
    text = env.get(name, "")
    patterns = [pattern.strip() for pattern in text.split(",") if pattern.strip()]
    for pattern in patterns:
        if not valid(pattern):
            raise ConfigError(f"{name}={text!r}: {pattern!r} is not {expected}")
    return patterns


def _memory_mib(env: Mapping[str, str], name: str, default: int) -> int:
    text = env.get(name, "").strip()
    try:
        return parse_memory(text) if text else default
    except DagkubeError as exc:
        raise ConfigError(f"{name}={text!r}: {exc}") from exc


def _worker_counts(env: Mapping[str, str]) -> tuple[int, int]:
    """The worker Pods per run by default, and the most a Workflow may ask for."""
    max_workers = _number(env, "DAGKUBE_MAX_WORKERS", 50, int, 1)
    max_workers_limit = _number(env, "DAGKUBE_MAX_WORKERS_LIMIT", 200, int, 1)
    if max_workers > max_workers_limit:
        raise ConfigError(
            f"DAGKUBE_MAX_WORKERS={max_workers} is above DAGKUBE_MAX_WORKERS_LIMIT="
            f"{max_workers_limit}: the default workers per run must be within the limit"
        )
    return max_workers, max_workers_limit


def _worker_users_and_ca(env: Mapping[str, str]) -> tuple[bool, str | None]:
    """Whether each namespace's workers get their own Redis user, and a TLS Redis' CA file."""
    worker_users = _boolean(env, "DAGKUBE_WORKER_USERS", True)
    redis_ca_file = env.get("DAGKUBE_REDIS_CA_FILE", "").strip() or None
    if redis_ca_file and not worker_users:
        # The CA reaches worker Pods in the namespace's worker Secret, made with its user.
        raise ConfigError(
            f"DAGKUBE_REDIS_CA_FILE={redis_ca_file!r} needs DAGKUBE_WORKER_USERS=true: "
            "worker Pods get the TLS Redis' CA with their namespace's worker user"
        )
    return worker_users, redis_ca_file


def _boolean(env: Mapping[str, str], name: str, default: bool) -> bool:
    text = env.get(name, "").strip().lower()
    if not text:
        return default
    if text not in ("true", "false"):
        raise ConfigError(f"{name}={env[name]!r}: give true or false")
    return text == "true"


def _allowed_sources(text: str) -> frozenset[str] | None:
    kinds = [kind.strip() for kind in text.split(",") if kind.strip()]
    if not kinds:
        return None
    unknown = [kind for kind in kinds if kind not in ("inline", "module", "ref")]
    if unknown:
        raise ConfigError(
            f"DAGKUBE_ALLOWED_SOURCES={text!r}: {unknown[0]!r} is not a source kind; give "
            "some of inline, module and ref, comma-separated"
        )
    return frozenset(kinds)


def _peering_name(text: str) -> str | None:
    name = text.strip()
    if not name:
        return None
    if not PEERING_NAME.fullmatch(name):
        raise ConfigError(
            f"DAGKUBE_PEERING={text!r} is not an object name: lowercase letters, digits, '-' "
            "and '.', starting and ending with a letter or digit, at most 253 characters"
        )
    return name


def _number(
    env: Mapping[str, str], name: str, default: N, kind: Callable[[str], N], minimum: float
) -> N:
    text = env.get(name, "").strip()
    if not text:
        return default
    value: N | None
    try:
        value = kind(text)
    except ValueError:
        value = None
    if value is None or not math.isfinite(value):  # float() takes 'nan' and 'inf' too
        raise ConfigError(f"{name}={text!r} is not {'an integer' if kind is int else 'a number'}")
    if value < minimum:
        raise ConfigError(f"{name}={text!r} must be >= {minimum:g}")
    return value


def with_password(url: str, password: str) -> str:
    """``url`` with ``password`` filled in for the URL's user (``redis://dagkube-operator@host``)
    or the default one, unless the URL carries a password already."""
    if not password:
        return url
    parts = urllib.parse.urlsplit(url)
    if parts.password is not None:
        return url
    user, _, host = parts.netloc.rpartition("@")
    quoted = urllib.parse.quote(password, safe="")
    return urllib.parse.urlunsplit(parts._replace(netloc=f"{user}:{quoted}@{host}"))
