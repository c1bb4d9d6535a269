"""The Workflow custom resource's names and phases are written once, in
``dagkube.kubernetes.workflow_cr``: the submitting side and the operator use the same objects,
and the module stays light."""

from __future__ import annotations

import json
import subprocess
import sys

from prometheus_client import generate_latest

from dagkube.kubernetes import submit, workflow_cr
from dagkube.kubernetes.workflow_cr import ENDED_PHASES, Phase
from dagkube_operator import handlers
from dagkube_operator import status as st
from dagkube_operator.metrics import OperatorMetrics


def test_submit_and_the_operator_use_the_same_constants():
    for name in ("GROUP", "VERSION", "PLURAL"):
        assert getattr(submit, name) is getattr(workflow_cr, name)
        assert getattr(handlers, name) is getattr(workflow_cr, name)
    assert submit.ENDED_PHASES is handlers.ENDED_PHASES is ENDED_PHASES
    assert (workflow_cr.API_VERSION, workflow_cr.KIND) == ("dagkube.io/v1alpha1", "Workflow")


def test_the_manifest_names_the_custom_resource():
    body = submit.workflow_manifest(source={"ref": {"dag": "x" * 32}}, name="demo")
    assert (body["apiVersion"], body["kind"]) == ("dagkube.io/v1alpha1", "Workflow")


def test_phases_are_the_strings_the_api_holds():
    assert [str(p) for p in Phase] == ["Pending", "Planning", "Running", "Succeeded", "Failed"]
    assert json.dumps({"phase": Phase.RUNNING}) == '{"phase": "Running"}'
    # Read back from the API as plain strings, they are still recognised.
    assert "Succeeded" in ENDED_PHASES and "Failed" in ENDED_PHASES
    assert "Running" not in ENDED_PHASES


def test_the_operators_status_builders_write_those_phases():
    failed = st.failed_status("Boom", "it broke", None, 1000.0)
    assert failed["phase"] is Phase.FAILED and failed["phase"] in ENDED_PHASES


def test_the_operators_phase_gauge_counts_every_phase():
    metrics = OperatorMetrics()
    metrics.set_phase("a", "Running")  # as read from a Workflow's status
    metrics.set_phase("b", Phase.RUNNING)
    metrics.set_phase("c", Phase.FAILED)
    text = generate_latest(metrics.registry).decode()
    assert 'dagkube_operator_workflows{phase="Running"} 2.0' in text
    assert 'dagkube_operator_workflows{phase="Failed"} 1.0' in text
    assert 'dagkube_operator_workflows{phase="Pending"} 0.0' in text


def test_the_module_imports_nothing_heavy():
    probe = (
        "import sys, json, dagkube.kubernetes.workflow_cr; "
        "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in "
        "('kubernetes_asyncio', 'redis', 'kopf', 'rich', 'click')"
        " or m.startswith(('dagkube.planning', 'dagkube.cli', 'dagkube.runtime')))))"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert json.loads(done.stdout) == []
