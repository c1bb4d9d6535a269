"""Exceptions raised by dagkube. Every message names the thing, the value and what is accepted."""

from __future__ import annotations


class DagkubeError(Exception):
    """Base class of every dagkube error."""


class InvalidWorkflow(DagkubeError):
    """The task graph or one of its arguments cannot be run (bad shape, unpicklable value, ...)."""


class InvalidOption(DagkubeError, ValueError):
    """An option value (planner, resource class, SLA, ...) is not one of the accepted forms."""


class RedisUnavailable(DagkubeError):
    """The configured Redis cannot be reached or refused our credentials."""


class RedisRestarted(RedisUnavailable):
    """The Redis server restarted while a run was going: the run was failed, not resumed."""


class RunTimeout(DagkubeError):
    """A run did not finish within the time the caller allowed."""


class TaskFailed(DagkubeError):
    """A task raised (after its retries); carries where and why, with the remote traceback."""

    def __init__(
        self,
        run_id: str,
        task_id: str,
        function: str,
        exc_type: str,
        message: str,
        remote_traceback: str,
    ) -> None:
        self.run_id = run_id
        self.task_id = task_id
        self.function = function
        self.exc_type = exc_type
        self.message = message
        self.remote_traceback = remote_traceback
        super().__init__(
            f"Task '{task_id}' (function {function}) failed in run {run_id}: {exc_type}: {message}"
        )

    def __reduce__(self):  # keep the fields when pickled across processes
        return (
            TaskFailed,
            (
                self.run_id,
                self.task_id,
                self.function,
                self.exc_type,
                self.message,
                self.remote_traceback,
            ),
        )
