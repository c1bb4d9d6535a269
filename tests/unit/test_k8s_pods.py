"""Worker Pod builders, asserted as data: resources, security, Secret use, labels, names."""

from __future__ import annotations

import re
from typing import Any

import pytest

from dagkube.kubernetes.pods import (
    REDIS_CA_FILE,
    WORKER_REDIS_CA_KEY,
    WORKER_REDIS_SECRET,
    build_build_pod,
    build_worker_pod,
    build_worker_redis_secret,
    pool_selector,
    worker_pod_name,
    worker_pod_serial,
)

UID = "1a2b3c4d-5e6f-7a8b-9c0d-112233445566"
OWNER = {"name": "tree", "uid": UID}
DNS_1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


def pod(**overrides: Any) -> dict[str, Any]:
    options: dict[str, Any] = {
        "name": worker_pod_name(UID, 512, 0),
        "namespace": "jobs",
        "run_id": "tree-20260101-120000-abc123",
        "pool": "wf-tree",
        "memory_mib": 512,
        "image": "ghcr.io/example/dagkube-worker:1.0",
        "redis_url_secret": ("dagkube-redis", "url"),
        "idle_timeout_s": 30.0,
        "spawned_at": 1767268800.25,
        "owner": OWNER,
    }
    options.update(overrides)
    return build_worker_pod(**options)


def container(manifest: dict[str, Any]) -> dict[str, Any]:
    (only,) = manifest["spec"]["containers"]
    return only


def env(manifest: dict[str, Any]) -> dict[str, Any]:
    return {item["name"]: item for item in container(manifest)["env"]}


def argument(manifest: dict[str, Any], flag: str) -> str:
    command = container(manifest)["command"]
    return command[command.index(flag) + 1]


@pytest.mark.parametrize(
    ("memory_mib", "max_cpu", "cpu", "cpu_arg", "threads"),
    [
        (512, 6.0, "286m", "0.286", "1"),
        (2048, 6.0, "1143m", "1.143", "1"),
        (4096, 6.0, "2286m", "2.286", "2"),
        (16384, 6.0, "6000m", "6", "6"),  # 9.14 vCPUs by memory, capped at maxCpu
        (16384, 2.5, "2500m", "2.5", "2"),
    ],
)
def test_cpu_is_proportional_to_memory_and_capped(memory_mib, max_cpu, cpu, cpu_arg, threads):
    manifest = pod(memory_mib=memory_mib, max_cpu=max_cpu)
    resources = container(manifest)["resources"]
    expected = {"cpu": cpu, "memory": f"{memory_mib}Mi", "ephemeral-storage": "1Gi"}
    assert resources == {"requests": expected, "limits": expected}
    assert argument(manifest, "--cpu") == cpu_arg
    for variable in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        assert env(manifest)[variable] == {"name": variable, "value": threads}


def test_memory_per_cpu_changes_the_cpu():
    manifest = pod(memory_mib=1024, memory_per_cpu_mib=1024)
    assert container(manifest)["resources"]["limits"]["cpu"] == "1000m"


def test_command_runs_the_worker_agent_for_the_pool_and_class():
    manifest = pod()
    assert container(manifest)["command"] == [
        "python",
        "-m",
        "dagkube.worker",
        "--pool",
        "wf-tree",
        "--memory-mib",
        "512",
        "--worker-id",
        manifest["metadata"]["name"],
        "--cpu",
        "0.286",
        "--idle-timeout",
        "30",
    ]


def test_redis_url_comes_from_the_secret_and_never_in_plain_env():
    manifest = pod()
    assert env(manifest)["DAGKUBE_REDIS_URL"] == {
        "name": "DAGKUBE_REDIS_URL",
        "valueFrom": {"secretKeyRef": {"name": "dagkube-redis", "key": "url"}},
    }
    assert all("redis://" not in str(item.get("value", "")) for item in env(manifest).values())


def test_spawned_at_is_the_build_time_epoch_the_worker_parses():
    assert float(env(pod(spawned_at=1767268800.25))["DAGKUBE_SPAWNED_AT"]["value"]) == (
        1767268800.25
    )


def test_optional_environment_only_when_asked():
    plain = env(pod())
    assert "DAGKUBE_STARTUP_DELAY_S" not in plain
    assert "DAGKUBE_PREWARM_RUN" not in plain
    extra = env(pod(startup_delay_s=1.5, prewarm_for="run-1"))
    assert extra["DAGKUBE_STARTUP_DELAY_S"]["value"] == "1.5"
    assert extra["DAGKUBE_PREWARM_RUN"]["value"] == "run-1"
    assert "DAGKUBE_DEMAND_RUN" not in plain and "DAGKUBE_DEMAND_RUN" not in extra
    demand = env(pod(demand_for="run-2"))
    assert demand["DAGKUBE_DEMAND_RUN"]["value"] == "run-2"
    assert "DAGKUBE_PREWARM_RUN" not in demand


def test_pod_is_locked_down():
    manifest = pod()
    spec = manifest["spec"]
    assert spec["automountServiceAccountToken"] is False
    assert "serviceAccountName" not in spec
    assert spec["restartPolicy"] == "Never"
    assert spec["terminationGracePeriodSeconds"] == 10
    assert spec["securityContext"] == {
        "runAsNonRoot": True,
        "runAsUser": 10001,
        "runAsGroup": 10001,
        "fsGroup": 10001,
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    assert container(manifest)["securityContext"] == {
        "readOnlyRootFilesystem": True,
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
    }


def test_tmp_is_a_writable_empty_dir():
    manifest = pod()
    assert manifest["spec"]["volumes"] == [{"name": "tmp", "emptyDir": {"sizeLimit": "1Gi"}}]
    assert container(manifest)["volumeMounts"] == [{"name": "tmp", "mountPath": "/tmp"}]
    assert env(manifest)["TMPDIR"]["value"] == "/tmp"


def test_disk_is_bounded_by_default_and_by_the_setting():
    """Ephemeral storage request = limit, and the same size limit on the /tmp emptyDir: a task
    cannot fill the node's disk (the kubelet evicts the Pod past it)."""
    resources = container(pod())["resources"]
    assert resources["requests"]["ephemeral-storage"] == "1Gi"
    assert resources["limits"]["ephemeral-storage"] == "1Gi"
    manifest = pod(ephemeral_storage_mib=1536)
    assert container(manifest)["resources"] == {
        "requests": {"cpu": "286m", "memory": "512Mi", "ephemeral-storage": "1536Mi"},
        "limits": {"cpu": "286m", "memory": "512Mi", "ephemeral-storage": "1536Mi"},
    }
    assert manifest["spec"]["volumes"] == [{"name": "tmp", "emptyDir": {"sizeLimit": "1536Mi"}}]


def test_active_deadline_only_when_given():
    assert "activeDeadlineSeconds" not in pod()["spec"]
    assert pod(active_deadline_s=3720)["spec"]["activeDeadlineSeconds"] == 3720


@pytest.mark.parametrize(
    ("overrides", "words"),
    [
        ({"ephemeral_storage_mib": 0}, "got 0 MiB and None s"),
        ({"active_deadline_s": 0}, "got 1024 MiB and 0 s"),
    ],
)
def test_bad_disk_or_deadline_is_rejected(overrides, words):
    with pytest.raises(ValueError, match=words):
        pod(**overrides)


def test_labels_use_the_fixed_vocabulary_and_extras_cannot_override_it():
    manifest = pod(memory_mib=2048, labels={"team": "a", "dagkube.io/pool": "other"})
    labels = manifest["metadata"]["labels"]
    assert labels == {
        "team": "a",
        "app.kubernetes.io/name": "dagkube",
        "app.kubernetes.io/component": "worker",
        "app.kubernetes.io/managed-by": "dagkube-operator",
        "dagkube.io/run": "tree-20260101-120000-abc123",
        "dagkube.io/class": "2Gi",
        "dagkube.io/component": "worker",
        "dagkube.io/pool": "wf-tree",
    }
    assert pool_selector("wf-tree") == "dagkube.io/pool=wf-tree"


def test_shared_pool_pods_have_no_owner_and_the_shared_run_label():
    manifest = pod(run_id=None, owner=None)
    assert manifest["metadata"]["labels"]["dagkube.io/run"] == "shared"
    assert "ownerReferences" not in manifest["metadata"]


def test_owner_reference_points_at_the_workflow():
    assert pod()["metadata"]["ownerReferences"] == [
        {
            "apiVersion": "dagkube.io/v1alpha1",
            "kind": "Workflow",
            "name": "tree",
            "uid": UID,
            "controller": True,
            "blockOwnerDeletion": True,
        }
    ]


@pytest.mark.parametrize("pool", ["-bad", "x" * 64, "has space", "a/b"])
def test_invalid_label_values_are_rejected_with_the_rule(pool):
    with pytest.raises(ValueError, match=r"dagkube\.io/pool=.*at most 63"):
        pod(pool=pool)


def test_names_are_deterministic_dns_labels_from_the_owner_uid():
    name = worker_pod_name(UID, 512, 3)
    assert name == "dk-1a2b3c4d-512-3"
    assert name == worker_pod_name(UID, 512, 3)
    assert worker_pod_name(UID.upper(), 512, 3) == name
    longest = worker_pod_name("Z" * 40, 16 * 1024 * 1024, 10**12)
    for candidate in (name, longest):
        assert len(candidate) <= 63
        assert DNS_1123_LABEL.match(candidate)
    assert worker_pod_name("other-uid", 512, 3) != name


def test_serial_is_read_back_only_from_this_owners_names():
    assert worker_pod_serial(worker_pod_name(UID, 1024, 17), UID) == 17
    assert worker_pod_serial(worker_pod_name("ffffffff", 1024, 17), UID) is None
    assert worker_pod_serial("dk-1a2b3c4d-debug", UID) is None


@pytest.mark.parametrize(
    ("uid", "memory_mib", "serial"), [("---", 512, 0), (UID, 0, 0), (UID, 512, -1)]
)
def test_bad_name_parts_are_rejected(uid, memory_mib, serial):
    with pytest.raises(ValueError, match=r"uid|memory class"):
        worker_pod_name(uid, memory_mib, serial)


# ---------------------------------------------------------------- a TLS Redis' CA (issue 17)
def build_pod(**overrides: Any) -> dict[str, Any]:
    options: dict[str, Any] = {
        "name": "dk-1a2b3c4d-build",
        "namespace": "jobs",
        "image": "ghcr.io/example/dagkube-worker:1.0",
        "key": "dk:ns:jobs:build:x",
        "request": {"module": "team.flows:build", "args": {}},
        "redis_url_secret": (WORKER_REDIS_SECRET, "url"),
        "memory_mib": 512,
        "cpu_millicores": 500,
        "ephemeral_storage_mib": 256,
        "deadline_s": 130,
    }
    options.update(overrides)
    return build_build_pod(**options)


@pytest.mark.parametrize("builder", [pod, build_pod], ids=["worker", "build"])
def test_a_tls_redis_ca_is_mounted_read_only_where_the_url_names_it(builder):
    plain = builder()
    assert [v["name"] for v in plain["spec"]["volumes"]] == ["tmp"]  # no TLS: no CA
    manifest = builder(redis_ca_secret=(WORKER_REDIS_SECRET, WORKER_REDIS_CA_KEY))
    volumes = {volume["name"]: volume for volume in manifest["spec"]["volumes"]}
    directory, _, file_name = REDIS_CA_FILE.rpartition("/")
    assert volumes["redis-ca"]["secret"] == {
        "secretName": WORKER_REDIS_SECRET,
        "items": [{"key": WORKER_REDIS_CA_KEY, "path": file_name}],
    }
    mounts = {mount["name"]: mount for mount in container(manifest)["volumeMounts"]}
    assert mounts["redis-ca"] == {"name": "redis-ca", "mountPath": directory, "readOnly": True}
    assert mounts["tmp"] == {"name": "tmp", "mountPath": "/tmp"}
    assert volumes["tmp"] == plain["spec"]["volumes"][0]


def test_the_worker_secret_carries_the_ca_only_with_tls():
    url = "rediss://dagkube-worker-jobs:pw@redis.dk.svc:6379/0?ssl_ca_certs=" + REDIS_CA_FILE
    plain = build_worker_redis_secret("jobs", "redis://dagkube-worker-jobs:pw@redis:6379/0")
    assert set(plain["stringData"]) == {"url"}
    tls = build_worker_redis_secret("jobs", url, "-----BEGIN CERTIFICATE-----\n")
    assert tls["stringData"] == {"url": url, WORKER_REDIS_CA_KEY: "-----BEGIN CERTIFICATE-----\n"}
    assert tls["metadata"]["name"] == WORKER_REDIS_SECRET
