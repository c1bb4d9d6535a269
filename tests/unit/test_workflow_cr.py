"""The Workflow custom resource's names and phases are written once, in
``dagkube.kubernetes.workflow_cr``: the submitting side and the operator use the same objects,
and the module stays light."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import pytest
from prometheus_client import generate_latest

from dagkube.errors import InvalidOption
from dagkube.kubernetes import submit, workflow_cr
from dagkube.kubernetes.workflow_cr import ENDED_PHASES, Phase, Source, WorkflowSpec
from dagkube_operator import handlers
from dagkube_operator import status as st
from dagkube_operator.metrics import OperatorMetrics
from dagkube_operator.spec import parse_spec


def test_submit_and_the_operator_use_the_same_constants():
    for name in ("GROUP", "VERSION", "PLURAL"):
        assert getattr(submit, name) is getattr(workflow_cr, name)
        assert getattr(handlers, name) is getattr(workflow_cr, name)
    assert submit.ENDED_PHASES is handlers.ENDED_PHASES is ENDED_PHASES
    assert (workflow_cr.API_VERSION, workflow_cr.KIND) == ("dagkube.io/v1alpha1", "Workflow")


def test_the_manifest_names_the_custom_resource():
    spec = WorkflowSpec(source=Source(dag="ab" * 16))
    body = workflow_cr.workflow_manifest(spec, name="demo")
    assert (body["apiVersion"], body["kind"]) == ("dagkube.io/v1alpha1", "Workflow")
    assert body["metadata"] == {"name": "demo"}
    # Only what differs from the CRD's defaults is written, besides the planner.
    assert body["spec"] == {
        "source": {"ref": {"dag": "ab" * 16}},
        "planner": {"name": "auto", "sla": "avg"},
    }
    unnamed = workflow_cr.workflow_manifest(spec, generate_name="etl-", namespace="jobs")
    assert unnamed["metadata"] == {"generateName": "etl-", "namespace": "jobs"}


SOURCES = [
    Source(dag="0123456789abcdef" * 2),
    Source(inline="import dagkube\n"),
    Source(module="examples.tree_reduction:build", args={"n": 8}),
]


@pytest.mark.parametrize("source", SOURCES, ids=lambda s: s.kind)
def test_what_the_sdk_writes_the_operator_reads_back_unchanged(source):
    """One typed spec on both sides: built from a user's options, written as a manifest, and
    parsed by the operator, it comes back equal, every field (defaults included)."""
    for options in (
        {},
        {
            "planner": "Non-Uniform-Opt",
            "sla": "p95",
            "optimizations": ["taskdup"],
            "objective": "Balanced",
            "max_gb_s": 40,
            "classes_mib": [2048, 256],
            "max_workers": 7,
            "image": "registry.example.org/team/app:1",
            "timeout_s": 600,
            "retries": 2,
            "ttl_after_finished_s": 0,
        },
    ):
        written = WorkflowSpec.from_options(source, **options)
        body = workflow_cr.workflow_manifest(written, name="demo")
        read = parse_spec(json.loads(json.dumps(body["spec"])))
        assert dataclasses.asdict(read) == dataclasses.asdict(written)
    assert written.planner == "non-uniform" and "taskdup" in written.optimizations
    assert (written.objective, written.max_gb_s) == ("balanced", 40.0)
    assert body["spec"]["planner"]["objective"] == "balanced"
    assert body["spec"]["planner"]["maxGbS"] == 40.0
    assert set(written.optimizations) > {"taskdup"}  # the -opt variant's own


def test_a_spec_off_the_crd_defaults_is_written_and_read_back():
    written = dataclasses.replace(
        WorkflowSpec.from_options(SOURCES[0]), memory_per_cpu_mib=1024, max_cpu=2.5
    )
    resources = written.to_manifest()["resources"]
    assert resources == {"memoryPerCpu": "1Gi", "maxCpu": 2.5}
    assert dataclasses.asdict(parse_spec(written.to_manifest())) == dataclasses.asdict(written)


def test_bad_options_are_refused_before_anything_is_stored():
    with pytest.raises(InvalidOption, match="Planner 'fastest' is unknown"):
        WorkflowSpec.from_options(SOURCES[0], planner="fastest")
    with pytest.raises(InvalidOption, match="Optimization 'turbo' is unknown"):
        WorkflowSpec.from_options(SOURCES[0], optimizations=["turbo"])
    with pytest.raises(InvalidOption, match="Objective 'speed' is unknown: choose one of"):
        WorkflowSpec.from_options(SOURCES[0], objective="speed")
    with pytest.raises(InvalidOption, match="GB-s budget 0 is not valid"):
        WorkflowSpec.from_options(SOURCES[0], max_gb_s=0)


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
