"""What the worker core knows of a run: its DAG, plan and optimization marks, and the
decisions derived from them once per run (cached: a worker serves many tasks of a run).
The consumers of a task are given as the COMPLETE step's typed argument (plain data)."""

from __future__ import annotations

from dataclasses import dataclass, field

from dagkube.dag import DagSpec
from dagkube.planning.model import OptimizationIndex, Plan, output_must_be_stored
from dagkube.store.calls import Downstream

# Work stealing takes only tasks predicted to execute in at most this long: the worker they
# were taken from runs one itself when it finds it not done yet (the thief may have been
# lost), so a task run twice costs at most about this much.
STEAL_MAX_EXEC_S = 0.1
# A thief takes about this much predicted work at a time (execution plus STEAL_TASK_COST_S a
# task), between 1 and STEAL_MOST tasks: its own tasks that become ready meanwhile wait for
# them, and the victims learn of a take at their next COMPLETE.
STEAL_WINDOW_S = 0.05
STEAL_TASK_COST_S = 0.0005
STEAL_MOST = 128


def steal_keep(most: int) -> int:
    """The first offers a thief leaves each victim: it may be running them (its COMPLETE
    withdraws a task only once sent, and a group commit may hold several), about a quarter
    of a take, at least 2."""
    return max(2, most // 4)


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
    _stealable: dict[str, bool] = field(default_factory=dict)
    _victims: dict[str, tuple[str, ...]] = field(default_factory=dict)
    _steal_most: dict[str, int] = field(default_factory=dict)

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
                    offer=self.stealable(down),
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

    def stealable(self, task_id: str) -> bool:
        """Another bound worker may take the task once it is ready (work stealing): it is
        bound, short (STEAL_MAX_EXEC_S), has inputs and each one is stored when it ends
        (a thief reads them from Redis), has no time limit and no optimization that ties it
        to its planned worker (delayed-io, pre-load, pre-warm, taskdup)."""
        decided = self._stealable.get(task_id)
        if decided is None:
            decided = self._stealable[task_id] = self._may_be_stolen(task_id)
        return decided

    def _may_be_stolen(self, task_id: str) -> bool:
        spec, planned, opts = self.dag.tasks[task_id], self.plan.tasks[task_id], self.opts
        exec_s = planned.predicted_exec_s
        if planned.worker_id is None or spec.timeout_s is not None or not spec.deps:
            return False
        if exec_s is None or exec_s > STEAL_MAX_EXEC_S:
            return False
        tied = (
            task_id in opts.dups
            or task_id in opts.dup_targets
            or task_id in opts.delayed
            or task_id in opts.preload
            or task_id in opts.prewarm
        )
        return not tied and all(
            self.must_store(dep) and dep not in opts.delayed for dep in spec.deps
        )

    def victims(self, logical_worker: str) -> tuple[str, ...]:
        """The bound workers whose tasks ``logical_worker`` may take: those with a task that
        may be stolen, of a class no larger than its own (a task never runs with less memory
        or CPU than planned)."""
        found = self._victims.get(logical_worker)
        if found is None:
            classes: dict[str, int] = {}  # bound worker -> its class
            offering: set[str] = set()  # bound workers with a task that may be stolen
            for task_id, planned in self.plan.tasks.items():
                worker = planned.worker_id
                if worker is not None:
                    classes[worker] = max(classes.get(worker, 0), planned.memory_mib)
                    if self.stealable(task_id):
                        offering.add(worker)
            mine = classes.get(logical_worker, 0)
            found = self._victims[logical_worker] = tuple(
                sorted(w for w in offering if w != logical_worker and classes[w] <= mine)
            )
        return found

    def steal_most(self, logical_worker: str) -> int:
        """How many tasks ``logical_worker`` takes at a time: STEAL_WINDOW_S of the longest
        predicted execution among its victims' tasks that may be stolen."""
        most = self._steal_most.get(logical_worker)
        if most is None:
            victims = set(self.victims(logical_worker))
            longest = max(
                (
                    planned.predicted_exec_s or 0.0
                    for task_id, planned in self.plan.tasks.items()
                    if planned.worker_id in victims and self.stealable(task_id)
                ),
                default=0.0,
            )
            each = longest + STEAL_TASK_COST_S
            most = self._steal_most[logical_worker] = max(
                1, min(STEAL_MOST, int(STEAL_WINDOW_S / each))
            )
        return most
