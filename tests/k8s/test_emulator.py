"""The test support itself: the API server behaviour of ApiServerEmulator (kmock_env) and the
TestKubelet that runs Pods as local processes (kubelet)."""

from __future__ import annotations

import asyncio
import base64
import json
import re
import signal
import threading
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from tests.k8s.kmock_env import (
    ROOT,
    SECRETS,
    EmulatedCluster,
    kubernetes_api,
    label_selector_matches,
    rbac_call,
    validate_workflow,
    wait_for,
)
from tests.k8s.kubelet import TestKubelet

# kmock 0.8 loads its bundled API discovery with a deprecated importlib.resources call.
pytestmark = [
    pytest.mark.k8s,
    pytest.mark.filterwarnings("ignore:read_binary is deprecated:DeprecationWarning"),
]

NAMESPACE = "jobs"
MERGE = {"Content-Type": "application/merge-patch+json"}


def example(name: str) -> dict[str, Any]:
    return yaml.safe_load((ROOT / "examples" / "manifests" / name).read_text())


def pod(name: str, *, namespace: str = NAMESPACE, **metadata: Any) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace, **metadata},
        "spec": {"containers": [{"name": "main", "image": "busybox"}]},
    }


def owned_by(obj: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        {
            "apiVersion": obj["apiVersion"],
            "kind": obj["kind"],
            "name": obj["metadata"]["name"],
            "uid": obj["metadata"]["uid"],
            "controller": True,
            "blockOwnerDeletion": True,
        }
    ]


def kopf_event(namespace: str, reason: str) -> dict[str, Any]:
    """An Event as kopf posts it (kopf/_cogs/clients/events.py)."""
    return {
        "metadata": {"namespace": namespace, "generateName": "kopf-event-"},
        "action": "Action?",
        "type": "Normal",
        "reason": reason,
        "message": f"{reason} message",
        "involvedObject": {"apiVersion": "dagkube.io/v1alpha1", "kind": "Workflow", "name": "x"},
    }


@pytest.fixture
async def cluster() -> AsyncIterator[EmulatedCluster]:
    async with kubernetes_api() as found:
        yield found


@pytest.fixture
async def client(cluster: EmulatedCluster) -> AsyncIterator[aiohttp.ClientSession]:
    """A client without the test header: what the code under test would send."""
    async with aiohttp.ClientSession(base_url=cluster.url) as session:
        yield session


# --------------------------------------------------------------------------- server fields


async def test_create_fills_server_owned_metadata_and_schema_defaults(cluster):
    created = await cluster.create_workflow(example("workflow-module.yaml"), NAMESPACE)
    metadata = created["metadata"]
    assert (metadata["name"], metadata["namespace"]) == ("tree-reduction", NAMESPACE)
    assert uuid.UUID(metadata["uid"]).version == 4
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", metadata["creationTimestamp"])
    assert metadata["generation"] == 1
    assert metadata["resourceVersion"].isdigit()
    assert created["spec"]["planner"]["name"] == "non-uniform"  # given
    assert created["spec"]["resources"]["memoryPerCpu"] == "1792Mi"  # the schema's default
    assert await cluster.workflow(NAMESPACE, "tree-reduction") == created

    other = await cluster.create_workflow(example("workflow-inline.yaml"), NAMESPACE)
    assert other["metadata"]["uid"] != metadata["uid"]
    assert int(other["metadata"]["resourceVersion"]) > int(metadata["resourceVersion"])
    assert other["spec"]["planner"] == {"name": "wukong", "sla": "avg"}


async def test_generate_name_gives_fresh_names_and_events_are_accepted(cluster, client):
    for reason in ("Started", "Finished"):
        async with client.post(
            f"/api/v1/namespaces/{NAMESPACE}/events", json=kopf_event(NAMESPACE, reason)
        ) as response:
            assert response.status == 201, await response.text()
    events = await cluster.events(NAMESPACE)
    assert [event["reason"] for event in events] == ["Started", "Finished"]
    names = [event["metadata"]["name"] for event in events]
    assert all(re.fullmatch(r"kopf-event-[a-z0-9]{5}", name) for name in names)
    assert len(set(names)) == 2


async def test_generation_follows_spec_and_status_follows_its_subresource(cluster):
    created = await cluster.create_workflow(example("workflow-module.yaml"), NAMESPACE)
    name, version = "tree-reduction", int(created["metadata"]["resourceVersion"])
    # The main resource ignores status; a spec change bumps the generation.
    patched = await cluster.patch_workflow(
        NAMESPACE, name, {"spec": {"retries": 2}, "status": {"phase": "Running"}}
    )
    assert patched["metadata"]["generation"] == 2
    assert "status" not in patched
    assert int(patched["metadata"]["resourceVersion"]) > version
    # The status subresource changes the status only, and not the generation.
    status = await cluster.patch_workflow(
        NAMESPACE, name, {"status": {"phase": "Running"}, "spec": {"retries": 5}}, status=True
    )
    assert status["status"] == {"phase": "Running"}
    assert status["spec"]["retries"] == 2
    assert status["metadata"]["generation"] == 2
    # A no-op changes nothing, not even the resourceVersion.
    again = await cluster.patch_workflow(
        NAMESPACE, name, {"status": {"phase": "Running"}}, status=True
    )
    assert again == status


async def test_optimistic_concurrency_as_kopf_uses_it(cluster, client):
    created = await cluster.create_workflow(example("workflow-module.yaml"), NAMESPACE)
    path = cluster.workflows_path(NAMESPACE, "tree-reduction")
    version = created["metadata"]["resourceVersion"]
    ops = [
        {"op": "test", "path": "/metadata/resourceVersion", "value": version},
        {
            "op": "add",
            "path": "/metadata/finalizers",
            "value": ["kopf.zalando.org/KopfFinalizerMarker"],
        },
    ]
    json_patch = {"Content-Type": "application/json-patch+json"}
    async with client.patch(path, json=ops, headers=json_patch) as response:
        assert response.status == 200, await response.text()
        assert (await response.json())["metadata"]["finalizers"] == [ops[1]["value"][0]]
    async with client.patch(path, json=ops, headers=json_patch) as response:
        assert response.status == 422  # the test op failed: kopf retries on the next cycle
    stale = {"metadata": {"resourceVersion": version, "labels": {"a": "b"}}}
    async with client.patch(path, json=stale, headers=MERGE) as response:
        assert response.status == 409
    current = await cluster.workflow(NAMESPACE, "tree-reduction")
    assert current is not None
    current["spec"]["retries"] = 3
    async with client.put(path, json=current) as response:  # a replace with the current version
        assert response.status == 200, await response.text()
        assert (await response.json())["metadata"]["generation"] == 2
    async with client.put(path, json=current) as response:  # the same version again: stale
        assert response.status == 409


async def test_invalid_objects_and_duplicates_are_refused(cluster, client):
    await cluster.create_workflow(example("workflow-module.yaml"), NAMESPACE)
    path = cluster.workflows_path(NAMESPACE)
    body = example("workflow-module.yaml") | {"apiVersion": "dagkube.io/v1alpha1"}
    async with client.post(path, json=body) as response:
        assert response.status == 409
        assert (await response.json())["reason"] == "AlreadyExists"
    body["metadata"]["name"] = "two-sources"
    body["spec"]["source"]["inline"] = "workflow = None"
    async with client.post(path, json=body) as response:
        assert response.status == 422
        assert "spec.source" in (await response.json())["message"]
    async with client.post(
        cluster.pods_path(NAMESPACE), json=pod("Bad_Name", labels={"a": "not ok!"})
    ) as response:
        answer = await response.json()
        assert response.status == 422
        assert "metadata.name" in answer["message"] and "metadata.labels" in answer["message"]


async def test_an_injected_error_changes_nothing(cluster):
    import kmock

    cluster.emulator[kmock.action.CREATE, kmock.resource("v1/pods")] << kmock.KubernetesError(
        status=403, reason="Forbidden", message="no"
    )
    with pytest.raises(aiohttp.ClientResponseError) as info:
        await cluster.create_pod(pod("refused"))
    assert info.value.status == 403
    assert await cluster.pods(NAMESPACE) == {}


async def test_secrets_string_data_is_stored_as_base64_data(cluster):
    secret = await cluster.create_secret(NAMESPACE, "redis", {"url": "redis://:pw@host:6379/0"})
    assert "stringData" not in secret
    assert base64.b64decode(secret["data"]["url"]) == b"redis://:pw@host:6379/0"


# --------------------------------------------------------------------------- deletion


async def test_deleting_an_owner_deletes_its_dependents_like_the_garbage_collector(cluster):
    workflow = await cluster.create_workflow(example("workflow-module.yaml"), NAMESPACE)
    owned = await cluster.create_pod(pod("owned", ownerReferences=owned_by(workflow)))
    await cluster.create_pod(pod("grandchild", ownerReferences=owned_by(owned)))
    await cluster.create_pod(
        pod("held", ownerReferences=owned_by(workflow), finalizers=["test/hold"])
    )
    await cluster.create_pod(pod("unrelated"))
    await cluster.create_pod(
        pod("elsewhere", namespace="other", ownerReferences=owned_by(workflow))
    )

    assert await cluster.delete_workflow(NAMESPACE, "tree-reduction")
    assert await cluster.workflow(NAMESPACE, "tree-reduction") is None
    left = await cluster.pods(NAMESPACE)
    assert set(left) == {"held", "unrelated"}
    assert left["held"]["metadata"]["deletionTimestamp"]  # held by its finalizer
    assert set(await cluster.pods("other")) == {"elsewhere"}  # not in the owner's namespace

    async with cluster.http.patch(
        cluster.pods_path(NAMESPACE, "held"),
        json={"metadata": {"finalizers": ["test/hold", "test/new"]}},
        headers=MERGE,
    ) as response:
        assert response.status == 422  # no new finalizer on an object being deleted
    async with cluster.http.patch(
        cluster.pods_path(NAMESPACE, "held"), json={"metadata": {"finalizers": None}}, headers=MERGE
    ) as response:
        assert response.status == 200
    assert set(await cluster.pods(NAMESPACE)) == {"unrelated"}
    assert not await cluster.delete_workflow(NAMESPACE, "tree-reduction")  # 404: already gone


async def test_an_owner_held_by_a_finalizer_keeps_its_dependents_until_released(cluster):
    body = example("workflow-module.yaml")
    body["metadata"]["finalizers"] = ["kopf.zalando.org/KopfFinalizerMarker"]
    workflow = await cluster.create_workflow(body, NAMESPACE)
    await cluster.create_pod(pod("worker", ownerReferences=owned_by(workflow)))
    assert await cluster.delete_workflow(NAMESPACE, "tree-reduction")
    held = await cluster.workflow(NAMESPACE, "tree-reduction")
    assert held is not None and held["metadata"]["deletionTimestamp"]
    assert set(await cluster.pods(NAMESPACE)) == {"worker"}
    await cluster.patch_workflow(NAMESPACE, "tree-reduction", {"metadata": {"finalizers": []}})
    assert await cluster.workflow(NAMESPACE, "tree-reduction") is None
    assert await cluster.pods(NAMESPACE) == {}


async def test_namespaces_are_served_and_deleting_one_deletes_its_objects(cluster):
    await cluster.create_pod(pod("p"))  # its namespace springs into existence
    await cluster.create_secret("other", "s", {"k": "v"})
    listed = await cluster.get("/api/v1/namespaces")
    assert {ns["metadata"]["name"] for ns in listed["items"]} == {"default", NAMESPACE, "other"}
    jobs = await cluster.get(f"/api/v1/namespaces/{NAMESPACE}")
    assert jobs["status"] == {"phase": "Active"}
    async with cluster.http.delete(f"/api/v1/namespaces/{NAMESPACE}") as response:
        assert response.status == 200
    assert await cluster.pods(NAMESPACE) == {}
    assert await cluster.get("/api/v1/namespaces/other/secrets/s") is not None


# --------------------------------------------------------------------------- selectors, watch

LABELS = {"app": "dagkube", "tier": "worker", "n": "3"}


@pytest.mark.parametrize(
    ("selector", "expected"),
    [
        ("app=dagkube", True),
        ("app==dagkube", True),
        ("app!=dagkube", False),
        ("missing!=x", True),
        ("app", True),
        ("!app", False),
        ("!missing", True),
        ("tier in (operator, worker)", True),
        ("tier notin (worker)", False),
        ("missing notin (a,b)", True),
        ("app=dagkube,tier in (operator)", False),
        ("app=dagkube, tier=worker, !missing", True),
        ("n>2", True),
        ("n<2", False),
        ("", True),
    ],
)
def test_label_selector_grammar(selector, expected):
    assert label_selector_matches(selector, LABELS) is expected


@pytest.mark.parametrize("selector", ["a in b", "=x", "a=b=c", "a in (x"])
def test_a_bad_label_selector_is_refused(selector):
    with pytest.raises(ValueError):
        label_selector_matches(selector, LABELS)


async def test_list_honours_label_selectors(cluster, client):
    await cluster.create_pod(pod("a1", labels={"pool": "a", "class": "512Mi"}))
    await cluster.create_pod(pod("a2", labels={"pool": "a", "class": "1Gi"}))
    await cluster.create_pod(pod("b1", labels={"pool": "b"}))
    assert set(await cluster.pods(NAMESPACE, "pool=a")) == {"a1", "a2"}
    assert set(await cluster.pods(NAMESPACE, "pool=a,class!=1Gi")) == {"a1"}
    assert set(await cluster.pods(NAMESPACE, "pool in (a,b),!class")) == {"b1"}
    for fields, expected in (("metadata.name=a2", {"a2"}), ("metadata.name!=a2", {"a1", "b1"})):
        listed = await cluster.get(cluster.pods_path(NAMESPACE), fieldSelector=fields)
        assert {item["metadata"]["name"] for item in listed["items"]} == expected
    async with client.get(
        cluster.pods_path(NAMESPACE), params={"labelSelector": "a in b"}
    ) as response:
        assert response.status == 400


async def _events(response: aiohttp.ClientResponse, count: int) -> list[tuple[str, str]]:
    events: list[tuple[str, str]] = []
    while len(events) < count:
        line = await asyncio.wait_for(response.content.readline(), 5)
        assert line, f"the stream ended after {events}"
        event = json.loads(line)
        events.append((event["type"], event["object"]["metadata"]["name"]))
    return events


async def test_watch_honours_selectors_and_resource_versions(cluster, client):
    await cluster.create_pod(pod("before", labels={"app": "a"}))
    listed = await cluster.get(cluster.pods_path(NAMESPACE))
    path = cluster.pods_path(NAMESPACE)
    since = {
        "watch": "true",
        "labelSelector": "app=a",
        "resourceVersion": listed["metadata"]["resourceVersion"],
    }
    async with client.get(path, params=since) as response:
        await cluster.create_pod(pod("a1", labels={"app": "a"}))
        await cluster.create_pod(pod("b1", labels={"app": "b"}))
        relabel = {"metadata": {"labels": {"app": "b"}}}
        async with cluster.http.patch(f"{path}/a1", json=relabel, headers=MERGE):
            pass
        relabel = {"metadata": {"labels": {"app": "a"}}}
        async with cluster.http.patch(f"{path}/b1", json=relabel, headers=MERGE):
            pass
        await cluster.delete_pod(NAMESPACE, "b1")
        assert await _events(response, 4) == [
            ("ADDED", "a1"),
            ("DELETED", "a1"),  # left the selector
            ("ADDED", "b1"),  # entered it
            ("DELETED", "b1"),
        ]
    # Without a version: the current objects first, as ADDED; the server timeout ends it.
    fresh = {"watch": "true", "labelSelector": "app", "timeoutSeconds": "0.3"}
    async with client.get(path, params=fresh) as response:
        assert await _events(response, 2) == [("ADDED", "a1"), ("ADDED", "before")]
        assert await asyncio.wait_for(response.content.read(), 5) == b""


# --------------------------------------------------------------------------- RBAC and discovery


async def test_api_calls_are_recorded_in_rbac_vocabulary(cluster, client):
    for discovery in ("/api", "/api/v1", "/apis", "/apis/dagkube.io/v1alpha1", "/version"):
        async with client.get(discovery) as response:
            assert response.status == 200, discovery
    workflows = cluster.workflows_path(NAMESPACE)
    body = example("workflow-module.yaml") | {"apiVersion": "dagkube.io/v1alpha1"}
    async with client.post(workflows, json=body) as response:
        created = await response.json()
    async with client.get(workflows):
        pass
    async with client.get(f"{workflows}/tree-reduction"):
        pass
    status = {"status": {"phase": "Running"}}
    async with client.patch(f"{workflows}/tree-reduction/status", json=status, headers=MERGE):
        pass
    async with client.put(f"{workflows}/tree-reduction", json=created):
        pass
    async with client.get(
        cluster.pods_path(NAMESPACE), params={"watch": "true", "timeoutSeconds": "0"}
    ) as response:
        await response.read()
    async with client.post(
        f"/api/v1/namespaces/{NAMESPACE}/events", json=kopf_event(NAMESPACE, "X")
    ):
        pass
    async with client.delete(cluster.pods_path(NAMESPACE), params={"labelSelector": "x=y"}):
        pass
    async with client.delete(f"{workflows}/tree-reduction"):
        pass
    await cluster.pods(NAMESPACE)  # the test's own helpers are not the code under test

    assert cluster.emulator.api_calls() == {
        ("create", "dagkube.io", "workflows", ""),
        ("list", "dagkube.io", "workflows", ""),
        ("get", "dagkube.io", "workflows", ""),
        ("patch", "dagkube.io", "workflows", "status"),
        ("update", "dagkube.io", "workflows", ""),
        ("watch", "", "pods", ""),
        ("create", "", "events", ""),
        ("deletecollection", "", "pods", ""),
        ("delete", "dagkube.io", "workflows", ""),
    }
    assert ("list", "", "pods", "") in cluster.emulator.api_calls(include_test_clients=True)


@pytest.mark.parametrize(
    ("method", "path", "query", "expected"),
    [
        ("GET", "/api/v1/namespaces", {}, ("list", "", "namespaces", "")),
        ("GET", "/api/v1/namespaces/jobs", {}, ("get", "", "namespaces", "")),
        ("GET", "/api/v1/namespaces/jobs/pods", {"watch": "1"}, ("watch", "", "pods", "")),
        ("GET", "/api/v1/watch/namespaces/jobs/pods", {}, ("watch", "", "pods", "")),
        ("GET", "/api/v1/namespaces/jobs/pods/p/log", {}, ("get", "", "pods", "log")),
        ("POST", "/api/v1/namespaces/jobs/pods/p/eviction", {}, ("create", "", "pods", "eviction")),
        (
            "GET",
            "/apis/apiextensions.k8s.io/v1/customresourcedefinitions",
            {},
            ("list", "apiextensions.k8s.io", "customresourcedefinitions", ""),
        ),
        ("GET", "/apis", {}, None),
        ("GET", "/apis/dagkube.io/v1alpha1", {}, None),
        ("GET", "/openapi/v2", {}, None),
    ],
)
def test_rbac_vocabulary_of_paths(method, path, query, expected):
    call = rbac_call(method, path, query)
    assert (call.rbac if call else None) == expected


async def test_discovery_serves_the_workflow_resource_for_kopf(cluster):
    groups = (await cluster.get("/apis"))["groups"]
    (group,) = [g for g in groups if g["name"] == "dagkube.io"]
    assert group["preferredVersion"]["version"] == "v1alpha1"
    resources = {
        r["name"]: r for r in (await cluster.get("/apis/dagkube.io/v1alpha1"))["resources"]
    }
    assert set(resources) == {"workflows", "workflows/status"}
    workflows = resources["workflows"]
    assert (workflows["kind"], workflows["namespaced"]) == ("Workflow", True)
    assert {"list", "watch", "patch", "get"} <= set(workflows["verbs"])
    assert workflows["shortNames"] == ["dkwf"]
    core = {r["name"] for r in (await cluster.get("/api/v1"))["resources"]}
    assert {"pods", "pods/status", "events", "secrets"} <= core
    crd = await cluster.get(
        "/apis/apiextensions.k8s.io/v1/customresourcedefinitions/workflows.dagkube.io"
    )
    assert {"type": "Established", "status": "True"}.items() <= crd["status"]["conditions"][
        1
    ].items()


async def test_a_kopf_operator_discovers_watches_finalizes_and_posts_events(cluster):
    """kopf's own machinery works on the emulator: namespace and resource discovery, list and
    watch, finalizers with JSON-patch preconditions, the status subresource, Events."""
    import kopf

    registry = kopf.OperatorRegistry()
    handled: list[str] = []

    @kopf.on.login(registry=registry)
    def login(**_: Any) -> kopf.ConnectionInfo:
        return kopf.ConnectionInfo(server=cluster.url, insecure=True)

    @kopf.on.create("dagkube.io", "v1alpha1", "workflows", registry=registry)
    def create(body: kopf.Body, patch: kopf.Patch, **_: Any) -> None:
        handled.append("create")
        patch.status["phase"] = "Running"
        kopf.info(body, reason="Planned", message="planned")

    @kopf.on.delete("dagkube.io", "v1alpha1", "workflows", registry=registry)
    def delete(**_: Any) -> None:
        handled.append("delete")

    # In a thread with its own event loop, as kopf.testing.KopfRunner does: at its exit, kopf
    # waits for (5 s), then cancels every task of its loop created after it started, which in
    # the test's loop would be the emulator's connections and the kubelet's tasks.
    stop = threading.Event()
    operator = threading.Thread(
        target=asyncio.run,
        args=(
            kopf.operator(
                registry=registry, namespaces=[NAMESPACE], standalone=True, stop_flag=stop
            ),
        ),
        name="kopf operator",
    )
    operator.start()
    try:
        await cluster.create_workflow(example("workflow-module.yaml"), NAMESPACE)

        async def running() -> dict[str, Any] | None:
            found = await cluster.workflow(NAMESPACE, "tree-reduction")
            return found if (found or {}).get("status", {}).get("phase") == "Running" else None

        found = await wait_for(running, 10, "kopf to set the phase")
        assert found["metadata"]["finalizers"] == ["kopf.zalando.org/KopfFinalizerMarker"]
        await cluster.delete_workflow(NAMESPACE, "tree-reduction")

        async def gone() -> bool:
            return await cluster.workflow(NAMESPACE, "tree-reduction") is None

        await wait_for(gone, 10, "kopf to release the finalizer")

        async def posted() -> list[dict[str, Any]]:
            return await cluster.events(NAMESPACE)

        (event,) = await wait_for(posted, 10, "kopf to post the Event")
        assert (event["reason"], event["involvedObject"]["name"]) == ("Planned", "tree-reduction")
    finally:
        stop.set()
        await asyncio.to_thread(operator.join, 10)
    assert not operator.is_alive()
    assert handled == ["create", "delete"]
    assert {
        ("list", "dagkube.io", "workflows", ""),
        ("watch", "dagkube.io", "workflows", ""),
        ("patch", "dagkube.io", "workflows", ""),
        ("patch", "dagkube.io", "workflows", "status"),
        ("create", "", "events", ""),
        ("list", "", "namespaces", ""),
        ("watch", "", "namespaces", ""),
    } <= cluster.emulator.api_calls()


# --------------------------------------------------------------------------- the schema


@pytest.mark.parametrize("manifest", ["workflow-module.yaml", "workflow-inline.yaml"])
def test_validate_workflow_accepts_the_examples(manifest):
    validate_workflow(example(manifest))


def test_validate_workflow_rejects_two_sources_and_a_bad_sla():
    body = example("workflow-module.yaml")
    body["spec"]["source"]["inline"] = "workflow = None"
    body["spec"]["planner"]["sla"] = "p100"
    with pytest.raises(AssertionError) as info:
        validate_workflow(body)
    message = str(info.value)
    assert "'tree-reduction' does not conform" in message
    assert "spec.source: " in message
    assert "spec.planner.sla: 'p100' does not match" in message


# --------------------------------------------------------------------------- the kubelet


def python_pod(
    name: str,
    code: str,
    *,
    env: list[dict[str, Any]] | None = None,
    grace: int = 1,
    **metadata: Any,
) -> dict[str, Any]:
    body = pod(name, **metadata)
    body["spec"] = {
        "restartPolicy": "Never",
        "terminationGracePeriodSeconds": grace,
        "containers": [
            {"name": "main", "image": "python", "command": ["python", "-c", code], "env": env or []}
        ],
    }
    return body


async def phase_of(cluster: EmulatedCluster, name: str, *phases: str) -> dict[str, Any] | None:
    found = await cluster.pod(NAMESPACE, name)
    status = (found or {}).get("status") or {}
    return status if status.get("phase") in phases else None


EXIT_WITH_CODE = "import os,sys; sys.exit(int(os.environ['CODE']))"
SLEEP = "import time; print('ready', flush=True); time.sleep(60)"


@pytest.mark.parametrize(("code", "phase"), [(0, "Succeeded"), (3, "Failed")])
async def test_kubelet_runs_a_pod_with_its_secret_and_reports_the_exit(
    cluster, tmp_path, code, phase
):
    await cluster.create_secret(NAMESPACE, "exit", {"code": str(code)})
    env = [{"name": "CODE", "valueFrom": {"secretKeyRef": {"name": "exit", "key": "code"}}}]
    async with TestKubelet(cluster, NAMESPACE, tmp_path) as kubelet:
        await cluster.create_pod(python_pod("exit", EXIT_WITH_CODE, env=env))
        status = await wait_for(lambda: phase_of(cluster, "exit", "Succeeded", "Failed"), 5, "exit")
    assert status["phase"] == phase, kubelet.log("exit")
    assert status["startTime"]
    (container,) = status["containerStatuses"]
    assert container["name"] == "main"
    assert container["state"]["terminated"]["exitCode"] == code
    assert "exit" in kubelet.started


async def test_kubelet_environment(cluster, tmp_path):
    """fieldRef, $(VAR), a Secret stored with plain stringData, private TMPDIR/HOME, extra_env."""
    cluster.emulator.objects[SECRETS, NAMESPACE, "plain"] = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": "plain", "namespace": NAMESPACE},
        "stringData": {"token": "s3cret"},
    }
    env: list[dict[str, Any]] = [
        {"name": "POD", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": "NS", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
        {"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "plain", "key": "token"}}},
        {"name": "WHERE", "value": "$(NS)/$(POD)"},
        {"name": "TMPDIR", "value": "/tmp"},
        {"name": "HOME", "value": "/tmp"},
    ]
    code = (
        "import json, os, sys; keys = ['POD', 'NS', 'TOKEN', 'WHERE', 'TMPDIR', 'HOME', 'EXTRA',"
        " 'PATH', 'DAGKUBE_TEST_SESSION']; print(json.dumps({k: os.environ.get(k) for k in keys}));"
        " print(os.getcwd()); print(sys.executable)"
    )
    async with TestKubelet(cluster, NAMESPACE, tmp_path, {"EXTRA": "yes"}) as kubelet:
        await cluster.create_pod(python_pod("env", code, env=env))
        await wait_for(lambda: phase_of(cluster, "env", "Succeeded", "Failed"), 5, "env")
    variables, cwd, executable = kubelet.log("env").splitlines()
    seen = json.loads(variables)
    assert seen["POD"] == "env" and seen["NS"] == NAMESPACE and seen["TOKEN"] == "s3cret"
    assert seen["WHERE"] == f"{NAMESPACE}/env"
    assert seen["TMPDIR"] == seen["HOME"] and Path(seen["TMPDIR"]).is_relative_to(tmp_path)
    assert seen["EXTRA"] == "yes" and seen["PATH"] and seen["DAGKUBE_TEST_SESSION"]
    assert Path(cwd) == ROOT
    assert Path(executable).name.startswith("python")


async def test_kubelet_waits_for_a_missing_secret(cluster, tmp_path):
    env = [{"name": "CODE", "valueFrom": {"secretKeyRef": {"name": "late", "key": "code"}}}]
    async with TestKubelet(cluster, NAMESPACE, tmp_path):
        await cluster.create_pod(python_pod("waits", EXIT_WITH_CODE, env=env))
        await wait_for(lambda: _waiting(cluster, "waits"), 5, "CreateContainerConfigError")
        await cluster.create_secret(NAMESPACE, "late", {"code": "0"})
        await wait_for(lambda: phase_of(cluster, "waits", "Succeeded"), 5, "the Pod to run")


async def _waiting(cluster: EmulatedCluster, name: str) -> dict[str, Any] | None:
    status = await phase_of(cluster, name, "Pending")
    for container in (status or {}).get("containerStatuses") or []:
        if container["state"].get("waiting", {}).get("reason") == "CreateContainerConfigError":
            return status
    return None


async def test_kubelet_stops_the_process_of_a_deleted_pod(cluster, tmp_path):
    async with TestKubelet(cluster, NAMESPACE, tmp_path) as kubelet:
        await cluster.create_pod(python_pod("sleeper", SLEEP))
        await wait_for(lambda: phase_of(cluster, "sleeper", "Running"), 5, "Running")
        process = kubelet.process("sleeper")
        assert process is not None and process.returncode is None
        await cluster.delete_pod(NAMESPACE, "sleeper")
        assert await asyncio.wait_for(process.wait(), 5) == -signal.SIGTERM


async def test_kubelet_kills_a_process_that_ignores_sigterm_after_the_grace(cluster, tmp_path):
    stubborn = (
        "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN);"
        " print('ready', flush=True); time.sleep(60)"
    )
    async with TestKubelet(cluster, NAMESPACE, tmp_path) as kubelet:
        await cluster.create_pod(python_pod("stubborn", stubborn, finalizers=["test/hold"]))

        async def ready() -> bool:
            return "ready" in kubelet.log("stubborn")

        await wait_for(ready, 5, "the SIGTERM handler")
        process = kubelet.process("stubborn")
        assert process is not None
        await cluster.delete_pod(NAMESPACE, "stubborn")  # held by its finalizer
        assert await asyncio.wait_for(process.wait(), 5) == -signal.SIGKILL
        held = await cluster.pod(NAMESPACE, "stubborn")
        assert held is not None and held["metadata"]["deletionTimestamp"]
        assert held["status"]["phase"] == "Running"  # the emulator's object now: left alone


async def test_kubelet_kill_is_a_crash_reported_as_failed(cluster, tmp_path):
    async with TestKubelet(cluster, NAMESPACE, tmp_path) as kubelet:
        await cluster.create_pod(python_pod("crash", SLEEP))
        await wait_for(lambda: phase_of(cluster, "crash", "Running"), 5, "Running")
        kubelet.kill("crash")
        status = await wait_for(lambda: phase_of(cluster, "crash", "Failed"), 5, "Failed")
    assert status["containerStatuses"][0]["state"]["terminated"]["exitCode"] == 137


async def test_kubelet_exit_ends_every_process(cluster, tmp_path):
    async with TestKubelet(cluster, NAMESPACE, tmp_path) as kubelet:
        await cluster.create_pod(python_pod("left", SLEEP))
        await wait_for(lambda: phase_of(cluster, "left", "Running"), 5, "Running")
        process = kubelet.process("left")
    assert process is not None and process.returncode is not None
