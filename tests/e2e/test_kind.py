"""The kind end-to-end tier: tools/e2e_kind.sh against a real cluster in Docker.

The script builds the operator and worker images, creates the kind cluster of kind-config.yaml,
installs the Helm chart, runs the example Workflows to Succeeded, checks their status and the
operator's metrics, and deletes a running Workflow to check that its Pods go with it. It needs
a Docker engine and kind; where either is missing the test skips, saying which (CI allows a
skip in this tier only: tests/conftest.py). DAGKUBE_SKIP_KIND_E2E=1 skips it on purpose.

The long-running Workflow the script uses is checked here too, without any cluster, so a
manifest that no longer fits the CRD or the SDK fails everywhere, not only where Docker is.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

import dagkube

pytestmark = pytest.mark.kind_e2e

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "tools" / "e2e_kind.sh"
LONG_MANIFEST = Path(__file__).resolve().parent / "workflow-long.yaml"
CRD_FILE = ROOT / "crds" / "workflow.yaml"
SCRIPT_TIMEOUT_S = 1700  # below the test's own timeout, so the script can still tear down
SKIP_STATUS = 77  # tools/e2e_kind.sh: a prerequisite is missing


def _docker_problem() -> str | None:
    docker = shutil.which("docker")
    if docker is None:
        return "kind e2e needs a Docker engine: the docker command is not installed"
    try:
        result = subprocess.run(
            [docker, "info"], capture_output=True, text=True, timeout=60, check=False
        )
    except subprocess.TimeoutExpired:
        return "kind e2e needs a Docker engine: `docker info` did not answer within 60 s"
    if result.returncode != 0:
        lines = (result.stderr or result.stdout).strip().splitlines() or ["(no output)"]
        return f"kind e2e needs a Docker engine: `docker info` fails: {lines[-1]}"
    return None


def _kind_problem() -> str | None:
    """None when tools/e2e_kind.sh will find kind (or build it with go)."""
    explicit = os.environ.get("KIND")
    if explicit:
        return None if os.access(explicit, os.X_OK) else f"KIND={explicit} is not executable"
    if shutil.which("kind") or os.access(ROOT / ".tools" / "bin" / "kind", os.X_OK):
        return None
    if shutil.which("go"):
        return None
    return (
        "kind e2e needs kind: it is not on PATH nor at .tools/bin/kind, and no Go toolchain "
        "can install it (see docs/kubernetes.md, 'End-to-end test on kind')"
    )


def _run_script() -> tuple[int, str]:
    """Run the script in its own process group; on a timeout, TERM the group so the script's
    trap still prints diagnostics and deletes the cluster."""
    with subprocess.Popen(
        ["bash", str(SCRIPT)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    ) as process:
        try:
            output, _ = process.communicate(timeout=SCRIPT_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                output, _ = process.communicate(timeout=120)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                output, _ = process.communicate()
            output += f"\n[test] tools/e2e_kind.sh timed out after {SCRIPT_TIMEOUT_S} s"
        return process.returncode, output


@pytest.mark.timeout(1800)
def test_kind_end_to_end() -> None:
    if os.environ.get("DAGKUBE_SKIP_KIND_E2E") == "1":
        pytest.skip("kind e2e disabled by DAGKUBE_SKIP_KIND_E2E=1")
    problem = _docker_problem() or _kind_problem()
    if problem:
        pytest.skip(problem)
    status, output = _run_script()
    print(output)  # the whole log, shown by pytest when the test fails
    if status == SKIP_STATUS:
        reasons = [line for line in output.splitlines() if "SKIP:" in line]
        pytest.skip(reasons[-1] if reasons else "tools/e2e_kind.sh: a prerequisite is missing")
    tail = "\n".join(output.splitlines()[-80:])
    assert status == 0, f"tools/e2e_kind.sh exited {status}; its last lines:\n{tail}"
    assert "kind e2e PASSED" in output


# ---------------------------------------------------------------- the long Workflow, offline
def _as_json_schema(schema: dict[str, Any]) -> dict[str, Any]:
    """The CRD's OpenAPI schema as JSON Schema: x-kubernetes-* dropped, unknown fields refused
    where the API server would prune them (tests/k8s/test_chart.py does the same)."""
    converted = {k: v for k, v in schema.items() if not k.startswith("x-kubernetes-")}
    if "properties" in schema:
        converted["properties"] = {k: _as_json_schema(v) for k, v in schema["properties"].items()}
        if not schema.get("x-kubernetes-preserve-unknown-fields"):
            converted["additionalProperties"] = False
    if "items" in schema:
        converted["items"] = _as_json_schema(schema["items"])
    for keyword in ("oneOf", "anyOf", "allOf"):
        if keyword in schema:
            converted[keyword] = [_as_json_schema(branch) for branch in schema[keyword]]
    return converted


def test_long_workflow_manifest_fits_the_crd() -> None:
    crd = yaml.safe_load(CRD_FILE.read_text())
    [version] = crd["spec"]["versions"]
    validator = jsonschema.Draft4Validator(_as_json_schema(version["schema"]["openAPIV3Schema"]))
    workflow = yaml.safe_load(LONG_MANIFEST.read_text())
    assert workflow["apiVersion"] == f"{crd['spec']['group']}/{version['name']}"
    assert workflow["kind"] == crd["spec"]["names"]["kind"]
    errors = [f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(workflow)]
    assert errors == []


def test_long_workflow_runs_long_enough_to_be_deleted_while_running() -> None:
    workflow = yaml.safe_load(LONG_MANIFEST.read_text())
    namespace: dict[str, Any] = {}
    exec(compile(workflow["spec"]["source"]["inline"], "<inline source>", "exec"), namespace)
    built = namespace["build"]()
    assert isinstance(built, dagkube.Workflow)
    assert built.name == workflow["metadata"]["name"]
    assert sorted(built.task_ids) == ["gather#0", "nap#0", "nap#1"]
    # The script deletes the Workflow once it is Running with worker Pods and fails if it has
    # already finished by then: the naps must outlast that check by a wide margin.
    assert namespace["NAP_S"] >= 60
    assert workflow["spec"]["timeoutSeconds"] > 2 * namespace["NAP_S"]


# ---------------------------------------------------------------- the script and its cluster
def test_kind_config_names_the_scripts_cluster() -> None:
    config = yaml.safe_load((ROOT / "kind-config.yaml").read_text())
    assert config["kind"] == "Cluster"
    assert config["apiVersion"] == "kind.x-k8s.io/v1alpha4"
    assert [node["role"] for node in config["nodes"]] == ["control-plane"]
    assert f'cluster="${{CLUSTER_NAME:-{config["name"]}}}"' in SCRIPT.read_text()


def test_script_parses_and_its_prerequisite_check_answers() -> None:
    """`bash -n`, then `--check`: 0 where Docker and kind are ready, 77 with the reason."""
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True, timeout=30)
    result = subprocess.run(
        ["bash", str(SCRIPT), "--check"], capture_output=True, text=True, timeout=120, cwd=ROOT
    )
    assert result.returncode in (0, SKIP_STATUS), result.stdout + result.stderr
    if result.returncode == SKIP_STATUS:
        assert "e2e_kind.sh: SKIP: " in result.stderr
    else:
        assert "kind: " in result.stdout
