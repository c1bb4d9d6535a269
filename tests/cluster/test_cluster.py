"""The local control plane itself: the real kube-apiserver, controller manager, scheduler and
kube-proxy (built from Go modules), with dagkube's node agent running Pods as processes in
cgroups and network namespaces. Each test works in a namespace of its own."""

from __future__ import annotations

import contextlib
import json
import re
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.kube import Kube, wait_for

pytestmark = pytest.mark.cluster

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def ns(local_cluster: Kube) -> Iterator[str]:
    """A namespace of the test's own, deleted (with whatever runs in it) at its end."""
    name = f"t-{uuid.uuid4().hex[:8]}"
    local_cluster.kubectl("create", "namespace", name)
    wait_for(
        lambda: local_cluster.get("serviceaccount", "default", name),
        30,
        f"the default ServiceAccount of {name}",
    )
    yield name
    local_cluster.kubectl("delete", "namespace", name, "--wait=false")


def pod(name: str, command: list[str], *, image: str = "busybox:1.36", **spec: object) -> dict:
    container: dict = {"name": "main", "image": image, "command": command}
    for key in ("resources", "securityContext", "env", "volumeMounts", "ports", "readinessProbe"):
        if key in spec:
            container[key] = spec.pop(key)
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name},
        "spec": {
            "restartPolicy": "Never",
            "terminationGracePeriodSeconds": 2,
            "containers": [container],
            **spec,
        },
    }


def terminated(kube: Kube, name: str, ns: str) -> dict:
    status = (kube.get("pod", name, ns) or {}).get("status") or {}
    if status.get("phase") not in ("Succeeded", "Failed"):
        return {}
    return dict(status["containerStatuses"][0]["state"].get("terminated") or {})


def test_a_pod_runs_and_succeeds_and_its_log_is_served(local_cluster: Kube, ns: str) -> None:
    namespace_env = {
        "name": "POD_NS",
        "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}},
    }
    hello = pod(
        "hello", ["sh", "-c", "echo hello from $(hostname) in $POD_NS"], env=[namespace_env]
    )
    local_cluster.apply(hello, ns)
    end = wait_for(lambda: terminated(local_cluster, "hello", ns), 60, "the Pod to end")
    assert end["exitCode"] == 0 and end["reason"] == "Completed"
    stored = local_cluster.get("pod", "hello", ns)
    assert stored["status"]["phase"] == "Succeeded"
    assert stored["spec"]["nodeName"] in ("node-0", "node-1")  # bound by the real scheduler
    assert re.fullmatch(r"10\.245\.0\.\d+", stored["status"]["podIP"])
    logs = local_cluster.kubectl("logs", "hello", "-n", ns).stdout  # through the API server
    assert logs.strip() == f"hello from hello in {ns}"


def test_a_deployment_gets_its_pods_from_the_controllers_and_the_scheduler(
    local_cluster: Kube, ns: str
) -> None:
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "sleepers"},
        "spec": {
            "replicas": 3,
            "selector": {"matchLabels": {"app": "sleepers"}},
            "template": {
                "metadata": {"labels": {"app": "sleepers"}},
                "spec": {
                    "terminationGracePeriodSeconds": 2,
                    "containers": [
                        {"name": "main", "image": "busybox", "command": ["sleep", "3600"]}
                    ],
                },
            },
        },
    }
    local_cluster.apply(deployment, ns)

    def running() -> list[dict]:
        pods = local_cluster.list("pods", ns, "app=sleepers")
        ready = [p for p in pods if p["status"].get("phase") == "Running"]
        return pods if len(ready) == 3 and len(pods) == 3 else []

    pods = wait_for(running, 60, "3 Running Pods of the Deployment")
    owners = {p["metadata"]["ownerReferences"][0]["kind"] for p in pods}
    assert owners == {"ReplicaSet"}
    assert {p["spec"]["nodeName"] for p in pods} <= {"node-0", "node-1"}
    status = wait_for(
        lambda: (
            (local_cluster.get("deployment", "sleepers", ns) or {})
            .get("status", {})
            .get("readyReplicas")
            == 3
        ),
        30,
        "the Deployment to count 3 ready replicas",
    )
    assert status

    # Deleting the owner: the garbage collector removes the ReplicaSet, then its Pods, and the
    # node agent stops their processes before the final delete.
    local_cluster.kubectl("delete", "deployment", "sleepers", "-n", ns, "--wait=false")
    wait_for(
        lambda: not local_cluster.list("pods", ns, "app=sleepers"), 60, "the Pods to be collected"
    )
    assert not local_cluster.list("replicasets", ns)


def test_a_pod_over_its_memory_limit_is_oom_killed(local_cluster: Kube, ns: str) -> None:
    hog = "b = bytearray(300 * 2**20)\nfor i in range(0, len(b), 4096): b[i] = 1\nprint('survived')"
    local_cluster.apply(
        pod("hog", ["python", "-c", hog], image="python:3.11",
            resources={"limits": {"memory": "100Mi", "cpu": "1"}}),
        ns,
    )  # fmt: skip
    end = wait_for(lambda: terminated(local_cluster, "hog", ns), 60, "the Pod to end")
    assert end["reason"] == "OOMKilled"
    assert end["exitCode"] == 137
    assert local_cluster.pod_phase("hog", ns) == "Failed"


def test_a_cpu_limit_throttles_to_its_quota(local_cluster: Kube, ns: str) -> None:
    burn = (
        "import time\n"
        "wall, cpu = time.monotonic(), time.process_time()\n"
        "while time.monotonic() - wall < 4: pass\n"
        "print(round((time.process_time() - cpu) / (time.monotonic() - wall), 3))"
    )
    local_cluster.apply(
        pod("burn", ["python", "-c", burn], image="python:3.11",
            resources={"limits": {"cpu": "286m", "memory": "128Mi"}}),
        ns,
    )  # fmt: skip
    end = wait_for(lambda: terminated(local_cluster, "burn", ns), 60, "the Pod to end")
    assert end["exitCode"] == 0
    share = float(local_cluster.kubectl("logs", "burn", "-n", ns).stdout)
    assert 0.286 * 0.8 <= share <= 0.286 * 1.2, f"a 286m limit gave {share} of a core"


def test_a_restricted_namespace_rejects_a_privileged_pod(local_cluster: Kube, ns: str) -> None:
    local_cluster.kubectl("label", "namespace", ns, "pod-security.kubernetes.io/enforce=restricted")
    privileged = pod("root", ["sleep", "1"], securityContext={"privileged": True})
    status, body = local_cluster.request("POST", f"/api/v1/namespaces/{ns}/pods", privileged)
    assert status == 403
    assert 'violates PodSecurity "restricted:latest"' in body["message"]
    assert "privileged" in body["message"]


def test_a_service_account_without_a_binding_cannot_create_pods(
    local_cluster: Kube, ns: str
) -> None:
    local_cluster.kubectl("create", "serviceaccount", "nobody", "-n", ns)
    status, reply = local_cluster.request(
        "POST",
        f"/api/v1/namespaces/{ns}/serviceaccounts/nobody/token",
        {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": {}},
    )
    assert status == 201
    token = reply["status"]["token"]
    status, body = local_cluster.request(
        "POST", f"/api/v1/namespaces/{ns}/pods", pod("x", ["true"]), token=token
    )
    assert status == 403
    assert f'"system:serviceaccount:{ns}:nobody" cannot create resource "pods"' in body["message"]
    # The same identity may once a Role allows it: the 403 was RBAC's, not something else.
    local_cluster.kubectl("create", "role", "pods", "--verb=create", "--resource=pods", "-n", ns)
    local_cluster.kubectl(
        "create", "rolebinding", "pods", "--role=pods", f"--serviceaccount={ns}:nobody", "-n", ns
    )
    status, _ = wait_for(
        lambda: (r := local_cluster.request(
            "POST", f"/api/v1/namespaces/{ns}/pods", pod("x", ["true"]), token=token
        ))[0] == 201 and r,
        10,
        "the RoleBinding to take effect",
    )  # fmt: skip
    assert status == 201


def test_helm_installs_a_chart(local_cluster: Kube, ns: str) -> None:
    from tools.k8s_binaries import ensure

    helm = ensure()["helm"]
    import subprocess

    chart = ROOT / "tests" / "data" / "charts" / "tiny"
    env = {
        "KUBECONFIG": str(local_cluster.kubeconfig),
        "HOME": str(local_cluster.state.config.folder),
    }
    done = subprocess.run(
        [str(helm), "install", "demo", str(chart), "-n", ns, "--wait", "--timeout", "90s",
         "--set", "greeting=hi there"],
        capture_output=True, text=True, env={**env, "PATH": "/usr/bin:/bin"}, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    config = local_cluster.get("configmap", "demo-greeting", ns)
    assert config["data"]["greeting"] == "hi there"
    assert config["data"]["kubeVersion"] == "v1.37.2"  # the version ldflags reached Helm
    deployment = local_cluster.get("deployment", "demo-echo", ns)
    assert deployment["status"]["readyReplicas"] == 1
    shown = local_cluster.kubectl("get", "deployment,configmap", "-n", ns).stdout
    assert "demo-echo" in shown and "demo-greeting" in shown
    [echo] = local_cluster.list("pods", ns, "app=demo-echo")
    logs = wait_for(
        lambda: local_cluster.kubectl("logs", echo["metadata"]["name"], "-n", ns).stdout.strip(),
        30,
        "the echo Pod's log",
    )
    assert logs == "hi there"


def test_a_pod_reaches_a_service_by_its_dns_name(local_cluster: Kube, ns: str) -> None:
    server = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "web"},
        "spec": {
            "replicas": 2,
            "selector": {"matchLabels": {"app": "web"}},
            "template": {
                "metadata": {"labels": {"app": "web"}},
                "spec": {
                    "terminationGracePeriodSeconds": 2,
                    "containers": [
                        {
                            "name": "web",
                            "image": "python:3.11",
                            "command": ["python", "-m", "http.server", "8000"],
                            "ports": [{"name": "http", "containerPort": 8000}],
                            "readinessProbe": {
                                "httpGet": {"path": "/", "port": "http"},
                                "periodSeconds": 1,
                            },
                        }
                    ],
                },
            },
        },
    }
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "web"},
        "spec": {"selector": {"app": "web"}, "ports": [{"port": 80, "targetPort": "http"}]},
    }
    local_cluster.apply([server, service], ns)
    wait_for(
        lambda: (
            (local_cluster.get("deployment", "web", ns) or {})
            .get("status", {})
            .get("readyReplicas")
            == 2
        ),
        60,
        "2 ready web Pods",
    )
    cluster_ip = local_cluster.get("service", "web", ns)["spec"]["clusterIP"]

    def programmed() -> bool:  # kube-proxy has written the Service's rules (it syncs ~1 s late)
        with contextlib.suppress(OSError), socket.create_connection((cluster_ip, 80), timeout=1):
            return True
        return False

    began = time.monotonic()
    wait_for(programmed, 30, "kube-proxy to route the Service's ClusterIP")
    print(f"ClusterIP reachable {time.monotonic() - began:.2f}s after the endpoints were ready")
    fetch = (
        "import socket, urllib.request\n"
        f"print(socket.gethostbyname('web.{ns}.svc.cluster.local'))\n"
        "print(urllib.request.urlopen('http://web/', timeout=10).status)\n"
        f"print(urllib.request.urlopen('http://web.{ns}.svc/', timeout=10).status)"
    )
    local_cluster.apply(pod("client", ["python", "-c", fetch], image="python:3.11"), ns)
    end = wait_for(lambda: terminated(local_cluster, "client", ns), 60, "the client to end")
    logs = local_cluster.kubectl("logs", "client", "-n", ns).stdout
    output = logs.split()
    assert end["exitCode"] == 0, logs
    assert output == [cluster_ip, "200", "200"]


def test_an_unknown_image_backs_off_like_a_failed_pull(local_cluster: Kube, ns: str) -> None:
    local_cluster.apply(pod("ghost", ["true"], image="registry.example.invalid/ghost:1.0"), ns)

    def waiting_reason() -> str | None:
        status = (local_cluster.get("pod", "ghost", ns) or {}).get("status") or {}
        states = status.get("containerStatuses") or [{}]
        reason = (states[0].get("state") or {}).get("waiting", {}).get("reason")
        return reason if reason in ("ErrImagePull", "ImagePullBackOff") else None

    wait_for(waiting_reason, 30, "ErrImagePull")
    assert local_cluster.pod_phase("ghost", ns) == "Pending"
    wait_for(lambda: waiting_reason() == "ImagePullBackOff", 40, "ImagePullBackOff")


def test_deletion_waits_the_grace_period_then_kills(local_cluster: Kube, ns: str) -> None:
    stubborn = pod(
        "stubborn", ["sh", "-c", "trap '' TERM; echo started; while true; do sleep 1; done"]
    )
    stubborn["spec"]["terminationGracePeriodSeconds"] = 3
    local_cluster.apply(stubborn, ns)
    wait_for(lambda: local_cluster.pod_phase("stubborn", ns) == "Running", 60, "the Pod to run")
    began = time.monotonic()
    local_cluster.kubectl("delete", "pod", "stubborn", "-n", ns, "--wait=false")
    wait_for(lambda: local_cluster.get("pod", "stubborn", ns) is None, 30, "the Pod to be gone")
    took = time.monotonic() - began
    assert 3.0 <= took < 15.0, f"a Pod ignoring SIGTERM went after {took:.1f}s (grace 3s)"


def test_a_failing_container_is_restarted_under_on_failure(local_cluster: Kube, ns: str) -> None:
    script = (
        "if [ -f /work/ran ]; then echo second; exit 0; fi; touch /work/ran; echo first; exit 3"
    )
    retry = pod(
        "retry",
        ["sh", "-c", script],
        volumeMounts=[{"name": "work", "mountPath": "/work"}],
        volumes=[{"name": "work", "emptyDir": {}}],
    )
    retry["spec"]["restartPolicy"] = "OnFailure"
    local_cluster.apply(retry, ns)
    wait_for(
        lambda: local_cluster.pod_phase("retry", ns) == "Succeeded",
        60,
        "the retried Pod to succeed",
    )
    [state] = local_cluster.get("pod", "retry", ns)["status"]["containerStatuses"]
    assert state["restartCount"] == 1
    assert state["lastState"]["terminated"]["exitCode"] == 3
    assert local_cluster.kubectl("logs", "retry", "-n", ns).stdout.strip() == "second"
    assert local_cluster.kubectl("logs", "retry", "-n", ns, "--previous").stdout.strip() == "first"


def test_in_cluster_clients_reach_the_api_with_their_projected_token(
    local_cluster: Kube, ns: str
) -> None:
    """The ServiceAccount admission adds the kube-api-access volume; the agent fills it from
    the TokenRequest API and mounts it where in-cluster clients look for it."""
    probe = (
        "import json, os, ssl, urllib.request\n"
        "base = '/var/run/secrets/kubernetes.io/serviceaccount'\n"
        "token = open(base + '/token').read()\n"
        "context = ssl.create_default_context(cafile=base + '/ca.crt')\n"
        "host = os.environ['KUBERNETES_SERVICE_HOST']\n"
        "port = os.environ['KUBERNETES_SERVICE_PORT']\n"
        "namespace = open(base + '/namespace').read()\n"
        "url = f'https://{host}:{port}/api/v1/namespaces/{namespace}/pods'\n"
        "request = urllib.request.Request(url, headers={'Authorization': 'Bearer ' + token})\n"
        "try:\n"
        "    urllib.request.urlopen(request, context=context)\n"
        "except urllib.error.HTTPError as error:\n"
        "    print(json.dumps({'code': error.code, 'message': json.load(error)['message']}))\n"
    )
    local_cluster.apply(pod("incluster", ["python", "-c", probe], image="python:3.11"), ns)
    end = wait_for(lambda: terminated(local_cluster, "incluster", ns), 60, "the Pod to end")
    logs = local_cluster.kubectl("logs", "incluster", "-n", ns).stdout
    assert end["exitCode"] == 0, logs
    reply = json.loads(logs)
    # Authenticated as the Pod's ServiceAccount (RBAC then says no): the token, the CA and
    # the kubernetes Service's ClusterIP all worked.
    assert reply["code"] == 403
    assert f"system:serviceaccount:{ns}:default" in reply["message"]


def test_a_claim_gets_a_volume_from_the_default_storage_class(local_cluster: Kube, ns: str) -> None:
    claim = {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {"name": "data"},
        "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}},
    }
    writer = pod(
        "writer",
        ["sh", "-c", "echo kept > /data/note && cat /data/note"],
        volumeMounts=[{"name": "data", "mountPath": "/data"}],
        volumes=[{"name": "data", "persistentVolumeClaim": {"claimName": "data"}}],
        securityContext={"runAsUser": 1000, "runAsGroup": 1000},
    )
    local_cluster.apply([claim, writer], ns)
    end = wait_for(lambda: terminated(local_cluster, "writer", ns), 60, "the writer to end")
    assert end["exitCode"] == 0
    assert local_cluster.kubectl("logs", "writer", "-n", ns).stdout.strip() == "kept"
    bound = local_cluster.get("persistentvolumeclaim", "data", ns)
    assert bound["status"]["phase"] == "Bound"
    assert bound["spec"]["storageClassName"] == "local"  # the default class
    volume = bound["spec"]["volumeName"]
    folder = Path(local_cluster.get("persistentvolume", volume, "")["spec"]["hostPath"]["path"])
    assert (folder / "note").read_text() == "kept\n"
    local_cluster.kubectl("delete", "pod", "writer", "-n", ns)
    local_cluster.kubectl("delete", "persistentvolumeclaim", "data", "-n", ns)
    wait_for(
        lambda: local_cluster.get("persistentvolume", volume, "") is None, 30, "the volume to go"
    )
    assert not folder.exists()


def test_running_pods_keep_resolving_names_while_other_pods_join(
    local_cluster: Kube, ns: str
) -> None:
    """A bridge without an address of its own takes the lowest MAC of its ports: Pods joining
    it changed the MAC of the running Pods' gateway and DNS server, whose lookups then went
    nowhere for 5 s or more (seen as workers' Redis connections failing mid-run)."""
    from localcluster import network

    bridge = local_cluster.state.config.bridge
    bridge_mac = Path(f"/sys/class/net/{bridge}/address")
    resolve = (
        "import socket, time\n"
        "slowest, began = 0.0, time.monotonic()\n"
        "while time.monotonic() - began < 20:\n"
        "    start = time.monotonic()\n"
        "    try:\n"
        "        socket.gethostbyname('kubernetes.default.svc.cluster.local')\n"
        "        slowest = max(slowest, time.monotonic() - start)\n"
        "    except OSError:\n"
        "        slowest = 99.0\n"
        "    time.sleep(0.1)\n"
        "print(round(slowest, 3))"
    )
    local_cluster.apply(pod("resolver", ["python", "-c", resolve], image="python:3.11"), ns)
    wait_for(lambda: local_cluster.pod_phase("resolver", ns) == "Running", 60, "the resolver")
    before = bridge_mac.read_text().strip()
    joiners = [pod(f"joiner-{i}", ["sleep", "60"]) for i in range(8)]
    local_cluster.apply(joiners, ns)
    wait_for(
        lambda: all(local_cluster.pod_phase(f"joiner-{i}", ns) == "Running" for i in range(8)),
        60,
        "8 Pods joining the bridge",
    )
    end = wait_for(lambda: terminated(local_cluster, "resolver", ns), 60, "the resolver to end")
    slowest = float(local_cluster.kubectl("logs", "resolver", "-n", ns).stdout)
    assert end["exitCode"] == 0
    assert slowest < 1.0, f"a name lookup took {slowest}s while Pods joined the bridge"
    assert (
        before
        == bridge_mac.read_text().strip()
        == network.mac_of(local_cluster.state.config.bridge_ip)
    )
