"""Workflow files: import one and find its Workflow, its ``verify`` and its ``build``.

Kept apart from the command line so the operator's build process (which imports user files in
a child process) loads only this and the DAG, not the CLI, its rendering or the planners.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import sys
import sysconfig
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import cloudpickle

from dagkube.errors import DagkubeError, InvalidWorkflow
from dagkube.workflow import Workflow


class WorkflowFileError(InvalidWorkflow):
    """A workflow file's own code raised (or exited) while it was imported or built.

    The message names the file, the step and the exception; ``user_frames`` is the traceback
    cut down to the frames in the user's own files, for finding the bug.
    """

    def __init__(self, message: str, user_frames: str = "") -> None:
        super().__init__(message)
        self.user_frames = user_frames


def _user_frames(exc: BaseException) -> str:
    """The traceback's frames that are in the user's files, formatted as Python does.

    Frames of dagkube itself, the standard library (importlib included) and installed packages
    are left out: what is left is where the user's bug is."""
    if isinstance(exc, SyntaxError):  # raised by the compiler: the line it could not parse
        return "".join(traceback.format_exception_only(exc)[:-1])
    folders = {Path(__file__).resolve().parent} | {
        Path(sysconfig.get_path(key)).resolve()
        for key in ("stdlib", "platstdlib", "purelib", "platlib")
    }
    not_user_code = tuple(f"{folder}{os.sep}" for folder in folders)
    frames = [
        frame
        for frame in traceback.extract_tb(exc.__traceback__)
        if not frame.filename.startswith("<frozen ")
        and not str(Path(frame.filename).resolve()).startswith(not_user_code)
    ]
    return "".join(traceback.format_list(frames))


@contextlib.contextmanager
def _user_code(path: str, step: str) -> Iterator[None]:
    """Run a step of the workflow file's own code: whatever it raises, SystemExit included,
    is bad input naming the file and the step. dagkube's own errors and Ctrl-C pass through."""
    try:
        yield
    except (DagkubeError, KeyboardInterrupt):
        raise
    except SystemExit as exc:
        raise WorkflowFileError(
            f"Workflow file {path!r}: {step} called sys.exit({exc.code!r}): a workflow file "
            "must define its workflow, not exit; raise an exception to report a problem",
            _user_frames(exc),
        ) from exc
    except BaseException as exc:
        raise WorkflowFileError(
            f"Workflow file {path!r}: {step} raised {type(exc).__name__}: {exc}",
            _user_frames(exc),
        ) from exc


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
    with _user_code(path, "importing it"):
        spec.loader.exec_module(module)
    candidate = getattr(module, "workflow", None)
    build = None
    if candidate is None and callable(getattr(module, "build", None)):
        first: list[Workflow] = []

        def build() -> Workflow:
            if first:  # the Workflow built to check the file serves the first run
                return first.pop()
            with _user_code(path, "build()"):
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
