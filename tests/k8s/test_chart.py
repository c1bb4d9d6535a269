"""The Helm chart, the Workflow CRD and the example manifests, checked with real binaries.

`helm` (v4) and `kubectl` come from PyPI via tools/k8s_binaries.py; rendered manifests are
validated offline against the Kubernetes 1.33 OpenAPI schemas (kubernetes-validate), and
Workflow objects against the CRD's own openAPIV3Schema (jsonschema). No cluster is needed.
"""

from __future__ import annotations

import base64
import copy
import importlib.util
import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from redis import connection as redis_connection

import dagkube
from dagkube.kubernetes.pods import REDIS_CA_FILE, build_build_pod, worker_labels
from dagkube.store import acl
from dagkube_operator.config import OperatorConfig

pytestmark = pytest.mark.k8s

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "dagkube"
CRD_FILE = ROOT / "crds" / "workflow.yaml"
CHART_CRD_FILE = CHART / "files" / "crd-workflow.yaml"
EXAMPLES = sorted((ROOT / "examples" / "manifests").glob("*.yaml"))
KUBERNETES_VERSION = "1.33"  # the kubectl the tests run is 1.33 too
NAMESPACE = "dk"
# dagkube's images are built by its users; the chart requires their repositories.
IMAGES = (
    "--set", "operator.image.repository=registry.example.org/dagkube/operator",
    "--set", "worker.image.repository=registry.example.org/dagkube/worker",
)  # fmt: skip

# Kinds kubernetes-validate has no schema for, and why that is fine. Each is still checked by a
# test of its own below; test_kinds_without_builtin_schema proves the reason stays true.
NO_BUILTIN_SCHEMA = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"): (
        "a Prometheus Operator CRD, not a Kubernetes built-in: kubernetes-validate ships no schema"
    ),
    ("kopf.dev/v1", "KopfPeering"): "kopf's CRD, installed from the chart's crds/ directory",
    ("kopf.dev/v1", "ClusterKopfPeering"): "kopf's CRD, installed from the chart's crds/ directory",
}

VALUE_SETS: dict[str, list[str]] = {
    "default": [],
    "clusterwide-external-redis-servicemonitor": [
        "--set", "rbac.clusterWide=true",
        "--set", "redis.external.url=redis://redis.example.org:6379/0",
        "--set", "redis.external.existingSecret=shared-redis",
        "--set", "metrics.serviceMonitor.enabled=true",
    ],
}  # fmt: skip


def load_module(name: str, path: Path) -> Any:
    """Import a file that is not on sys.path (tools/, the examples) under the given name."""
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


k8s_binaries = load_module("k8s_binaries", ROOT / "tools" / "k8s_binaries.py")


@dataclass(frozen=True)
class Tools:
    """The real binaries, run with Helm's caches in a temporary home and no cluster configured."""

    paths: dict[str, Path]
    env: dict[str, str]

    def run(self, name: str, *args: str | Path) -> subprocess.CompletedProcess[str]:
        """Run a binary; helm's template, lint and install get the (required) image values
        first, so a test's own --set comes later and wins."""
        if name == "helm" and args and args[0] in ("template", "lint", "install"):
            args = (args[0], *IMAGES, *args[1:])
        command = [str(self.paths[name]), *map(str, args)]
        return subprocess.run(command, capture_output=True, text=True, env=self.env, timeout=120)

    def template(self, *args: str | Path, chart: Path = CHART) -> list[dict[str, Any]]:
        """`helm template` of the chart as parsed documents; the render must succeed."""
        result = self.run("helm", "template", "rel", chart, "-n", NAMESPACE, *args)
        assert result.returncode == 0, result.stderr
        return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


@pytest.fixture(scope="session")
def tools(tmp_path_factory: pytest.TempPathFactory) -> Tools:
    try:
        paths = k8s_binaries.ensure()
    except k8s_binaries.BinariesUnavailable as error:
        pytest.skip(f"real helm/kubectl unavailable: {error}")
    home = tmp_path_factory.mktemp("k8s-home")
    env = {key: value for key, value in os.environ.items() if not key.startswith("HELM_")}
    env.update(
        HOME=str(home),
        HELM_CACHE_HOME=str(home / "cache"),
        HELM_CONFIG_HOME=str(home / "config"),
        HELM_DATA_HOME=str(home / "data"),
        KUBECONFIG=str(home / "no-kubeconfig"),
    )
    return Tools(paths, env)


@pytest.fixture(scope="session")
def rendered(tools: Tools) -> dict[str, list[dict]]:
    return {name: tools.template(*args) for name, args in VALUE_SETS.items()}


def only(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    matches = [doc for doc in docs if doc["kind"] == kind]
    assert len(matches) == 1, f"expected one {kind}, found {[d['metadata'] for d in matches]}"
    return matches[0]


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def load_yaml_all(path: Path) -> list[Any]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def _b64(text: str) -> str:
    return base64.b64decode(text).decode()


def redis_options(args: list[str]) -> dict[str, list[str]]:
    """redis-server's command-line options (``--name value...``): name -> its values."""
    options: dict[str, list[str]] = {}
    for arg in args:
        if arg.startswith("--"):
            name = arg
            options[name] = []
        else:
            options[name].append(arg)
    return options


# ---------------------------------------------------------------- helm lint and render
def test_binaries_are_the_pinned_real_ones(tools: Tools) -> None:
    reported = k8s_binaries.versions(tools.paths)
    assert reported["helm"].startswith("v4.")
    assert "v1.33." in reported["kubectl"]


@pytest.mark.parametrize("strict", [False, True], ids=["lint", "lint-strict"])
@pytest.mark.parametrize("value_set", VALUE_SETS)
def test_helm_lint_passes(tools: Tools, value_set: str, strict: bool) -> None:
    flags = ["--strict"] if strict else []
    result = tools.run("helm", "lint", CHART, *flags, *VALUE_SETS[value_set])
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 chart(s) linted, 0 chart(s) failed" in result.stdout


@pytest.mark.parametrize("value_set", VALUE_SETS)
def test_rendered_manifests_match_kubernetes_schemas(
    rendered: dict[str, list[dict]], value_set: str
) -> None:
    checked = []
    for doc in rendered[value_set]:
        if (doc["apiVersion"], doc["kind"]) in NO_BUILTIN_SCHEMA:
            continue
        try:
            kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as error:
            where = ".".join(map(str, error.path))
            pytest.fail(f"{doc['kind']}/{doc['metadata']['name']}: {where}: {error.message}")
        checked.append(doc["kind"])
    assert {"Deployment", "ServiceAccount", "Service", "CustomResourceDefinition"} <= set(checked)


def test_strict_kubernetes_validation_catches_a_misspelt_field(
    rendered: dict[str, list[dict]],
) -> None:
    deployment = copy.deepcopy(only(rendered["default"], "Deployment"))
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    container["securityContext"]["readOnlyRootFileSystem"] = True
    with pytest.raises(kubernetes_validate.ValidationError, match="readOnlyRootFileSystem"):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSION, strict=True)


def test_kinds_without_builtin_schema(rendered: dict[str, list[dict]]) -> None:
    docs = [doc for value_set in rendered.values() for doc in value_set]
    for api_version, kind in NO_BUILTIN_SCHEMA:
        doc = next(d for d in docs if (d["apiVersion"], d["kind"]) == (api_version, kind))
        with pytest.raises(kubernetes_validate.SchemaNotFoundError):
            kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def test_service_monitor_scrapes_the_metrics_service(rendered: dict[str, list[dict]]) -> None:
    docs = rendered["clusterwide-external-redis-servicemonitor"]
    monitor, service = only(docs, "ServiceMonitor"), only(docs, "Service")
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}
    selector = monitor["spec"]["selector"]["matchLabels"]
    assert selector.items() <= service["metadata"]["labels"].items()
    [endpoint] = monitor["spec"]["endpoints"]
    assert endpoint["path"] == "/metrics"
    assert endpoint["port"] in {port["name"] for port in service["spec"]["ports"]}
    assert "ServiceMonitor" not in {doc["kind"] for doc in rendered["default"]}


def test_client_side_install_prints_the_notes(tools: Tools) -> None:
    result = tools.run("helm", "install", "rel", CHART, "-n", NAMESPACE, "--dry-run=client")
    assert result.returncode == 0, result.stderr
    notes = result.stdout.split("NOTES:", 1)[1]
    assert f'The operator watches Workflows in namespace "{NAMESPACE}" only.' in notes
    assert f"kubectl -n {NAMESPACE} get dkwf -w" in notes
    assert 'Secret "rel-dagkube-redis"' in notes


# ---------------------------------------------------------------- values.schema.json
@pytest.mark.parametrize(
    ("setting", "named"),
    [
        ("rbac.clusterWide=notabool", "/rbac/clusterWide"),
        ("replicaCount=2", "'replicaCount' not allowed"),
        ("redis.persistence.size=lots", "/redis/persistence/size"),
        ("operator.image.pullPolicy=Sometimes", "/operator/image/pullPolicy"),
        ("metrics.serviceMonitor.interval=soon", "/metrics/serviceMonitor/interval"),
        ("operator.defaultTimeoutSeconds=-1", "/operator/defaultTimeoutSeconds"),
        ("redis.maxmemory=1Gi", "/redis/maxmemory"),
    ],
)
def test_values_schema_rejects_bad_values(tools: Tools, setting: str, named: str) -> None:
    result = tools.run("helm", "template", "rel", CHART, "--set", setting)
    assert result.returncode != 0
    assert "don't meet the specifications of the schema" in result.stderr
    assert named in result.stderr


@pytest.mark.parametrize("key", ["operator.image", "worker.image"])
def test_an_image_left_unset_stops_the_install_and_says_how_to_build_it(
    tools: Tools, key: str
) -> None:
    result = tools.run("helm", "template", "rel", CHART, "--set", f"{key}.repository=")
    assert result.returncode != 0
    message = " ".join(result.stderr.split())
    assert f"{key}.repository is not set: dagkube's images are not published" in message
    assert "make images" in message


def test_external_redis_needs_its_secret(tools: Tools) -> None:
    args = ["--set", "redis.external.url=redis://redis.example.org:6379/0"]
    result = tools.run("helm", "template", "rel", CHART, *args)
    assert result.returncode != 0
    assert "redis.external.existingSecret is required" in result.stderr


# ---------------------------------------------------------------- what the chart renders
def test_rbac_is_namespaced_by_default(rendered: dict[str, list[dict]]) -> None:
    docs = rendered["default"]
    kinds = [doc["kind"] for doc in docs]
    assert "ClusterRole" not in kinds and "ClusterRoleBinding" not in kinds
    role, binding = only(docs, "Role"), only(docs, "RoleBinding")
    assert role["metadata"]["namespace"] == NAMESPACE
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "Role",
        "name": role["metadata"]["name"],
    }
    account = only(docs, "ServiceAccount")["metadata"]["name"]
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": account, "namespace": NAMESPACE}
    ]
    env = _operator_env(docs)
    assert env["DAGKUBE_WATCH_NAMESPACE"] == NAMESPACE


def test_rbac_is_cluster_wide_only_when_asked(rendered: dict[str, list[dict]]) -> None:
    docs = rendered["clusterwide-external-redis-servicemonitor"]
    kinds = [doc["kind"] for doc in docs]
    assert "Role" not in kinds and "RoleBinding" not in kinds
    role, binding = only(docs, "ClusterRole"), only(docs, "ClusterRoleBinding")
    assert "namespace" not in role["metadata"]
    assert binding["roleRef"]["kind"] == "ClusterRole"
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert _operator_env(docs)["DAGKUBE_WATCH_NAMESPACE"] == ""
    # The same grants, with the cluster-scoped peering object instead of the namespaced one.
    namespaced = only(rendered["default"], "Role")["rules"]
    cluster_peering = [
        {**rule, "resources": ["clusterkopfpeerings"]}
        if rule["resources"] == ["kopfpeerings"]
        else rule
        for rule in namespaced
    ]
    assert role["rules"] == cluster_peering


def test_operator_permissions_are_least_privilege(rendered: dict[str, list[dict]]) -> None:
    granted: dict[str, set[str]] = {}
    for rule in only(rendered["default"], "Role")["rules"]:
        assert "*" not in rule["verbs"] and "*" not in rule["resources"]
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                granted.setdefault(f"{group}/{resource}", set()).update(rule["verbs"])
    # tests/cluster/test_operator.py checks these against the calls the operator really makes.
    assert granted == {
        "dagkube.io/workflows": {"list", "watch", "patch", "delete"},
        "dagkube.io/workflows/status": {"patch"},
        "dagkube.io/workflows/finalizers": {"update"},
        "/pods": {"create", "get", "list", "delete"},
        "/pods/log": {"get"},  # a failed build Pod's last words
        "/events": {"create"},
        "/configmaps": {"create", "get"},  # the shared worker pools' owners
        "/secrets": {"create", "get"},
        "kopf.dev/kopfpeerings": {"list", "watch", "patch"},
    }


def _operator_container(docs: list[dict[str, Any]]) -> dict[str, Any]:
    [container] = only(docs, "Deployment")["spec"]["template"]["spec"]["containers"]
    return container


def _operator_env(docs: list[dict[str, Any]]) -> dict[str, Any]:
    env = _operator_container(docs)["env"]
    return {item["name"]: item.get("value", item.get("valueFrom")) for item in env}


def test_operator_deployment(rendered: dict[str, list[dict]]) -> None:
    docs = rendered["default"]
    deployment = only(docs, "Deployment")
    assert deployment["spec"]["replicas"] == 1
    # Peering: a new Pod stands by until the old one has exited, so an update has no gap.
    assert deployment["spec"]["strategy"] == {
        "type": "RollingUpdate",
        "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0},
    }
    pod = deployment["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == only(docs, "ServiceAccount")["metadata"]["name"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    container = _operator_container(docs)
    assert container["command"] == ["python", "-m", "dagkube_operator"]
    assert container["ports"] == [{"name": "metrics", "containerPort": 8080, "protocol": "TCP"}]
    for probe in ("livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"] == {"drop": ["ALL"]}
    assert security["seccompProfile"] == {"type": "RuntimeDefault"}
    assert container["resources"]["limits"]["memory"]
    assert container["image"] == "registry.example.org/dagkube/operator:0.1.0"
    labels = deployment["metadata"]["labels"]
    assert labels["app.kubernetes.io/component"] == "operator"
    assert labels["helm.sh/chart"] == "dagkube-0.1.0"
    assert labels["app.kubernetes.io/managed-by"] == "Helm"


@pytest.mark.parametrize("value_set", VALUE_SETS)
def test_operator_replicas_share_a_peering_object(
    rendered: dict[str, list[dict]], value_set: str
) -> None:
    docs = rendered[value_set]
    cluster_wide = value_set != "default"
    peering = only(docs, "ClusterKopfPeering" if cluster_wide else "KopfPeering")
    env = _operator_env(docs)
    assert env["DAGKUBE_PEERING"] == peering["metadata"]["name"]
    assert env["DAGKUBE_PEERING_LIFETIME"] == "8"
    assert env["POD_ID"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    assert ("namespace" in peering["metadata"]) is not cluster_wide
    if cluster_wide:  # one cluster-scoped object per release namespace
        assert peering["metadata"]["name"] == f"{NAMESPACE}-rel-dagkube"


def test_the_chart_installs_kopfs_peering_crds(tools: Tools) -> None:
    crds = {
        doc["metadata"]["name"]: doc for doc in load_yaml_all(CHART / "crds" / "kopf-peering.yaml")
    }
    assert set(crds) == {"kopfpeerings.kopf.dev", "clusterkopfpeerings.kopf.dev"}
    for crd in crds.values():
        kubernetes_validate.validate(crd, KUBERNETES_VERSION, strict=True)
        [version] = crd["spec"]["versions"]
        # kopf writes the keep-alives into .status through the object itself: no subresource.
        assert "subresources" not in version
    with_crds = tools.template("--include-crds")
    names = {d["metadata"]["name"] for d in with_crds if d["kind"] == "CustomResourceDefinition"}
    assert set(crds) <= names


def test_several_operator_replicas_need_peering(tools: Tools) -> None:
    two = tools.template("--set", "operator.replicas=2")
    assert only(two, "Deployment")["spec"]["replicas"] == 2
    result = tools.run(
        "helm", "template", "rel", CHART, "-n", NAMESPACE,
        "--set", "operator.replicas=2", "--set", "operator.peering.enabled=false",
    )  # fmt: skip
    assert result.returncode != 0
    assert "operator.replicas=2 needs operator.peering.enabled=true" in result.stderr
    alone = tools.template("--set", "operator.peering.enabled=false")
    assert only(alone, "Deployment")["spec"]["strategy"] == {"type": "Recreate"}
    assert "DAGKUBE_PEERING" not in _operator_env(alone)
    assert "KopfPeering" not in {doc["kind"] for doc in alone}
    grants = {r for rule in only(alone, "Role")["rules"] for r in rule["resources"]}
    assert "kopfpeerings" not in grants


def test_operator_reaches_the_bundled_redis(rendered: dict[str, list[dict]]) -> None:
    docs = rendered["default"]
    env = _operator_env(docs)
    secret, service = only(docs, "Secret"), only(docs, "StatefulSet")["spec"]["serviceName"]
    name = secret["metadata"]["name"]
    # as its own user, with its own password (the default user's is for people)
    assert env["DAGKUBE_REDIS_URL"] == (
        f"redis://{acl.OPERATOR_USER}@{service}.{NAMESPACE}.svc:6379/0"
    )
    assert env["DAGKUBE_REDIS_PASSWORD"] == {
        "secretKeyRef": {"name": name, "key": "redis-operator-password"}
    }
    assert (env["DAGKUBE_REDIS_URL_SECRET"], env["DAGKUBE_REDIS_URL_SECRET_KEY"]) == (
        name,
        "redis-url",
    )
    assert env["DAGKUBE_WORKER_IMAGE"] == "registry.example.org/dagkube/worker:0.1.0"
    password = _b64(secret["data"]["redis-password"])
    assert re.fullmatch(r"[A-Za-z0-9]{32}", password)
    operator_password = _b64(secret["data"]["redis-operator-password"])
    assert re.fullmatch(r"[A-Za-z0-9]{32}", operator_password) and operator_password != password
    assert _b64(secret["data"]["redis-url"]) == (
        f"redis://:{password}@{service}.{NAMESPACE}.svc:6379/0"
    )
    assert service in {doc["metadata"]["name"] for doc in docs if doc["kind"] == "Service"}


@pytest.mark.parametrize(
    ("settings", "seconds"),
    [
        ([], 3600.0),
        (["--set", "operator.defaultTimeoutSeconds=0"], 0.0),
        (["--set-json", "operator.defaultTimeoutSeconds=90.5"], 90.5),  # --set gives a string
    ],
    ids=["default", "off", "fraction"],
)
def test_operator_default_timeout_reaches_the_operator(
    tools: Tools, settings: list[str], seconds: float
) -> None:
    """The chart's value becomes DAGKUBE_DEFAULT_TIMEOUT, which the operator's config reads."""
    env = _operator_env(tools.template(*settings))
    assert env["DAGKUBE_DEFAULT_TIMEOUT"] == f"{seconds:g}"
    literal = {name: value for name, value in env.items() if isinstance(value, str)}
    assert OperatorConfig.from_env(literal).default_timeout_s == seconds


def test_external_redis_replaces_the_bundled_one(rendered: dict[str, list[dict]]) -> None:
    docs = rendered["clusterwide-external-redis-servicemonitor"]
    kinds = {doc["kind"] for doc in docs}
    assert not kinds & {"StatefulSet", "Secret"}
    assert [doc["metadata"]["name"] for doc in docs if doc["kind"] == "Service"] == [
        "rel-dagkube-metrics"
    ]
    env = _operator_env(docs)
    assert env["DAGKUBE_REDIS_URL"] == "redis://redis.example.org:6379/0"
    assert env["DAGKUBE_REDIS_PASSWORD"] == {
        "secretKeyRef": {"name": "shared-redis", "key": "redis-password"}
    }
    assert env["DAGKUBE_REDIS_URL_SECRET"] == "shared-redis"


def test_redis_statefulset(rendered: dict[str, list[dict]]) -> None:
    docs = rendered["default"]
    statefulset = only(docs, "StatefulSet")
    services = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Service"}
    service = services[statefulset["spec"]["serviceName"]]
    assert service["spec"]["clusterIP"] == "None"
    pod = statefulset["spec"]["template"]["spec"]
    assert pod["automountServiceAccountToken"] is False
    assert (pod["securityContext"]["runAsUser"], pod["securityContext"]["runAsNonRoot"]) == (
        999,
        True,
    )
    [container] = pod["containers"]
    assert container["image"] == "redis:7.2-alpine"
    args = container["args"]
    assert args[args.index("--requirepass") + 1] == "$(REDIS_PASSWORD)"
    password_env = next(e for e in container["env"] if e["name"] == "REDIS_PASSWORD")
    assert password_env["valueFrom"]["secretKeyRef"] == {
        "name": only(docs, "Secret")["metadata"]["name"],
        "key": "redis-password",
    }
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    mounts = {mount["mountPath"] for mount in container["volumeMounts"]}
    assert mounts == {"/data", "/tmp"}
    [claim] = statefulset["spec"]["volumeClaimTemplates"]
    assert claim["metadata"]["name"] == "data"
    assert claim["spec"]["resources"]["requests"]["storage"] == "2Gi"


def test_redis_without_persistence_uses_an_empty_dir(tools: Tools) -> None:
    docs = tools.template("--set", "redis.persistence.enabled=false")
    statefulset = only(docs, "StatefulSet")
    assert "volumeClaimTemplates" not in statefulset["spec"]
    volumes = {v["name"]: v for v in statefulset["spec"]["template"]["spec"]["volumes"]}
    assert volumes["data"] == {"name": "data", "emptyDir": {}}
    kubernetes_validate.validate(statefulset, KUBERNETES_VERSION, strict=True)


def test_every_chart_dashboard_becomes_a_configmap(tools: Tools, tmp_path: Path) -> None:
    chart = tmp_path / "dagkube"
    shutil.copytree(CHART, chart)
    shipped = len(list((CHART / "dashboards").glob("*.json")))
    dashboards = {"Run_Overview.json": {"title": "Runs"}, "planner.json": {"title": "Planner"}}
    for name, body in dashboards.items():
        (chart / "dashboards" / name).write_text(json.dumps(body))

    docs = tools.template(chart=chart)
    maps = [doc for doc in docs if doc["kind"] == "ConfigMap"]
    assert len(maps) == shipped + 2
    for name, body in dashboards.items():
        [config] = [m for m in maps if name in m["data"]]
        assert config["metadata"]["labels"]["grafana_dashboard"] == "1"
        assert json.loads(config["data"][name]) == body
        kubernetes_validate.validate(config, KUBERNETES_VERSION, strict=True)
    disabled = tools.template("--set", "dashboards.enabled=false", chart=chart)
    assert "ConfigMap" not in {doc["kind"] for doc in disabled}


def test_chart_ships_the_dashboards_it_has(rendered: dict[str, list[dict]]) -> None:
    shipped = sorted(path.name for path in (CHART / "dashboards").glob("*.json"))
    maps = [doc for doc in rendered["default"] if doc["kind"] == "ConfigMap"]
    assert sorted(key for config in maps for key in config["data"]) == shipped


# ---------------------------------------------------------------- the CRD
def test_chart_crd_is_the_repository_crd(tools: Tools, rendered: dict[str, list[dict]]) -> None:
    assert CHART_CRD_FILE.read_bytes() == CRD_FILE.read_bytes(), (
        "charts/dagkube/files/crd-workflow.yaml drifted: cp crds/workflow.yaml into it"
    )
    crd = load_yaml(CRD_FILE)
    for docs in rendered.values():
        assert only(docs, "CustomResourceDefinition") == crd
    assert crd["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    without = tools.template("--set", "crds.install=false")
    assert "CustomResourceDefinition" not in {doc["kind"] for doc in without}


def test_crd_names_columns_and_status_subresource() -> None:
    crd = load_yaml(CRD_FILE)
    spec = crd["spec"]
    assert crd["metadata"]["name"] == "workflows.dagkube.io"
    assert (spec["group"], spec["scope"]) == ("dagkube.io", "Namespaced")
    names = spec["names"]
    assert (names["kind"], names["plural"], names["singular"]) == (
        "Workflow",
        "workflows",
        "workflow",
    )
    assert names["shortNames"] == ["dkwf"]
    [version] = spec["versions"]
    assert (version["name"], version["served"], version["storage"]) == ("v1alpha1", True, True)
    assert version["subresources"] == {"status": {}}
    columns = {c["name"]: (c["type"], c["jsonPath"]) for c in version["additionalPrinterColumns"]}
    assert columns == {
        "Phase": ("string", ".status.phase"),
        "Planner": ("string", ".spec.planner.name"),
        "Done": ("integer", ".status.tasks.done"),
        "Total": ("integer", ".status.tasks.total"),
        "Makespan": ("number", ".status.actualMakespanSeconds"),
        "Pred-Makespan": ("number", ".status.predictedMakespanSeconds"),
        "GB-s": ("number", ".status.resources.gbSeconds"),
        "Pred-GB-s": ("number", ".status.predictedGbSeconds"),
        "Age": ("date", ".metadata.creationTimestamp"),
    }


def _open_api_schema() -> dict[str, Any]:
    [version] = load_yaml(CRD_FILE)["spec"]["versions"]
    return version["schema"]["openAPIV3Schema"]


def _walk(schema: dict[str, Any], path: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    """Every schema node with its path, through properties, items and oneOf/anyOf/allOf."""
    yield path or ".", schema
    for name, child in schema.get("properties", {}).items():
        yield from _walk(child, f"{path}.{name}")
    if "items" in schema:
        yield from _walk(schema["items"], f"{path}[]")
    for keyword in ("oneOf", "anyOf", "allOf"):
        for index, branch in enumerate(schema.get(keyword, [])):
            yield from _walk(branch, f"{path}<{keyword}{index}>")


def as_json_schema(schema: dict[str, Any]) -> dict[str, Any]:
    """The OpenAPI v3 schema as JSON Schema, as the API server applies it to a Workflow.

    x-kubernetes-* keys are dropped; objects with declared properties reject unknown fields,
    which is what the API server's pruning plus kubectl's strict field validation do.
    """
    converted = {k: v for k, v in schema.items() if not k.startswith("x-kubernetes-")}
    if "properties" in converted:
        converted["properties"] = {k: as_json_schema(v) for k, v in schema["properties"].items()}
    if "items" in converted:
        converted["items"] = as_json_schema(converted["items"])
    for keyword in ("oneOf", "anyOf", "allOf"):
        if keyword in converted:
            converted[keyword] = [as_json_schema(branch) for branch in converted[keyword]]
    preserve = schema.get("x-kubernetes-preserve-unknown-fields", False)
    if "properties" in schema and not preserve:
        converted["additionalProperties"] = False
    return converted


def test_crd_schema_is_structural() -> None:
    """The API server's structural-schema rules that a JSON Schema check would not catch."""
    problems = []
    preserved = []
    for path, node in _walk(_open_api_schema()):
        in_branch = "<" in path  # a value validation: oneOf/anyOf/allOf and below
        if node.get("x-kubernetes-preserve-unknown-fields"):
            preserved.append(path)
        if in_branch:
            forbidden = set(node) & {"type", "default", "description", "additionalProperties"}
            if forbidden:
                problems.append(f"{path}: {sorted(forbidden)} not allowed inside oneOf/anyOf")
        elif "type" not in node:
            problems.append(f"{path}: no type")
        if node.get("uniqueItems"):
            problems.append(f"{path}: uniqueItems is forbidden, use x-kubernetes-list-type")
        if "properties" in node and "additionalProperties" in node:
            problems.append(f"{path}: properties and additionalProperties are exclusive")
        for keyword in ("oneOf", "anyOf"):
            for branch in node.get(keyword, []):
                unknown = set(branch.get("required", [])) - set(node.get("properties", {}))
                if unknown:
                    problems.append(f"{path}: {keyword} requires undeclared {sorted(unknown)}")
        list_type = node.get("x-kubernetes-list-type")
        if list_type == "set" and node["items"].get("type") not in {"string", "integer"}:
            problems.append(f"{path}: a set needs scalar items")
        if list_type == "map":
            keys = set(node.get("x-kubernetes-list-map-keys", []))
            if not keys or not keys <= set(node["items"].get("required", [])):
                problems.append(f"{path}: map keys must be required fields of the items")
        if "default" in node:
            try:
                jsonschema.Draft4Validator(as_json_schema(node)).validate(node["default"])
            except jsonschema.ValidationError as error:
                problems.append(f"{path}: default {node['default']!r} invalid: {error.message}")
    assert problems == []
    assert sorted(preserved) == [".spec.source.module.args", ".status.kopf"]


def test_crd_is_a_valid_apiextensions_object() -> None:
    crd = load_yaml(CRD_FILE)
    assert kubernetes_validate.validate(crd, KUBERNETES_VERSION, strict=True) == KUBERNETES_VERSION
    broken = copy.deepcopy(crd)
    broken["spec"]["versions"][0]["subresources"]["state"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSION, strict=True)


# ---------------------------------------------------------------- Workflow objects
def crd_validator() -> jsonschema.Draft4Validator:
    """The Workflow CRD's openAPIV3Schema as a JSON-schema validator."""
    schema = as_json_schema(_open_api_schema())
    jsonschema.Draft4Validator.check_schema(schema)
    return jsonschema.Draft4Validator(schema)


@pytest.fixture(scope="module")
def workflow_schema() -> jsonschema.Draft4Validator:
    return crd_validator()


def errors_of(validator: jsonschema.Draft4Validator, workflow: dict[str, Any]) -> list[str]:
    return [
        f"{'.'.join(map(str, error.absolute_path))}: {error.message}"
        for error in validator.iter_errors(workflow)
    ]


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda path: path.name)
def test_example_manifests_are_valid_workflows(
    workflow_schema: jsonschema.Draft4Validator, path: Path
) -> None:
    crd = load_yaml(CRD_FILE)
    workflow = load_yaml(path)
    assert workflow["apiVersion"] == f"{crd['spec']['group']}/v1alpha1"
    assert workflow["kind"] == crd["spec"]["names"]["kind"]
    assert errors_of(workflow_schema, workflow) == []


def test_there_are_module_and_inline_examples() -> None:
    sources = {next(iter(load_yaml(path)["spec"]["source"])) for path in EXAMPLES}
    assert sources >= {"module", "inline"}


def test_inline_example_builds_with_the_sdk() -> None:
    workflow = load_yaml(ROOT / "examples" / "manifests" / "workflow-inline.yaml")
    namespace: dict[str, Any] = {}
    exec(compile(workflow["spec"]["source"]["inline"], "<inline source>", "exec"), namespace)
    built = namespace["build"]()
    assert isinstance(built, dagkube.Workflow)
    assert built.name == workflow["metadata"]["name"]
    assert sorted(built.task_ids) == [f"square#{i}" for i in range(8)] + ["total#0"]


def test_module_example_names_a_real_build_function() -> None:
    workflow = load_yaml(ROOT / "examples" / "manifests" / "workflow-module.yaml")
    module_name, function = workflow["spec"]["source"]["module"]["name"].split(":")
    module = load_module(module_name, ROOT.joinpath(*module_name.split(".")).with_suffix(".py"))
    built = getattr(module, function)()
    assert isinstance(built, dagkube.Workflow)
    assert len(built.task_ids) == 63


def _workflow(**spec: Any) -> dict[str, Any]:
    base = {"source": {"module": {"name": "examples.tree_reduction:build"}}}
    return {
        "apiVersion": "dagkube.io/v1alpha1",
        "kind": "Workflow",
        "metadata": {"name": "w"},
        "spec": base | spec,
    }


@pytest.mark.parametrize("sla", ["avg", "p1", "p50", "p95", "p99", "p99.9", "p99.99"])
def test_accepted_slas(workflow_schema: jsonschema.Draft4Validator, sla: str) -> None:
    assert errors_of(workflow_schema, _workflow(planner={"sla": sla})) == []


@pytest.mark.parametrize(
    ("spec", "complaint"),
    [
        ({"planner": {"name": "wukon"}}, "'wukon' is not one of"),
        ({"planner": {"sla": "p100"}}, "does not match"),
        ({"planner": {"sla": "p0"}}, "does not match"),
        ({"planner": {"sla": "p100.5"}}, "does not match"),
        ({"planner": {"sla": "p95%"}}, "does not match"),
        ({"planner": {"optimizations": ["prefetch"]}}, "'prefetch' is not one of"),
        ({"source": {"module": {"name": "examples.tree_reduction"}}}, "does not match"),
        # "Exactly one source" and "spec is immutable" are CEL rules (x-kubernetes-validations),
        # which JSON Schema cannot run: tests/cluster/test_crd_limits.py checks them, and every
        # limit, against the real API server.
        ({"source": {"inline": "#" * (256 * 1024 + 1)}}, "is too long"),
        ({"resources": {"classes": ["9" * 400 + "Mi"]}}, "is too long"),
        ({"resources": {"classes": ["1Gi"] * 17}}, "is too long"),
        ({"timeoutSeconds": 8 * 24 * 3600}, "greater than the maximum"),
        ({"source": {"ref": {"dag": "NOT-HEX-AT-ALL!!"}}}, "does not match"),
        ({"resources": {"classes": ["512M"]}}, "does not match"),
        ({"resources": {"classes": []}}, "should be non-empty"),
        ({"resources": {"maxWorkers": 0}}, "less than the minimum"),
        ({"retries": 11}, "greater than the maximum"),
        ({"planer": {"name": "wukong"}}, "'planer' was unexpected"),
    ],
)
def test_malformed_workflows_are_rejected(
    workflow_schema: jsonschema.Draft4Validator, spec: dict[str, Any], complaint: str
) -> None:
    errors = errors_of(workflow_schema, _workflow(**spec))
    assert any(complaint in error for error in errors), errors


def test_workflow_without_spec_or_source_is_rejected(
    workflow_schema: jsonschema.Draft4Validator,
) -> None:
    workflow = _workflow()
    del workflow["spec"]["source"]
    assert errors_of(workflow_schema, workflow) == ["spec: 'source' is a required property"]
    del workflow["spec"]
    assert errors_of(workflow_schema, workflow) == [": 'spec' is a required property"]


def test_operator_status_fits_the_schema(workflow_schema: jsonschema.Draft4Validator) -> None:
    workflow = _workflow()
    workflow["status"] = {
        "phase": "Succeeded",
        "runId": "r1",
        "predictedMakespanSeconds": 1.25,
        "actualMakespanSeconds": 1.5,
        "tasks": {"total": 63, "done": 63, "failed": 0},
        "workers": {"cold": 2, "warm": 5, "prewarmed": 1},
        "resources": {"gbSeconds": 0.75, "cpuSecondsAllocated": 3.5, "cpuSecondsUsed": 2.1},
        "slaMet": True,
        "conditions": [{"type": "Ready", "status": "True", "reason": "Done"}],
        "kopf": {"progress": {"create_fn": {"started": "2025-01-01T00:00:00Z"}}},
    }
    assert errors_of(workflow_schema, workflow) == []
    workflow["status"]["phase"] = "Exploded"
    workflow["status"]["tasks"]["done"] = 1.5
    assert len(errors_of(workflow_schema, workflow)) == 2


# ---------------------------------------------------------------- kubectl, offline
@pytest.mark.parametrize("path", [CRD_FILE, *EXAMPLES], ids=lambda path: path.name)
def test_kubectl_reads_the_manifests(tools: Tools, path: Path) -> None:
    """`kubectl label --local` decodes and re-emits an object without any cluster.

    (`kubectl apply/create --dry-run=client` would be the natural check, but kubectl needs an
    API server for those even with --validate=false, so they are not used.)
    """
    label = ["dagkube.io/checked=yes", "-o", "json"]
    result = tools.run("kubectl", "label", "--local", "-f", path, *label)
    assert result.returncode == 0, result.stderr
    expected = load_yaml(path)
    expected["metadata"].setdefault("labels", {})["dagkube.io/checked"] = "yes"
    assert json.loads(result.stdout) == expected


def test_kubectl_rejects_a_manifest_without_kind(tools: Tools, tmp_path: Path) -> None:
    manifest = load_yaml(EXAMPLES[0])
    del manifest["kind"]
    broken = tmp_path / "broken.yaml"
    broken.write_text(yaml.safe_dump(manifest))
    result = tools.run("kubectl", "label", "--local", "-f", broken, "a=b", "-o", "json")
    assert result.returncode != 0
    assert "Object 'Kind' is missing" in result.stderr


def test_redis_refuses_writes_past_maxmemory_rather_than_evict(
    rendered: dict[str, list[dict]],
) -> None:
    """Every run key and history record carries a TTL, so a volatile-* policy would evict
    them: the chart's Redis stops below its container limit with noeviction, and keeps an
    append-only file fsync'd every second."""
    statefulset = only(rendered["default"], "StatefulSet")
    settings = redis_options(statefulset["spec"]["template"]["spec"]["containers"][0]["args"])
    assert settings["--maxmemory"] == ["768mb"]
    assert settings["--maxmemory-policy"] == ["noeviction"]
    assert settings["--appendonly"] == ["yes"] and settings["--appendfsync"] == ["everysec"]


# ---------------------------------------------------------------- Redis users (issue 17)
def _secret_refs(container: dict[str, Any]) -> dict[str, dict[str, str]]:
    """Env name -> the Secret key it reads."""
    return {
        item["name"]: item["valueFrom"]["secretKeyRef"]
        for item in container["env"]
        if "secretKeyRef" in item.get("valueFrom", {})
    }


def _redis_container(docs: list[dict[str, Any]]) -> dict[str, Any]:
    [container] = only(docs, "StatefulSet")["spec"]["template"]["spec"]["containers"]
    return container


def test_the_bundled_redis_starts_with_the_operator_user_of_acl_py(
    rendered: dict[str, list[dict]],
) -> None:
    docs = rendered["default"]
    container = _redis_container(docs)
    name, state, password, *rules = redis_options(container["args"])["--user"]
    assert (name, state, password) == (acl.OPERATOR_USER, "on", ">$(REDIS_OPERATOR_PASSWORD)")
    assert rules == acl.operator_user().rules(), (
        "the chart's operator rules drifted from dagkube/store/acl.py: run "
        "python -m dagkube.store.acl > charts/dagkube/files/redis-operator-rules.txt"
    )
    secret = only(docs, "Secret")["metadata"]["name"]
    refs = _secret_refs(container)
    assert refs["REDIS_OPERATOR_PASSWORD"] == {"name": secret, "key": "redis-operator-password"}
    assert (
        refs["REDIS_PASSWORD"]
        == refs["REDISCLI_AUTH"]
        == {
            "name": secret,
            "key": "redis-password",
        }
    )
    assert redis_options(container["args"])["--requirepass"] == ["$(REDIS_PASSWORD)"]


@pytest.mark.parametrize("worker_users", [True, False])
def test_the_operator_pod_gets_only_the_operator_credential(
    tools: Tools, worker_users: bool
) -> None:
    """Its only Secret reference is its own user's password; without worker users it names
    (never reads) the default user's URL that worker Pods get."""
    docs = tools.template("--set", f"redis.workerUsers={str(worker_users).lower()}")
    secret = only(docs, "Secret")
    container = _operator_container(docs)
    assert list(_secret_refs(container).values()) == [
        {"name": secret["metadata"]["name"], "key": "redis-operator-password"}
    ]
    admin_password = _b64(secret["data"]["redis-password"])
    values = [str(item.get("value", "")) for item in container["env"]]
    assert not any(admin_password in value for value in values)
    env = _operator_env(docs)
    assert (env["DAGKUBE_REDIS_URL_SECRET"], env["DAGKUBE_REDIS_URL_SECRET_KEY"]) == (
        secret["metadata"]["name"],
        "redis-url",
    )
    literal = {name: value for name, value in env.items() if isinstance(value, str)}
    config = OperatorConfig.from_env({**literal, "DAGKUBE_REDIS_PASSWORD": "s3cret/+"})
    assert config.redis_url == (
        f"redis://{acl.OPERATOR_USER}:s3cret%2F%2B@rel-dagkube-redis.{NAMESPACE}.svc:6379/0"
    )
    assert config.worker_users is worker_users


def test_an_existing_secret_holds_the_bundled_redis_passwords(tools: Tools) -> None:
    """redis.auth.existingSecret: the chart makes no Secret and renders no random value (the
    same output every time), and every password comes from the named Secret and keys."""
    settings = (
        "--set", "redis.auth.existingSecret=my-redis",
        "--set", "redis.auth.existingSecretPasswordKey=admin",
        "--set", "redis.auth.existingSecretOperatorPasswordKey=operator",
        "--set", "redis.auth.existingSecretUrlKey=admin-url",
    )  # fmt: skip
    docs = tools.template(*settings)
    assert "Secret" not in {doc["kind"] for doc in docs}
    assert tools.template(*settings) == docs
    assert only(tools.template(), "Secret") != only(tools.template(), "Secret")  # random
    assert _secret_refs(_redis_container(docs)) == {
        "REDIS_PASSWORD": {"name": "my-redis", "key": "admin"},
        "REDIS_OPERATOR_PASSWORD": {"name": "my-redis", "key": "operator"},
        "REDISCLI_AUTH": {"name": "my-redis", "key": "admin"},
    }
    assert _secret_refs(_operator_container(docs)) == {
        "DAGKUBE_REDIS_PASSWORD": {"name": "my-redis", "key": "operator"}
    }
    env = _operator_env(docs)
    assert (env["DAGKUBE_REDIS_URL_SECRET"], env["DAGKUBE_REDIS_URL_SECRET_KEY"]) == (
        "my-redis",
        "admin-url",
    )
    assert env["DAGKUBE_REDIS_URL"].startswith(f"redis://{acl.OPERATOR_USER}@")


def test_external_redis_with_an_operator_user(tools: Tools) -> None:
    external = VALUE_SETS["clusterwide-external-redis-servicemonitor"]
    env = _operator_env(tools.template(*external, "--set", "redis.external.username=dk-op"))
    assert env["DAGKUBE_REDIS_URL"] == "redis://dk-op@redis.example.org:6379/0"
    assert env["DAGKUBE_REDIS_PASSWORD"] == {
        "secretKeyRef": {"name": "shared-redis", "key": "redis-password"}
    }
    result = tools.run(
        "helm", "template", "rel", CHART, *external, "--set", "redis.external.username=a@b"
    )
    assert result.returncode != 0 and "/redis/external/username" in result.stderr


# ---------------------------------------------------------------- hard limits (issue 17)
def test_hard_limits_reach_the_operator(tools: Tools) -> None:
    """The defaults and set values of the workers ceiling, the image allowlist and the
    workers' ephemeral storage become the operator's settings."""
    env = _operator_env(tools.template())
    assert env["DAGKUBE_MAX_WORKERS_LIMIT"] == "200"
    assert env["DAGKUBE_ALLOWED_IMAGES"] == ""
    assert env["DAGKUBE_WORKER_EPHEMERAL_STORAGE"] == "1Gi"
    assert env["DAGKUBE_ALLOWED_SOURCES"] == "inline,module,ref"
    assert env["DAGKUBE_ALLOWED_MODULES"] == ""
    env = _operator_env(
        tools.template(
            "--set", "operator.maxWorkersLimit=80",
            "--set-json", 'operator.allowedImages=["registry.example.org/team/*","ghcr.io/x"]',
            "--set", "worker.ephemeralStorage=512Mi",
            "--set-json", 'operator.allowedSources=["module","ref"]',
            "--set-json", 'operator.allowedModules=["team.flows","examples.*:build"]',
        )
    )  # fmt: skip
    assert env["DAGKUBE_MAX_WORKERS_LIMIT"] == "80"
    assert env["DAGKUBE_ALLOWED_IMAGES"] == "registry.example.org/team/*,ghcr.io/x"
    assert env["DAGKUBE_WORKER_EPHEMERAL_STORAGE"] == "512Mi"
    config = OperatorConfig.from_env({k: v for k, v in env.items() if isinstance(v, str)})
    assert config.max_workers_limit == 80
    assert config.allowed_images == ["registry.example.org/team/*", "ghcr.io/x"]
    assert config.worker_ephemeral_storage_mib == 512
    assert config.allowed_sources == frozenset({"module", "ref"})
    assert config.allowed_modules == ["team.flows", "examples.*:build"]


@pytest.mark.parametrize(
    ("setting", "named"),
    [
        ("operator.maxWorkersLimit=0", "/operator/maxWorkersLimit"),
        ("operator.maxWorkersLimit=10001", "/operator/maxWorkersLimit"),
        ("operator.allowedImages={a b}", "/operator/allowedImages/0"),
        ("worker.ephemeralStorage=lots", "/worker/ephemeralStorage"),
        ("worker.ephemeralStorage=1G", "/worker/ephemeralStorage"),
        ("operator.allowedSources={inline,pickle}", "/operator/allowedSources/1"),
        ("operator.allowedModules={a b:c}", "/operator/allowedModules/0"),
    ],
)
def test_values_schema_rejects_bad_hard_limits(tools: Tools, setting: str, named: str) -> None:
    result = tools.run("helm", "template", "rel", CHART, "--set", setting)
    assert result.returncode != 0
    assert "don't meet the specifications of the schema" in result.stderr
    assert named in result.stderr


def test_default_workers_above_the_ceiling_stop_the_install(tools: Tools) -> None:
    result = tools.run(
        "helm", "template", "rel", CHART,
        "--set", "operator.maxWorkersPerRun=300", "--set", "operator.maxWorkersLimit=200",
    )  # fmt: skip
    assert result.returncode != 0
    assert "operator.maxWorkersPerRun=300 is above operator.maxWorkersLimit=200" in result.stderr


def selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """Whether a label selector (matchLabels, matchExpressions with In) selects ``labels``."""
    if not selector.get("matchLabels", {}).items() <= labels.items():
        return False
    for expression in selector.get("matchExpressions", []):
        assert expression["operator"] == "In", expression
        if labels.get(expression["key"]) not in expression["values"]:
            return False
    return True


def test_network_policies_let_only_dagkube_reach_redis_and_prometheus_the_metrics(
    rendered: dict[str, list[dict]], tools: Tools
) -> None:
    docs = rendered["default"]
    policies = {d["metadata"]["name"]: d["spec"] for d in docs if d["kind"] == "NetworkPolicy"}
    assert set(policies) == {"rel-dagkube-redis", "rel-dagkube-operator"}
    redis_pod = only(docs, "StatefulSet")["spec"]["template"]["metadata"]["labels"]
    redis = policies["rel-dagkube-redis"]
    assert redis["podSelector"]["matchLabels"].items() <= redis_pod.items()
    [rule] = redis["ingress"]
    assert rule["ports"] == [{"port": "redis", "protocol": "TCP"}]
    operator_pod = only(docs, "Deployment")["spec"]["template"]["metadata"]["labels"]
    worker_pod = worker_labels(pool="ns.wf-1", run_id="ns.run-1", memory_mib=512)
    build_pod = build_build_pod(
        name="dk-1-build", namespace="ns", image="i", key="k", request={},
        redis_url_secret=("s", "u"),
        memory_mib=512, cpu_millicores=500, ephemeral_storage_mib=256, deadline_s=60,
    )["metadata"]["labels"]  # fmt: skip
    peers = [peer["podSelector"] for peer in rule["from"]]
    for labels in (operator_pod, worker_pod, build_pod):
        assert any(selects(p, labels) for p in peers), labels
    assert not any(selects(p, {"app.kubernetes.io/name": "dagkube"}) for p in peers)
    assert not any(selects(p, {"app": "other", "dagkube.io/component": "worker"}) for p in peers)
    assert all("namespaceSelector" not in peer for peer in rule["from"])  # its namespace only
    metrics = policies["rel-dagkube-operator"]
    assert metrics["podSelector"]["matchLabels"].items() <= operator_pod.items()
    [rule] = metrics["ingress"]
    assert rule["ports"] == [{"port": "metrics", "protocol": "TCP"}]
    assert rule["from"] == [
        {
            "namespaceSelector": {},
            "podSelector": {"matchLabels": {"app.kubernetes.io/name": "prometheus"}},
        }
    ]
    # Cluster-wide: workers of every namespace; an external Redis: no policy for it.
    wide = [
        d for d in tools.template("--set", "rbac.clusterWide=true") if d["kind"] == "NetworkPolicy"
    ]
    redis = next(d for d in wide if d["metadata"]["name"] == "rel-dagkube-redis")
    assert {"namespaceSelector": {}}.items() <= redis["spec"]["ingress"][0]["from"][1].items()
    external = rendered["clusterwide-external-redis-servicemonitor"]
    names = {d["metadata"]["name"] for d in external if d["kind"] == "NetworkPolicy"}
    assert names == {"rel-dagkube-operator"}
    off = tools.template("--set", "networkPolicy.enabled=false")
    assert "NetworkPolicy" not in {d["kind"] for d in off}


# ---------------------------------------------------------------- TLS for Redis (issue 17)
TLS = ("--set", "redis.tls.enabled=true", "--set", "redis.tls.existingSecret=dagkube-redis-tls")


@pytest.fixture(scope="module")
def tls_docs(tools: Tools) -> list[dict[str, Any]]:
    return tools.template(*TLS)


def test_tls_renders_valid_manifests(tools: Tools, tls_docs: list[dict[str, Any]]) -> None:
    result = tools.run("helm", "lint", CHART, "--strict", *TLS)
    assert result.returncode == 0, result.stdout + result.stderr
    for doc in tls_docs:
        if (doc["apiVersion"], doc["kind"]) not in NO_BUILTIN_SCHEMA:
            kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def test_tls_redis_listens_with_tls_only(
    rendered: dict[str, list[dict]], tls_docs: list[dict[str, Any]]
) -> None:
    """The Secret's certificate, key and CA, mounted read-only; no plaintext port; clients
    present no certificate; the readiness probe speaks TLS and checks the server with the CA."""
    directory = REDIS_CA_FILE.rpartition("/")[0]
    container = _redis_container(tls_docs)
    options = redis_options(container["args"])
    assert {name: options[name] for name in options if "port" in name or "tls" in name} == {
        "--port": ["0"],
        "--tls-port": ["6379"],
        "--tls-cert-file": [f"{directory}/tls.crt"],
        "--tls-key-file": [f"{directory}/tls.key"],
        "--tls-ca-cert-file": [f"{directory}/ca.crt"],
        "--tls-auth-clients": ["no"],
    }
    mounts = {mount["name"]: mount for mount in container["volumeMounts"]}
    assert mounts["tls"] == {"name": "tls", "mountPath": directory, "readOnly": True}
    pod = only(tls_docs, "StatefulSet")["spec"]["template"]["spec"]
    volumes = {volume["name"]: volume for volume in pod["volumes"]}
    assert volumes["tls"]["secret"] == {
        "secretName": "dagkube-redis-tls",
        "items": [
            {"key": "tls.crt", "path": "tls.crt"},
            {"key": "tls.key", "path": "tls.key"},
            {"key": "ca.crt", "path": "ca.crt"},
        ],
    }
    probe = container["readinessProbe"]["exec"]["command"]
    assert probe[-1] == f"redis-cli --tls --cacert {directory}/ca.crt ping | grep -q PONG"
    assert container["livenessProbe"] == _redis_container(rendered["default"])["livenessProbe"]
    # without TLS: no TLS option, no certificate
    plain = _redis_container(rendered["default"])
    assert not [arg for arg in plain["args"] if "tls" in arg or arg == "--port"]
    assert "tls" not in {mount["name"] for mount in plain["volumeMounts"]}


def test_tls_clients_verify_redis_with_the_ca(tls_docs: list[dict[str, Any]]) -> None:
    """The operator's URL is rediss:// with the CA it mounts (only the CA, not the server's
    key), at the path worker and build Pods mount theirs; its config hands the CA on."""
    service = only(tls_docs, "StatefulSet")["spec"]["serviceName"]
    env = _operator_env(tls_docs)
    assert env["DAGKUBE_REDIS_URL"] == (
        f"rediss://{acl.OPERATOR_USER}@{service}.{NAMESPACE}.svc:6379/0"
        f"?ssl_ca_certs={REDIS_CA_FILE}"
    )
    assert env["DAGKUBE_REDIS_CA_FILE"] == REDIS_CA_FILE
    container = _operator_container(tls_docs)
    mounts = {mount["name"]: mount for mount in container["volumeMounts"]}
    assert mounts["redis-ca"] == {
        "name": "redis-ca",
        "mountPath": REDIS_CA_FILE.rpartition("/")[0],
        "readOnly": True,
    }
    pod = only(tls_docs, "Deployment")["spec"]["template"]["spec"]
    volumes = {volume["name"]: volume for volume in pod["volumes"]}
    assert volumes["redis-ca"]["secret"] == {
        "secretName": "dagkube-redis-tls",
        "items": [{"key": "ca.crt", "path": "ca.crt"}],
    }
    literal = {name: value for name, value in env.items() if isinstance(value, str)}
    config = OperatorConfig.from_env({**literal, "DAGKUBE_REDIS_PASSWORD": "pw"})
    assert config.redis_ca_file == REDIS_CA_FILE
    assert config.redis_url.startswith(f"rediss://{acl.OPERATOR_USER}:pw@")
    assert redis_connection.parse_url(config.redis_url)["ssl_ca_certs"] == REDIS_CA_FILE
    # the default user's URL (administration) is rediss:// too
    secret = only(tls_docs, "Secret")
    assert _b64(secret["data"]["redis-url"]).startswith("rediss://:")


def test_tls_secret_key_names_are_configurable(tools: Tools) -> None:
    docs = tools.template(
        *TLS,
        "--set", "redis.tls.certKey=server.pem",
        "--set", "redis.tls.privateKeyKey=server-key.pem",
        "--set", "redis.tls.caKey=root.pem",
    )  # fmt: skip
    redis_volumes = only(docs, "StatefulSet")["spec"]["template"]["spec"]["volumes"]
    [tls] = [volume for volume in redis_volumes if volume["name"] == "tls"]
    assert tls["secret"]["items"] == [
        {"key": "server.pem", "path": "tls.crt"},
        {"key": "server-key.pem", "path": "tls.key"},
        {"key": "root.pem", "path": "ca.crt"},
    ]
    operator_volumes = only(docs, "Deployment")["spec"]["template"]["spec"]["volumes"]
    [ca] = [volume for volume in operator_volumes if volume["name"] == "redis-ca"]
    assert ca["secret"]["items"] == [{"key": "root.pem", "path": "ca.crt"}]


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (
            ["--set", "redis.tls.enabled=true"],
            "redis.tls.enabled=true needs redis.tls.existingSecret: a Secret in the release "
            "namespace with the server certificate (tls.crt), its key (tls.key) and the CA",
        ),
        (
            [*TLS, "--set", "redis.workerUsers=false"],
            "redis.tls.enabled=true needs redis.workerUsers=true: worker Pods get the Redis CA",
        ),
        (
            [*TLS, *VALUE_SETS["clusterwide-external-redis-servicemonitor"]],
            "redis.tls.enabled=true is for the bundled Redis: with redis.external.url, give a "
            "rediss:// URL instead",
        ),
    ],
    ids=["no-secret", "no-worker-users", "external"],
)
def test_tls_that_cannot_work_stops_the_render(
    tools: Tools, settings: list[str], message: str
) -> None:
    result = tools.run("helm", "template", "rel", CHART, "-n", NAMESPACE, *settings)
    assert result.returncode != 0
    assert message in result.stderr
