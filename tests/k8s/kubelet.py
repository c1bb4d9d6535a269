"""A test kubelet: runs the Pods of one namespace of the API emulator as local processes.

``TestKubelet`` polls the namespace's Pods (one list request every ~50 ms) and plays the node:

* a new Pod (no process yet, no deletionTimestamp, not ended) gets its container's environment
  resolved (``value``, ``valueFrom.secretKeyRef``/``configMapKeyRef`` read through the API,
  ``valueFrom.fieldRef``, ``envFrom``, ``$(VAR)`` references), ``TMPDIR`` and ``HOME`` set to a
  fresh private directory (the Pod's emptyDir at /tmp), then its ``command`` + ``args`` run from
  the repository root (a leading ``python`` is this interpreter), output to a per-Pod log file;
  an unresolvable environment (e.g. a missing Secret) leaves the Pod Pending with a
  CreateContainerConfigError, retried on every poll, as a kubelet does;
* the Pod's status follows the process: Running (startTime, the container running), then
  Succeeded or Failed with the container's exit code (128 + signal when killed by a signal);
* a deleted Pod (gone, or with a deletionTimestamp) gets SIGTERM, then SIGKILL after its
  terminationGracePeriodSeconds (at most 10 s); its status is left alone from then on;
* ``kill(name)`` SIGKILLs a Pod's container (a crash, an OOM kill): the Pod goes Failed, 137.

Only the first container runs; restartPolicy is always taken as Never. Leaving the context
ends every process and waits for it: no process outlives the test, no zombie is left.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import os
import re
import signal
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import aiohttp

from tests.k8s.kmock_env import EmulatedCluster, now_rfc3339

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[2]
POLL_INTERVAL_S = 0.05
MAX_GRACE_S = 10.0
DEFAULT_GRACE_S = 30.0  # the Kubernetes default terminationGracePeriodSeconds
NO_COMMAND = "the test kubelet needs the container's command: it cannot run an image entrypoint"
_PYTHON = re.compile(r"^python(3(\.\d+)?)?$")
_VAR_REFERENCE = re.compile(r"\$\(([-._A-Za-z0-9]+)\)|\$\$")


class ContainerConfigError(Exception):
    """The container cannot start yet: its environment refers to something missing."""


@dataclass
class PodProcess:
    """The local process of one Pod (one container)."""

    name: str
    uid: str
    container: str
    process: asyncio.subprocess.Process
    log_path: Path
    grace_s: float
    started_at: str  # RFC 3339, as in the Pod status
    terminating: bool = False  # deleted Pod: its status is no longer ours to report
    supervisor: asyncio.Task[None] | None = field(default=None, repr=False)

    @property
    def running(self) -> bool:
        return self.process.returncode is None


def expand_references(text: str, env: Mapping[str, str]) -> str:
    """Kubernetes' ``$(VAR)`` expansion: defined variables are replaced, others kept as
    written; ``$$`` is a literal ``$``."""

    def replace(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        return env.get(match.group(1), match.group(0))

    return _VAR_REFERENCE.sub(replace, text)


def exit_code_of(returncode: int) -> int:
    """A process's return code as a container runtime reports it (SIGKILL -> 137)."""
    return returncode if returncode >= 0 else 128 - returncode


class TestKubelet:
    """Run the Pods of ``namespace`` as local processes (see the module docstring).

    ``extra_env`` is added to every container's environment last (e.g. DAGKUBE_TEST_SESSION,
    PYTHONPATH); DAGKUBE_TEST_SESSION is passed on from this process's environment anyway, so
    that the session's leftover-process check sees the workers. ``started`` maps a Pod name to
    the time.time() its process started.
    """

    __test__ = False  # not a test class, despite its name

    def __init__(
        self,
        cluster: EmulatedCluster,
        namespace: str,
        workdir: Path,
        extra_env: Mapping[str, str] | None = None,
        *,
        poll_interval_s: float = POLL_INTERVAL_S,
    ) -> None:
        self.cluster = cluster
        self.namespace = namespace
        self.workdir = Path(workdir)
        self.extra_env = dict(extra_env or {})
        self.poll_interval_s = poll_interval_s
        self.started: dict[str, float] = {}
        self._pods: dict[str, PodProcess] = {}  # the latest process of each Pod name
        self._retired: list[PodProcess] = []  # processes of Pods replaced by a namesake
        self._waiting: dict[str, str] = {}  # Pod uid -> why its container cannot start
        self._terminations: set[asyncio.Task[None]] = set()
        self._poller: asyncio.Task[None] | None = None
        self._starting: asyncio.Future[None] | None = None
        self._closing = False
        self._count = 0

    # ----- public API

    async def __aenter__(self) -> TestKubelet:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._poller = asyncio.create_task(self._poll(), name=f"test-kubelet {self.namespace}")
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()

    def kill(self, pod_name: str) -> None:
        """SIGKILL the Pod's container, as a crash or an OOM kill would end it."""
        record = self._pods.get(pod_name)
        if record is None or not record.running:
            raise ValueError(f"Pod {pod_name!r} has no running process to kill")
        self._signal(record, signal.SIGKILL, group=True)

    def log(self, pod_name: str) -> str:
        """The Pod's output so far (stdout and stderr), '' if it never ran."""
        record = self._pods.get(pod_name)
        if record is None or not record.log_path.exists():
            return ""
        return record.log_path.read_text(errors="replace")

    def logs(self) -> str:
        """Every Pod's output, headed by its name: for failure messages."""
        return "\n".join(f"--- Pod {name} ---\n{self.log(name)}" for name in sorted(self._pods))

    def process(self, pod_name: str) -> asyncio.subprocess.Process | None:
        """The Pod's local process (latest of that name), if it was started."""
        record = self._pods.get(pod_name)
        return None if record is None else record.process

    async def close(self) -> None:
        """Stop watching, end every process (SIGTERM, then SIGKILL after the grace period) and
        wait for all of them."""
        self._closing = True
        if self._poller is not None:
            self._poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poller
        if self._starting is not None:
            with contextlib.suppress(Exception):
                await self._starting
        records = [*self._pods.values(), *self._retired]
        await asyncio.gather(*(self._terminate(record) for record in records))
        await asyncio.gather(*self._terminations, return_exceptions=True)
        for record in records:
            if record.supervisor is not None:
                with contextlib.suppress(asyncio.CancelledError):
                    await record.supervisor

    # ----- the node loop

    async def _poll(self) -> None:
        while True:
            try:
                pods = await self.cluster.pods(self.namespace)
            except (aiohttp.ClientError, OSError) as exc:
                log.warning("test kubelet: cannot list Pods of %s: %s", self.namespace, exc)
            else:
                try:
                    await self._sync(pods)
                except Exception:  # a bug here must not silently stop the node
                    log.exception("test kubelet: cannot sync the Pods of %s", self.namespace)
            await asyncio.sleep(self.poll_interval_s)

    async def _sync(self, pods: Mapping[str, dict[str, Any]]) -> None:
        for name, pod in pods.items():
            uid = pod["metadata"].get("uid", "")
            record = self._pods.get(name)
            if record is not None and record.uid != uid:  # deleted, then created again
                self._retired.append(self._pods.pop(name))
                self._terminate_in_background(record)
                record = None
            deleting = bool(pod["metadata"].get("deletionTimestamp"))
            if record is None:
                ended = (pod.get("status") or {}).get("phase") in ("Succeeded", "Failed")
                if not deleting and not ended:
                    # Shielded: a close() meanwhile waits for it rather than orphan a process.
                    self._starting = asyncio.ensure_future(self._start(pod))
                    await asyncio.shield(self._starting)
            elif deleting and not record.terminating:
                self._terminate_in_background(record)
        for name, record in self._pods.items():
            if name not in pods and not record.terminating:
                self._terminate_in_background(record)

    # ----- starting

    async def _start(self, pod: dict[str, Any]) -> None:
        metadata, spec = pod["metadata"], pod.get("spec") or {}
        name, uid = metadata["name"], metadata.get("uid", "")
        containers = spec.get("containers") or []
        if not containers:
            return
        container = containers[0]
        try:
            env = await self._environment(pod, container)
        except ContainerConfigError as exc:
            if self._waiting.get(uid) != str(exc):
                self._waiting[uid] = str(exc)
                await self._report(name, self._waiting_status(container, str(exc)))
            return
        self._waiting.pop(uid, None)
        argv = [
            expand_references(part, env)
            for part in [*(container.get("command") or []), *(container.get("args") or [])]
        ]
        self._count += 1
        directory = self.workdir / f"{self._count:03d}-{name}"
        tmp = directory / "tmp"
        tmp.mkdir(parents=True)
        env.update({"TMPDIR": str(tmp), "HOME": str(tmp)})
        env.update(self.extra_env)
        log_path = directory / "container.log"
        if not argv:
            await self._report(name, self._failed(container, 128, "StartError", NO_COMMAND))
            return
        if self._closing:
            return
        if _PYTHON.match(argv[0]):
            argv[0] = sys.executable
        try:
            with log_path.open("wb") as output:
                process = await asyncio.create_subprocess_exec(
                    *argv,
                    cwd=ROOT,
                    env=env,
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=output,
                    stderr=asyncio.subprocess.STDOUT,
                    start_new_session=True,  # its own process group: the container
                )
        except OSError as exc:
            await self._report(name, self._failed(container, 128, "StartError", str(exc)))
            return
        grace = spec.get("terminationGracePeriodSeconds")
        record = PodProcess(
            name=name,
            uid=uid,
            container=container.get("name", ""),
            process=process,
            log_path=log_path,
            grace_s=min(float(DEFAULT_GRACE_S if grace is None else grace), MAX_GRACE_S),
            started_at=now_rfc3339(),
        )
        self._pods[name] = record
        self.started[name] = time.time()
        await self._report(
            name,
            {
                "phase": "Running",
                "startTime": record.started_at,
                "containerStatuses": [
                    {
                        "name": record.container,
                        "image": container.get("image", ""),
                        "ready": True,
                        "started": True,
                        "restartCount": 0,
                        "state": {"running": {"startedAt": record.started_at}},
                    }
                ],
            },
        )
        record.supervisor = asyncio.create_task(self._supervise(record, container))

    async def _environment(self, pod: dict[str, Any], container: dict[str, Any]) -> dict[str, str]:
        """The container's environment: PATH and DAGKUBE_TEST_SESSION of this process, then
        envFrom, then env in order (later entries may refer to earlier ones as $(NAME))."""
        env = {"PATH": os.environ.get("PATH", os.defpath)}
        if "DAGKUBE_TEST_SESSION" in os.environ:
            env["DAGKUBE_TEST_SESSION"] = os.environ["DAGKUBE_TEST_SESSION"]
        namespace = pod["metadata"].get("namespace") or self.namespace
        for source in container.get("envFrom") or []:
            prefix = source.get("prefix", "")
            for kind, plural in (("secretRef", "secrets"), ("configMapRef", "configmaps")):
                if kind in source:
                    ref = source[kind]
                    values = await self._read_values(namespace, plural, ref["name"])
                    if values is None and not ref.get("optional"):
                        raise ContainerConfigError(f'{plural[:-1]} "{ref["name"]}" not found')
                    env.update({prefix + key: value for key, value in (values or {}).items()})
        for variable in container.get("env") or []:
            value = await self._value(pod, namespace, variable, env)
            if value is not None:
                env[variable["name"]] = value
        return env

    async def _value(
        self, pod: dict[str, Any], namespace: str, variable: dict[str, Any], env: dict[str, str]
    ) -> str | None:
        if "valueFrom" not in variable:
            return expand_references(str(variable.get("value", "")), env)
        source = variable["valueFrom"]
        for kind, plural in (("secretKeyRef", "secrets"), ("configMapKeyRef", "configmaps")):
            if kind in source:
                ref = source[kind]
                values = await self._read_values(namespace, plural, ref["name"])
                if values is not None and ref["key"] in values:
                    return values[ref["key"]]
                if ref.get("optional"):
                    return None
                if values is None:
                    raise ContainerConfigError(f'{plural[:-1]} "{ref["name"]}" not found')
                raise ContainerConfigError(
                    f"couldn't find key {ref['key']} in {plural[:-1]} {namespace}/{ref['name']}"
                )
        if "fieldRef" in source:
            return self._field(pod, source["fieldRef"]["fieldPath"])
        raise ContainerConfigError(f"{variable['name']}: unsupported valueFrom {sorted(source)}")

    @staticmethod
    def _field(pod: dict[str, Any], path: str) -> str:
        metadata = pod["metadata"]
        simple = {
            "metadata.name": metadata.get("name"),
            "metadata.namespace": metadata.get("namespace"),
            "metadata.uid": metadata.get("uid"),
            "spec.nodeName": "test-kubelet",
            "spec.serviceAccountName": (pod.get("spec") or {}).get("serviceAccountName"),
            "status.podIP": "127.0.0.1",
            "status.hostIP": "127.0.0.1",
        }
        if path in simple:
            return str(simple[path] or "")
        if match := re.match(r"^metadata\.(labels|annotations)\['(.+)'\]$", path):
            return str((metadata.get(match.group(1)) or {}).get(match.group(2), ""))
        raise ContainerConfigError(f"unsupported fieldRef {path!r}")

    async def _read_values(self, namespace: str, plural: str, name: str) -> dict[str, str] | None:
        """A Secret's or ConfigMap's values as text (None if it does not exist), read through
        the API: ``data`` (base64 for a Secret) and ``stringData``/``binaryData``."""
        obj = await self.cluster.get(f"/api/v1/namespaces/{namespace}/{plural}/{name}")
        if obj is None:
            return None
        values: dict[str, str] = {}
        for key, value in (obj.get("data") or {}).items():
            values[key] = base64.b64decode(value).decode() if plural == "secrets" else value
        for key, value in (obj.get("binaryData") or {}).items():
            values[key] = base64.b64decode(value).decode(errors="replace")
        values.update(obj.get("stringData") or {})
        return values

    # ----- running and ending

    async def _supervise(self, record: PodProcess, container: dict[str, Any]) -> None:
        """Report the container's end, unless the Pod was deleted or the kubelet is closing."""
        returncode = await record.process.wait()
        if record.terminating or self._closing:
            return
        code = exit_code_of(returncode)
        status = self._failed(container, code, "Error" if code else "Completed", None)
        status["phase"] = "Succeeded" if code == 0 else "Failed"
        status["containerStatuses"][0]["state"]["terminated"]["startedAt"] = record.started_at
        await self._report(record.name, status, uid=record.uid)

    def _terminate_in_background(self, record: PodProcess) -> None:
        record.terminating = True
        task = asyncio.create_task(self._terminate(record))
        self._terminations.add(task)
        task.add_done_callback(self._terminations.discard)

    async def _terminate(self, record: PodProcess) -> None:
        """SIGTERM the container's main process; SIGKILL its whole group after the grace."""
        record.terminating = True
        if not record.running:
            await record.process.wait()
            return
        self._signal(record, signal.SIGTERM, group=False)
        try:
            await asyncio.wait_for(asyncio.shield(record.process.wait()), record.grace_s)
        except TimeoutError:
            log.warning("test kubelet: Pod %s ignored SIGTERM: killed", record.name)
            self._signal(record, signal.SIGKILL, group=True)
            await record.process.wait()

    @staticmethod
    def _signal(record: PodProcess, signum: signal.Signals, *, group: bool) -> None:
        # Only while the process is not reaped: its pid (and group id) is still ours then.
        if record.running:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                if group:
                    os.killpg(record.process.pid, signum)
                else:
                    record.process.send_signal(signum)

    # ----- status

    @staticmethod
    def _waiting_status(container: dict[str, Any], message: str) -> dict[str, Any]:
        return {
            "phase": "Pending",
            "containerStatuses": [
                {
                    "name": container.get("name", ""),
                    "image": container.get("image", ""),
                    "ready": False,
                    "started": False,
                    "restartCount": 0,
                    "state": {
                        "waiting": {"reason": "CreateContainerConfigError", "message": message}
                    },
                }
            ],
        }

    @staticmethod
    def _failed(
        container: dict[str, Any], code: int, reason: str, message: str | None
    ) -> dict[str, Any]:
        terminated: dict[str, Any] = {
            "exitCode": code,
            "reason": reason,
            "finishedAt": now_rfc3339(),
        }
        if message:
            terminated["message"] = message
        return {
            "phase": "Failed",
            "containerStatuses": [
                {
                    "name": container.get("name", ""),
                    "image": container.get("image", ""),
                    "ready": False,
                    "started": False,
                    "restartCount": 0,
                    "state": {"terminated": terminated},
                }
            ],
        }

    async def _report(self, name: str, status: dict[str, Any], uid: str | None = None) -> None:
        """Merge-patch the Pod's status; a Pod deleted (or replaced) meanwhile is let be."""
        try:
            if uid is not None:
                current = await self.cluster.pod(self.namespace, name)
                if current is None or current["metadata"].get("uid") != uid:
                    return
            await self.cluster.set_pod_status(self.namespace, name, status)
        except aiohttp.ClientResponseError as exc:
            if exc.status != 404:
                log.warning("test kubelet: cannot report the status of Pod %s: %s", name, exc)
        except (aiohttp.ClientError, OSError) as exc:
            log.warning("test kubelet: cannot report the status of Pod %s: %s", name, exc)
