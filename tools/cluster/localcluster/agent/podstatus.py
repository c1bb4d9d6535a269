"""A Pod's ``status`` as a kubelet writes it, built without I/O from what the agent knows of
its containers: the phase, the conditions, one entry per container and the Pod's address."""

from __future__ import annotations

import datetime
import json
import time
from dataclasses import dataclass, field
from typing import Any


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


def terminated_state(code: int, *, oom: bool, started: float, container_id: str) -> dict:
    """The ``terminated`` state of a container whose process ended with ``code`` (negative: the
    signal that killed it, reported as exit code 128 + signal like a container runtime does)."""
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
        "containerID": container_id,
    }
    if code < 0:
        terminated["signal"] = -code
    return terminated


def pod_status(
    spec: dict,
    containers: dict[str, ContainerState],
    *,
    initialized: bool,
    pod_ip: str | None,
    started_at: float,
) -> dict:
    """The Pod's status; every condition's ``lastTransitionTime`` is now (see
    :func:`keep_transition_times`)."""
    init_names = [c["name"] for c in spec.get("initContainers") or []]
    main_names = [c["name"] for c in spec["containers"]]
    mains = [containers[n] for n in main_names]
    inits = [containers[n] for n in init_names]
    terminated = [c.state.get("terminated") for c in mains]
    all_done = all(c.done for c in mains) or (
        spec.get("restartPolicy") == "Never" and any(c.done for c in inits) and not initialized
    )
    if all_done:
        codes = [t["exitCode"] if t else 1 for t in terminated]
        phase = "Succeeded" if all(code == 0 for code in codes) and initialized else "Failed"
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
        "startTime": now_rfc3339(started_at),
        "conditions": [
            condition("PodReadyToStartContainers", pod_ip is not None),
            condition("Initialized", initialized or not init_names, "ContainersNotInitialized"),
            condition("ContainersReady", ready, "ContainersNotReady"),
            condition("Ready", ready, "ContainersNotReady"),
        ],
        "containerStatuses": [c.as_status() for c in mains],
    }  # qosClass is the API server's: set when the Pod is created, immutable since
    if inits:
        status["initContainerStatuses"] = [c.as_status() for c in inits]
    if pod_ip:
        status["podIP"] = pod_ip
        status["podIPs"] = [{"ip": pod_ip}]
    return status


def comparable(status: dict) -> str:
    """The status without its transition times: equal strings need no new patch."""
    return json.dumps(
        {
            **status,
            "conditions": [
                {k: v for k, v in c.items() if k != "lastTransitionTime"}
                for c in status["conditions"]
            ],
        },
        sort_keys=True,
    )


def keep_transition_times(status: dict, reported: dict | None) -> None:
    """Give each condition whose value did not change the transition time it was reported with."""
    previous = {c["type"]: c for c in (reported or {}).get("conditions", [])}
    for entry in status["conditions"]:
        old = previous.get(entry["type"])
        if old and old["status"] == entry["status"]:
            entry["lastTransitionTime"] = old["lastTransitionTime"]
