"""dagkube: planned, decentralized Python DAG workflows on serverless-style workers.

import dagkube

@dagkube.task
def add(a, b):
    return a + b

wf = dagkube.Workflow(add(add(1, 2), 3), name="sum")
assert wf.run() == 6
"""

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


def __getattr__(name: str):
    # The runtime (redis, subprocesses) loads only when asked for.
    if name == "LocalRuntime":
        from dagkube.runtime.local import LocalRuntime

        return LocalRuntime
    raise AttributeError(f"module 'dagkube' has no attribute {name!r}")
