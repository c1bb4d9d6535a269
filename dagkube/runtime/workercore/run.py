"""What the worker core knows of a run: its DAG, plan and optimization marks, and the
decisions derived from them once per run (cached: a worker serves many tasks of a run).
The consumers of a task are given as the COMPLETE step's typed argument (plain data)."""

from __future__ import annotations

from dataclasses import dataclass, field

from dagkube.dag import DagSpec
from dagkube.planning.model import OptimizationIndex, Plan, output_must_be_stored
from dagkube.store.calls import Downstream


@dataclass
class RunView:
    """A run as plain data. The I/O shell extends it with the values and code it holds."""

    run_id: str
    dag: DagSpec
    plan: Plan
    ttl_s: int
    history_cap: int
    task_index: dict[str, int]
    submitted_at: float = 0.0
    opts: OptimizationIndex = field(default_factory=OptimizationIndex)
    duplicated: dict[str, list[str]] = field(default_factory=dict)  # consumer -> re-run inputs
    _downstream: dict[str, list[Downstream]] = field(default_factory=dict)
    _store: dict[str, bool] = field(default_factory=dict)
    _worker_tasks: dict[str, list[str]] | None = None

    def downstream(self, task_id: str) -> list[Downstream]:
        """The consumers of ``task_id`` as its COMPLETE step needs them: inputs to count,
        planned worker, class, clustering, pre-load host of this input. The step routes the
        ready ones as :func:`dagkube.planning.rules.route` says."""
        consumers = self._downstream.get(task_id)
        if consumers is None:
            clustered = task_id in self.opts.clustered
            consumers = self._downstream[task_id] = [
                Downstream(
                    task_id=down,
                    dependencies=len(self.dag.tasks[down].deps),
                    memory_mib=self.plan.tasks[down].memory_mib,
                    worker=self.plan.tasks[down].worker_id,
                    clustered=clustered,
                    preload_host=self.opts.preload_host.get((task_id, down)),
                )
                for down in self.dag.tasks[task_id].downstream
            ]
        return consumers

    def must_store(self, task_id: str) -> bool:
        """Upload an output only if a consumer may run elsewhere or it is a run output."""
        decided = self._store.get(task_id)
        if decided is None:
            decided = self._store[task_id] = output_must_be_stored(
                self.dag,
                task_id,
                lambda t: self.plan.tasks[t].worker_id,
                task_id in self.opts.clustered,
            )
        return decided

    def worker_tasks(self, logical_worker: str) -> list[str]:
        """The tasks planned for a logical worker, in plan order."""
        if self._worker_tasks is None:
            self._worker_tasks = self.plan.worker_tasks()
        return self._worker_tasks.get(logical_worker, [])
