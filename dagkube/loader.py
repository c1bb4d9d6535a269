"""Workflow files: import one and find its Workflow, its ``verify`` and its ``build``.

Kept apart from the command line so the operator's build process (which imports user files in
a child process) loads only this and the DAG, not the CLI, its rendering or the planners.
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cloudpickle

from dagkube.errors import DagkubeError, InvalidWorkflow
from dagkube.workflow import Workflow


class LoadedWorkflow:
    """A workflow file's Workflow, its ``verify`` (or None), and how to get a fresh Workflow
    for each run of an experiment: ``build()`` again when the file defines it (a build may
    draw random inputs), else the same Workflow."""

    def __init__(
        self, workflow: Workflow, verify: Any, build: Callable[[], Workflow] | None = None
    ) -> None:
        self.workflow = workflow
        self.verify = verify
        self.build = build or (lambda: workflow)


def load_workflow_file(path: str) -> LoadedWorkflow:
    """Import a workflow file (functions in it are pickled by value for the workers)."""
    file = Path(path)
    if not file.is_file():
        raise InvalidWorkflow(f"Workflow file {path!r} does not exist")
    if file.suffix != ".py":
        raise InvalidWorkflow(f"Workflow file {path!r} is not a Python file (.py)")
    module_name = f"dagkube_user_{file.stem.replace('-', '_')}"
    spec = importlib.util.spec_from_file_location(module_name, file)
    if spec is None or spec.loader is None:
        raise InvalidWorkflow(f"Cannot import {path!r} as a Python module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    directory = str(file.resolve().parent)
    if directory not in sys.path:
        sys.path.insert(0, directory)
    # Before the module runs: a module-level Workflow pickles its functions while it imports.
    cloudpickle.register_pickle_by_value(module)
    try:
        spec.loader.exec_module(module)
    except DagkubeError:
        raise
    except Exception as exc:
        raise InvalidWorkflow(f"Importing {path!r} failed: {type(exc).__name__}: {exc}") from exc
    candidate = getattr(module, "workflow", None)
    build = None
    if candidate is None and callable(getattr(module, "build", None)):
        first: list[Workflow] = []

        def build() -> Workflow:
            if first:  # the Workflow built to check the file serves the first run
                return first.pop()
            built = module.build()
            return built if isinstance(built, Workflow) else Workflow(built, name=file.stem)

        candidate = build()
        first.append(candidate)
    if candidate is None:
        raise InvalidWorkflow(
            f"{path!r} defines neither a module-level 'workflow' nor a 'build()' function"
        )
    if not isinstance(candidate, Workflow):
        candidate = Workflow(candidate, name=file.stem)
    return LoadedWorkflow(candidate, getattr(module, "verify", None), build)
