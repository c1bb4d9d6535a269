"""What building a DAG imports: the operator's build process (a child per Workflow, on the
path of every cold start) and task modules import ``dagkube`` and the loader, which must not
pull in the planners' models or the command line (they tripled the build process's start)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

HEAVY = ["dagkube.planning", "dagkube.cli", "rich", "click", "redis", "kubernetes_asyncio"]


@pytest.mark.parametrize("module", ["dagkube", "dagkube.loader", "dagkube.kubernetes.build"])
def test_building_a_dag_does_not_import_the_planners_or_the_cli(module):
    probe = (
        f"import sys, json, {module}; print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert json.loads(done.stdout) == []


def test_planning_is_still_there_when_a_plan_is_made():
    import dagkube

    @dagkube.task
    def one() -> int:
        return 1

    plan = dagkube.Workflow(one(), name="imports").plan("uniform")
    assert plan.planner == "uniform"


def test_a_worker_reads_plans_without_importing_the_planners():
    """Every module a worker imports is CPU its cold start pays at its class's CPU share (a
    1 GiB worker: 0.57 of a core); it reads plans (``dagkube.planning.model``) and nothing
    else of planning. Names of the package that need a planner still resolve, on first use."""
    probe = (
        "import sys, json, dagkube.runtime.worker; "
        "print(json.dumps(sorted(m for m in sys.modules if m.startswith('dagkube.planning'))))"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    loaded = set(json.loads(done.stdout))
    assert "dagkube.planning.model" in loaded
    assert not loaded & {f"dagkube.planning.{m}" for m in ("choice", "timing", "predictions")}
    import dagkube.planning as planning

    assert planning.PlanningOptions.__module__ == "dagkube.planning.options"
    assert callable(planning.check_objective) and "makespan" in planning.OBJECTIVES
    with pytest.raises(AttributeError, match="no attribute 'nothing_here'"):
        _ = planning.nothing_here
