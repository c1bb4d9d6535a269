"""dagkube: planned, decentralized Python DAG workflows on serverless-style workers.

import dagkube

@dagkube.task
def add(a, b):
    return a + b

wf = dagkube.Workflow(add(add(1, 2), 3), name="sum")
assert wf.run() == 6
"""

from typing import TYPE_CHECKING, Any

from dagkube.errors import (
    DagkubeError,
    InvalidOption,
    InvalidWorkflow,
    RedisRestarted,
    RedisUnavailable,
    RunTimeout,
    TaskFailed,
)
from dagkube.sdk import TaskNode, reduce_tree, task

if TYPE_CHECKING:
    from dagkube.runtime.local import LocalRuntime
    from dagkube.workflow import Workflow

__version__ = "0.1.0"

__all__ = [
    "DagkubeError",
    "InvalidOption",
    "InvalidWorkflow",
    "LocalRuntime",
    "RedisRestarted",
    "RedisUnavailable",
    "RunTimeout",
    "TaskFailed",
    "TaskNode",
    "Workflow",
    "reduce_tree",
    "task",
]


def __getattr__(name: str) -> Any:
    # Loaded when first asked for: the runtime (redis, subprocesses), and Workflow (records,
    # pydantic), which a worker needs only after its emulated start-up (dagkube.worker).
    if name == "LocalRuntime":
        from dagkube.runtime.local import LocalRuntime

        return LocalRuntime
    if name == "Workflow":
        from dagkube.workflow import Workflow

        return Workflow
    raise AttributeError(f"module 'dagkube' has no attribute {name!r}")
