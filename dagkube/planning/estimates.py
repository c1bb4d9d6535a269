"""What every candidate of one planning call shares: the DAG's predicted sizes, its tasks'
predicted times per memory class, and their memory floors, each predicted once.

A task's input and output sizes do not depend on its class (its inputs are its upstream
outputs), only its execution time does: the times of a class are predicted once for every
task, and the estimates of any class per task are assembled from them, with the values
:func:`~dagkube.planning.predictions.estimate` gives for the same classes.
"""

from __future__ import annotations

from dagkube.dag import DagSpec
from dagkube.planning.predictions import Estimates, Predictor, estimate


def memory_floors(
    dag: DagSpec, predictor: Predictor, input_bytes: dict[str, int]
) -> dict[str, int]:
    """Per task, the least memory its class must have: its ``min_memory`` hint, and its
    predicted peak plus headroom (or more than a class it was OOM-killed at)."""
    floors: dict[str, int] = {}
    for task_id, spec in dag.tasks.items():
        predicted = predictor.memory_floor_mib(spec.function, input_bytes[task_id], task_id)
        floors[task_id] = max(spec.min_memory_mib or 0, predicted)
    return floors


class SharedEstimates:
    """The estimates of one DAG under one predictor, each made on first use and kept; the
    dicts handed out are shared, not copies: callers must not change them."""

    def __init__(self, dag: DagSpec, predictor: Predictor, base_class_mib: int) -> None:
        self.dag = dag
        self.predictor = predictor
        # Sizes (and the times at this class) are estimated first, the other classes' times
        # from the same input sizes.
        self.base = estimate(dag, predictor, dict.fromkeys(dag.tasks, base_class_mib))
        self._exec_at: dict[int, dict[str, float]] = {base_class_mib: self.base.exec_s}
        self._floors: dict[str, int] | None = None

    def exec_at(self, memory_mib: int) -> dict[str, float]:
        """Per task, its predicted execution time at ``memory_mib``."""
        found = self._exec_at.get(memory_mib)
        if found is None:
            exec_s, inputs = self.predictor.exec_s, self.base.input_bytes
            found = {
                task_id: exec_s(spec.function, inputs[task_id], memory_mib, task_id)
                for task_id, spec in self.dag.tasks.items()
            }
            self._exec_at[memory_mib] = found
        return found

    def at_class(self, memory_mib: int) -> Estimates:
        """Every task at ``memory_mib``."""
        return Estimates(self.base.input_bytes, self.base.out_bytes, self.exec_at(memory_mib))

    def at(self, memory: dict[str, int]) -> Estimates:
        """Each task at its class in ``memory``."""
        classes = set(memory.values())
        if len(classes) == 1:
            return self.at_class(classes.pop())
        per_class = {memory_mib: self.exec_at(memory_mib) for memory_mib in classes}
        exec_s = {task_id: per_class[memory[task_id]][task_id] for task_id in self.dag.tasks}
        return Estimates(self.base.input_bytes, self.base.out_bytes, exec_s)

    def floors(self) -> dict[str, int]:
        """Per task, the least class it may have (:func:`memory_floors`)."""
        if self._floors is None:
            self._floors = memory_floors(self.dag, self.predictor, self.base.input_bytes)
        return self._floors
