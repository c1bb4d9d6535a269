"""One Pod on the local node: its network namespace and volumes, a process per container in
a cgroup with the container's limits, probes, restarts, ``pods/status`` like a kubelet writes
it, and deletion with a grace period."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import json
import logging
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dagkube.runtime.cgroups import Cgroup, CgroupError, Limits
from localcluster import images, network
from localcluster.agent import probes, volumes
from localcluster.agent.api import ApiError
from localcluster.agent.quantity import cpu_millis, memory_bytes

if TYPE_CHECKING:
    from localcluster.agent.node import NodeRunner

log = logging.getLogger("localcluster.agent")

ENTER = Path(__file__).resolve().parent.parent / "enter.py"
BACKOFF_START_S = 10.0
BACKOFF_MAX_S = 300.0
DEFAULT_GRACE_S = 30
IMAGE_USERS = {"dagkube": 10001}  # the USER of the project's Dockerfiles


def now_rfc3339(moment: float | None = None) -> str:
    when = datetime.datetime.fromtimestamp(moment or time.time(), tz=datetime.UTC)
    return when.strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class ContainerState:
    """What the status reports for one container."""

    name: str
    image: str
    restarts: int = 0
    state: dict = field(default_factory=lambda: {"waiting": {"reason": "ContainerCreating"}})
    last_state: dict = field(default_factory=dict)
    ready: bool = False
    started: bool = False
    pid: int | None = None
    container_id: str = ""
    done: bool = False  # terminated and not to be restarted

    def as_status(self) -> dict:
        status = {
            "name": self.name,
            "image": self.image,
            "imageID": f"local://{self.image}",
            "ready": self.ready,
            "started": self.started,
            "restartCount": self.restarts,
            "state": self.state,
            "lastState": self.last_state,
        }
        if self.container_id:
            status["containerID"] = self.container_id
        return status


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
        hostname = spec.get("hostname") or self.name
        names = [hostname]
        if spec.get("subdomain"):
            names.insert(
                0, f"{hostname}.{spec['subdomain']}.{self.namespace}.svc.{cluster.cluster_domain}"
            )
        hosts = ["127.0.0.1\tlocalhost", "::1\tlocalhost ip6-localhost ip6-loopback"]
        hosts.append(f"{self.pod_ip}\t{' '.join(names)}")
        for alias in spec.get("hostAliases") or []:
            hosts.append(f"{alias['ip']}\t{' '.join(alias.get('hostnames') or [])}")
        (self.folder / "hosts").write_text("\n".join(hosts) + "\n")
        policy = spec.get("dnsPolicy") or "ClusterFirst"
        if spec.get("hostNetwork") or policy == "Default":
            resolv = Path("/etc/resolv.conf").read_text()
        else:
            domain = cluster.cluster_domain
            resolv = (
                f"search {self.namespace}.svc.{domain} svc.{domain} {domain}\n"
                f"nameserver {cluster.bridge_ip}\noptions ndots:5\n"
            )
        (self.folder / "resolv.conf").write_text(resolv)
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
        exit_code = code if code >= 0 else 128 - code
        if oom:
            reason = "OOMKilled"
        elif exit_code == 0:
            reason = "Completed"
        else:
            reason = "Error"
        terminated = {
            "exitCode": exit_code,
            "reason": reason,
            "startedAt": now_rfc3339(started),
            "finishedAt": now_rfc3339(),
            "containerID": state.container_id,
        }
        if code < 0:
            terminated["signal"] = -code
        state.ready = False
        state.pid = None
        state.state = {"terminated": terminated}
        await self._report()
        return exit_code

    async def _start(
        self, container: dict, image: images.Image, state: ContainerState
    ) -> tuple[asyncio.subprocess.Process, dict[str, str], int | None, int | None]:
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
        pod_security = spec.get("securityContext") or {}
        security = {**pod_security, **(container.get("securityContext") or {})}
        image_user = next((uid for key, uid in IMAGE_USERS.items() if key in image.name), None)
        uid = security.get("runAsUser", image_user)
        gid = security.get("runAsGroup", uid)
        if security.get("runAsNonRoot") and not uid:
            raise volumes.ConfigError(
                "container has runAsNonRoot and image will run as root "
                f"(pod: {self.namespace}/{self.name}, container: {container['name']})"
            )
        groups = [*(pod_security.get("supplementalGroups") or [])]
        if pod_security.get("fsGroup") is not None:
            groups.append(pod_security["fsGroup"])
        mounts = [
            {"source": str(source), "target": target, "readonly": True}
            for target, source in image.files.items()
        ]
        for mount in container.get("volumeMounts") or []:
            source = self.mounts.get(mount["name"])
            if source is None:
                raise volumes.ConfigError(f"volume {mount['name']!r} is not a volume of the Pod")
            if mount.get("subPath"):
                source = source / mount["subPath"]
                source.mkdir(parents=True, exist_ok=True)
            mounts.append(
                {
                    "source": str(source),
                    "target": mount["mountPath"],
                    "readonly": bool(mount.get("readOnly")),
                }
            )
        mounts.append({"source": str(self.folder / "hosts"), "target": "/etc/hosts"})
        mounts.append({"source": str(self.folder / "resolv.conf"), "target": "/etc/resolv.conf"})
        limits = (container.get("resources") or {}).get("limits") or {}
        group = None
        hierarchy = self.node.agent.cgroups
        attempt = f"{container['name']}-{state.restarts}"
        if hierarchy is not None:
            group = await asyncio.to_thread(
                hierarchy.create,
                self._cgroup_path(attempt),
                Limits(
                    memory_bytes=memory_bytes(limits["memory"]) if "memory" in limits else None,
                    cpu_millis=cpu_millis(limits["cpu"]) if "cpu" in limits else None,
                ),
            )
            self.container_groups[state.name] = group
        launch = {
            "argv": argv,
            "env": env,
            "cwd": container.get("workingDir") or image.workdir,
            "uid": uid,
            "gid": gid if uid is not None else None,
            "groups": groups,
            "mounts": mounts,
            "read_only_root": bool(security.get("readOnlyRootFilesystem")),
            "hostname": None
            if spec.get("hostNetwork")
            else (spec.get("hostname") or self.name)[:63],
            "netns": f"/run/netns/{self.netns}" if self.netns else None,
            "cgroup_procs": [str(p) for p in group.procs_files] if group else [],
        }
        spec_file = self.folder / f"{attempt}.json"
        spec_file.write_text(json.dumps(launch))
        spec_file.chmod(0o600)
        log_file = self.log_folder / container["name"] / f"{state.restarts}.log"
        log_file.parent.mkdir(parents=True, exist_ok=True)
        with open(log_file, "ab") as output:
            process = await asyncio.create_subprocess_exec(
                sys.executable, "-I", "-S", str(ENTER), str(spec_file),
                stdin=asyncio.subprocess.DEVNULL, stdout=output, stderr=asyncio.subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip
        self.processes[state.name] = process
        state.container_id = f"dagkube-local://{self.uid[:8]}-{attempt}"
        return process, env, uid, gid

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
            if group is not None:
                for pid in group.pids():
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await process.wait()

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
    def _status(self) -> dict:
        spec = self.spec
        init_names = [c["name"] for c in spec.get("initContainers") or []]
        main_names = [c["name"] for c in spec["containers"]]
        mains = [self.containers[n] for n in main_names]
        inits = [self.containers[n] for n in init_names]
        terminated = [c.state.get("terminated") for c in mains]
        all_done = all(c.done for c in mains) or (
            spec.get("restartPolicy") == "Never"
            and any(c.done for c in inits)
            and not self.initialized
        )
        if all_done:
            codes = [t["exitCode"] if t else 1 for t in terminated]
            phase = (
                "Succeeded" if all(code == 0 for code in codes) and self.initialized else "Failed"
            )
        elif any(c.started for c in mains):
            phase = "Running"
        else:
            phase = "Pending"
        ready = phase == "Running" and all(c.ready for c in mains)
        stamp = now_rfc3339()

        def condition(kind: str, value: bool, reason: str | None = None) -> dict:
            entry = {
                "type": kind,
                "status": "True" if value else "False",
                "lastTransitionTime": stamp,
            }
            if reason and not value:
                entry["reason"] = reason
            return entry

        status: dict[str, Any] = {
            "phase": phase,
            "hostIP": "127.0.0.1",
            "hostIPs": [{"ip": "127.0.0.1"}],
            "startTime": now_rfc3339(self.started_at),
            "conditions": [
                condition("PodReadyToStartContainers", self.pod_ip is not None),
                condition(
                    "Initialized", self.initialized or not init_names, "ContainersNotInitialized"
                ),
                condition("ContainersReady", ready, "ContainersNotReady"),
                condition("Ready", ready, "ContainersNotReady"),
            ],
            "containerStatuses": [c.as_status() for c in mains],
        }  # qosClass is the API server's: set when the Pod is created, immutable since
        if inits:
            status["initContainerStatuses"] = [c.as_status() for c in inits]
        if self.pod_ip:
            status["podIP"] = self.pod_ip
            status["podIPs"] = [{"ip": self.pod_ip}]
        return status

    async def _report(self) -> None:
        async with self._report_lock:
            status = self._status()
            comparable = json.dumps(
                {
                    **status,
                    "conditions": [
                        {k: v for k, v in c.items() if k != "lastTransitionTime"}
                        for c in status["conditions"]
                    ],
                },
                sort_keys=True,
            )
            if self._reported is not None and self._reported.get("_key") == comparable:
                return
            previous = {c["type"]: c for c in (self._reported or {}).get("conditions", [])}
            for entry in status["conditions"]:
                old = previous.get(entry["type"])
                if old and old["status"] == entry["status"]:
                    entry["lastTransitionTime"] = old["lastTransitionTime"]
            path = f"/api/v1/namespaces/{self.namespace}/pods/{self.name}/status"
            try:
                await self.node.api.patch(path, {"status": status})
            except ApiError as exc:
                if exc.status == 404:
                    self.removed = True
                    return
                log.warning("pod %s/%s: status patch failed: %s", self.namespace, self.name, exc)
                return
            self._reported = {**status, "_key": comparable}

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
