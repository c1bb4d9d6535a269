"""One Pod on the local node: its network namespace and volumes, a process per container in
a cgroup with the container's limits, probes, restarts, ``pods/status`` like a kubelet writes
it, and deletion with a grace period. What a container is started with, and its process, are
:mod:`localcluster.agent.launch`'s; the status body is built by
:mod:`localcluster.agent.podstatus`."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import time
from pathlib import Path
from typing import TYPE_CHECKING

from dagkube.runtime.cgroups import Cgroup, CgroupError, Limits
from localcluster import images, network
from localcluster.agent import launch, probes, volumes
from localcluster.agent.api import ApiError
from localcluster.agent.podstatus import (
    ContainerState,
    comparable,
    keep_transition_times,
    now_rfc3339,
    pod_status,
    terminated_state,
)

if TYPE_CHECKING:
    from localcluster.agent.node import NodeRunner

log = logging.getLogger("localcluster.agent")

BACKOFF_START_S = 10.0
BACKOFF_MAX_S = 300.0
DEFAULT_GRACE_S = 30


class PodWorker:
    def __init__(self, node: NodeRunner, pod: dict) -> None:
        self.node = node
        self.pod = pod
        meta = pod["metadata"]
        self.uid = meta["uid"]
        self.namespace, self.name = meta["namespace"], meta["name"]
        self.folder = node.cluster.path("pods", self.uid)
        self.log_folder = node.cluster.path(
            "logs", "pods", f"{self.namespace}_{self.name}_{self.uid}"
        )
        self.deleting = asyncio.Event()
        self.removed = False  # the API object is gone (no DELETE to send)
        self.pod_ip: str | None = None
        self.netns: str | None = None
        self.mounts: dict[str, Path] = {}
        self.cgroup: Cgroup | None = None
        self.containers = {
            c["name"]: ContainerState(c["name"], c["image"])
            for c in (pod["spec"].get("initContainers") or []) + pod["spec"]["containers"]
        }
        self.processes: dict[str, asyncio.subprocess.Process] = {}
        self.container_groups: dict[str, Cgroup] = {}
        self.initialized = False
        self.started_at = time.time()
        self._reported: dict | None = None
        self._report_lock = asyncio.Lock()
        self.task = asyncio.create_task(self._run(), name=f"pod {self.namespace}/{self.name}")

    # ------------------------------------------------------------------ events from the watch
    def update(self, pod: dict) -> None:
        self.pod = pod
        if pod["metadata"].get("deletionTimestamp"):
            self.deleting.set()

    def gone(self) -> None:
        self.removed = True
        self.deleting.set()

    # ------------------------------------------------------------------ life
    @property
    def spec(self) -> dict:
        return dict(self.pod["spec"])

    async def _run(self) -> None:
        try:
            phase = (self.pod.get("status") or {}).get("phase")
            if phase in ("Succeeded", "Failed"):
                await self.deleting.wait()
                return
            if self.pod["metadata"].get("deletionTimestamp"):
                self.deleting.set()
                return
            await self._report()
            try:
                await self._prepare()
            except (volumes.ConfigError, ApiError, network.NetworkError, CgroupError) as exc:
                await self._fail_setup(exc)
                return
            await self._report()
            if not await self._run_init_containers():
                return
            self.initialized = True
            supervisors = [
                asyncio.create_task(self._supervise(c), name=f"{self.name}/{c['name']}")
                for c in self.spec["containers"]
            ]
            deleting = asyncio.create_task(self.deleting.wait())
            await asyncio.wait([deleting, *supervisors], return_when=asyncio.FIRST_COMPLETED)
            if not self.deleting.is_set():
                await asyncio.gather(*supervisors)  # every container ended for good
                deleting.cancel()
            else:
                await self._stop_all()
                for task in supervisors:
                    task.cancel()
                await asyncio.gather(*supervisors, return_exceptions=True)
        except asyncio.CancelledError:
            await self._stop_all(grace_s=0)
            raise
        except Exception:
            log.exception("pod %s/%s: the agent failed running it", self.namespace, self.name)
        finally:
            try:
                await self._cleanup()
            except Exception:  # never keep a deleted Pod's object waiting on its clean-up
                log.exception("pod %s/%s: clean-up failed", self.namespace, self.name)
            if self.deleting.is_set():
                await self._finish_deletion()
            else:
                await self._report()

    async def _prepare(self) -> None:
        spec = self.spec
        self.folder.mkdir(parents=True, exist_ok=True)
        self.log_folder.mkdir(parents=True, exist_ok=True)
        if spec.get("hostNetwork"):
            self.pod_ip = "127.0.0.1"
        else:
            previous = (self.pod.get("status") or {}).get("podIP")
            self.pod_ip = self.node.agent.ipam.allocate(self.uid, previous)
            self.netns = await asyncio.to_thread(
                network.create_pod_namespace, self.node.cluster, self.uid, self.pod_ip
            )
        hierarchy = self.node.agent.cgroups
        if hierarchy is not None:
            self.cgroup = await asyncio.to_thread(hierarchy.create, self._cgroup_path(), Limits())
        resolver = volumes.Resolver(self.node.api, self.pod)
        security = spec.get("securityContext") or {}
        for volume in spec.get("volumes") or []:
            self.mounts[volume["name"]] = await volumes.materialize(
                resolver,
                volume,
                self.folder / "volumes" / volume["name"],
                fs_group=security.get("fsGroup"),
                volumes_root=self.node.cluster.path("volumes"),
            )
        self._write_etc()

    def _cgroup_path(self, container: str | None = None) -> str:
        base = f"dagkube-local/{self.node.cluster.bridge}/{self.node.name}/pod-{self.uid}"
        return f"{base}/{container}" if container else base

    def _write_etc(self) -> None:
        spec, cluster = self.spec, self.node.cluster
        hosts = launch.hosts_file(spec, cluster, self.namespace, self.name, self.pod_ip)
        (self.folder / "hosts").write_text(hosts)
        (self.folder / "resolv.conf").write_text(launch.resolv_conf(spec, cluster, self.namespace))
        for name in ("hosts", "resolv.conf"):
            os.chmod(self.folder / name, 0o644)

    async def _fail_setup(self, error: Exception) -> None:
        log.warning("pod %s/%s cannot start: %s", self.namespace, self.name, error)
        for state in self.containers.values():
            state.state = {
                "waiting": {"reason": "CreateContainerConfigError", "message": str(error)}
            }
        await self._report()
        await self.deleting.wait()

    async def _run_init_containers(self) -> bool:
        for container in self.spec.get("initContainers") or []:
            while not self.deleting.is_set():
                code = await self._run_once(container)
                if code == 0:
                    break
                if code is None:
                    await self._sleep(self._backoff(self.containers[container["name"]]))
                    continue
                if self.spec.get("restartPolicy", "Always") == "Never":
                    for state in self.containers.values():
                        state.done = True
                    await self._report()
                    await self.deleting.wait()
                    return False
                state = self.containers[container["name"]]
                await self._sleep(self._backoff(state))
            if self.deleting.is_set():
                return False
        return True

    def _backoff(self, state: ContainerState) -> float:
        return min(BACKOFF_MAX_S, BACKOFF_START_S * 2 ** max(0, state.restarts - 1))

    async def _sleep(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.deleting.wait(), seconds)

    async def _supervise(self, container: dict) -> None:
        state = self.containers[container["name"]]
        policy = self.spec.get("restartPolicy", "Always")
        while not self.deleting.is_set():
            code = await self._run_once(container)
            if self.deleting.is_set():
                return
            if code is None:  # could not start: retried with back-off
                await self._sleep(self._backoff(state))
                continue
            if policy == "Never" or (policy == "OnFailure" and code == 0):
                state.done = True
                await self._report()
                return
            state.restarts += 1
            delay = self._backoff(state)
            state.last_state = {"terminated": state.state["terminated"]}
            state.state = {
                "waiting": {
                    "reason": "CrashLoopBackOff",
                    "message": f"back-off {delay:.0f}s restarting failed container={state.name}",
                }
            }
            await self._report()
            await self._sleep(delay)

    async def _run_once(self, container: dict) -> int | None:
        """Start the container, wait for its end; its exit code, or None if it never started."""
        state = self.containers[container["name"]]
        try:
            image = images.resolve(container["image"])
        except images.ImagePullError as exc:
            reason = (
                "ImagePullBackOff"
                if state.state.get("waiting", {}).get("reason")
                in ("ErrImagePull", "ImagePullBackOff")
                else "ErrImagePull"
            )
            state.state = {"waiting": {"reason": reason, "message": str(exc)}}
            await self._report()
            return None
        try:
            process, env, uid, gid = await self._start(container, image, state)
        except (volumes.ConfigError, CgroupError, ApiError, OSError) as exc:
            state.state = {"waiting": {"reason": "CreateContainerConfigError", "message": str(exc)}}
            await self._report()
            return None
        started = time.time()
        if "terminated" in state.state:  # the run before this one
            state.last_state = {"terminated": state.state["terminated"]}
        state.pid = process.pid
        state.started = True
        state.state = {"running": {"startedAt": now_rfc3339(started)}}
        state.ready = not container.get("readinessProbe")
        await self._report()
        probing = asyncio.create_task(self._probe(container, state, process, env, uid, gid))
        code = await process.wait()
        probing.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await probing
        self.processes.pop(state.name, None)
        group = self.container_groups.pop(state.name, None)
        oom = False
        if group is not None:
            oom = (await asyncio.to_thread(group.usage)).oom_kills > 0
            with contextlib.suppress(CgroupError):
                await asyncio.to_thread(group.remove)
        terminated = terminated_state(
            code, oom=oom, started=started, container_id=state.container_id
        )
        state.ready = False
        state.pid = None
        state.state = {"terminated": terminated}
        await self._report()
        return int(terminated["exitCode"])

    async def _start(
        self, container: dict, image: images.Image, state: ContainerState
    ) -> tuple[asyncio.subprocess.Process, dict[str, str], int | None, int | None]:
        """Start this attempt of the container: enter.py with the attempt's launch spec, in a
        cgroup with the container's limits, its output in the attempt's log."""
        spec = self.spec
        resolver = volumes.Resolver(self.node.api, self.pod)
        env = await volumes.environment(
            resolver, container, image.env, self.node.agent.service_env(self.namespace, spec)
        )
        argv = [
            volumes.expand(a, env)
            for a in image.argv(container.get("command"), container.get("args"))
        ]
        if not argv:
            raise volumes.ConfigError("no command specified")
        security = launch.container_security(
            spec, container, image, pod=f"{self.namespace}/{self.name}"
        )
        mounts = launch.container_mounts(container, image, self.mounts, self.folder)
        attempt = f"{container['name']}-{state.restarts}"
        group = await self._container_cgroup(container, state, attempt)
        hostname = None if spec.get("hostNetwork") else (spec.get("hostname") or self.name)[:63]
        launch_spec = launch.launch_spec(
            argv=argv,
            env=env,
            cwd=container.get("workingDir") or image.workdir,
            security=security,
            mounts=mounts,
            hostname=hostname,
            netns=self.netns,
            cgroup=group,
        )
        spec_file = self.folder / f"{attempt}.json"
        spec_file.write_text(json.dumps(launch_spec))
        spec_file.chmod(0o600)
        log_file = self.log_folder / container["name"] / f"{state.restarts}.log"
        process = await launch.spawn(spec_file, log_file)
        self.processes[state.name] = process
        state.container_id = f"dagkube-local://{self.uid[:8]}-{attempt}"
        return process, env, security.uid, security.gid

    async def _container_cgroup(
        self, container: dict, state: ContainerState, attempt: str
    ) -> Cgroup | None:
        """A cgroup for this attempt with the container's limits (None: the agent has no
        cgroups); :meth:`_stop` kills what is left in it."""
        hierarchy = self.node.agent.cgroups
        if hierarchy is None:
            return None
        group = await asyncio.to_thread(
            hierarchy.create, self._cgroup_path(attempt), launch.container_limits(container)
        )
        self.container_groups[state.name] = group
        return group

    async def _probe(
        self,
        container: dict,
        state: ContainerState,
        process: asyncio.subprocess.Process,
        env: dict[str, str],
        uid: int | None,
        gid: int | None,
    ) -> None:
        tasks = []
        for kind in ("readinessProbe", "livenessProbe"):
            probe = container.get(kind)
            if probe:
                tasks.append(
                    self._probe_loop(kind, probe, container, state, process, env, uid, gid)
                )
        if tasks:
            await asyncio.gather(*tasks)

    async def _probe_loop(
        self,
        kind: str,
        probe: dict,
        container: dict,
        state: ContainerState,
        process: asyncio.subprocess.Process,
        env: dict[str, str],
        uid: int | None,
        gid: int | None,
    ) -> None:
        await asyncio.sleep(float(probe.get("initialDelaySeconds") or 0))
        period = float(probe.get("periodSeconds") or 10)
        failure_threshold = int(probe.get("failureThreshold") or 3)
        success_threshold = int(probe.get("successThreshold") or 1)
        successes = failures = 0
        while process.returncode is None:
            ok = await probes.run_probe(
                probe, container=container, pod_ip=self.pod_ip or "127.0.0.1",
                pid=process.pid, env=env, uid=uid, gid=gid,
            )  # fmt: skip
            successes, failures = (successes + 1, 0) if ok else (0, failures + 1)
            if kind == "readinessProbe":
                ready = state.ready
                if successes >= success_threshold:
                    ready = True
                elif failures >= failure_threshold:
                    ready = False
                if ready != state.ready:
                    log.info(
                        "pod %s/%s: container %s %s (readiness probe: %d failed, %d passed)",
                        self.namespace, self.name, state.name,
                        "ready" if ready else "not ready", failures, successes,
                    )  # fmt: skip
                    state.ready = ready
                    await self._report()
            elif failures >= failure_threshold:
                log.info(
                    "pod %s/%s: liveness probe failed: restarting %s",
                    self.namespace,
                    self.name,
                    state.name,
                )
                await self._stop(
                    state.name,
                    float(self.spec.get("terminationGracePeriodSeconds", DEFAULT_GRACE_S)),
                )
                return
            await asyncio.sleep(period if successes or failures else 1.0)

    async def _stop(self, name: str, grace_s: float) -> None:
        process = self.processes.get(name)
        if process is None or process.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGTERM)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(process.wait(), grace_s)
        group = self.container_groups.get(name)
        if process.returncode is None or (group is not None and group.pids()):
            await launch.kill(process, group)

    async def _stop_all(self, grace_s: float | None = None) -> None:
        if grace_s is None:
            meta = self.pod["metadata"]
            grace_s = float(
                0 if self.removed else meta.get("deletionGracePeriodSeconds",
                self.spec.get("terminationGracePeriodSeconds", DEFAULT_GRACE_S))
            )  # fmt: skip
        await asyncio.gather(*(self._stop(name, grace_s) for name in list(self.processes)))

    async def _cleanup(self) -> None:
        for group in list(self.container_groups.values()):
            with contextlib.suppress(CgroupError):
                await asyncio.to_thread(group.remove)
        self.container_groups.clear()
        if self.cgroup is not None:
            with contextlib.suppress(CgroupError):
                await asyncio.to_thread(self.cgroup.remove)
            self.cgroup = None
        if self.netns:
            await asyncio.to_thread(network.remove_pod_namespace, self.netns)
            self.netns = None
        self.node.agent.ipam.release(self.uid)
        volumes.remove(self.folder)

    async def _finish_deletion(self) -> None:
        """The kubelet's last word: delete the object now that nothing runs (grace 0)."""
        if self.removed:
            return
        path = f"/api/v1/namespaces/{self.namespace}/pods/{self.name}"
        body = {
            "apiVersion": "v1",
            "kind": "DeleteOptions",
            "gracePeriodSeconds": 0,
            "preconditions": {"uid": self.uid},
        }
        try:
            await self.node.api.delete(path, body)
        except ApiError as exc:
            if exc.status not in (404, 409):
                log.warning("pod %s/%s: final delete failed: %s", self.namespace, self.name, exc)

    # ------------------------------------------------------------------ status
    async def _report(self) -> None:
        """Patch ``pods/status`` if it changed since the last patch (transition times aside)."""
        async with self._report_lock:
            status = pod_status(
                self.spec,
                self.containers,
                initialized=self.initialized,
                pod_ip=self.pod_ip,
                started_at=self.started_at,
            )
            key = comparable(status)
            if self._reported is not None and self._reported.get("_key") == key:
                return
            keep_transition_times(status, self._reported)
            path = f"/api/v1/namespaces/{self.namespace}/pods/{self.name}/status"
            try:
                await self.node.api.patch(path, {"status": status})
            except ApiError as exc:
                if exc.status == 404:
                    self.removed = True
                    return
                log.warning("pod %s/%s: status patch failed: %s", self.namespace, self.name, exc)
                return
            self._reported = {**status, "_key": key}

    def log_file(self, container: str, previous: bool = False) -> Path | None:
        folder = self.log_folder / container
        state = self.containers.get(container)
        if state is None:
            return None
        index = state.restarts - 1 if previous else state.restarts
        path = folder / f"{index}.log"
        if not path.exists() and not previous and index > 0:
            path = folder / f"{index - 1}.log"
        return path if path.exists() else None
