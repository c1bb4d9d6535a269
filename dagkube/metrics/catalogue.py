"""The catalogue of the metrics dagkube exposes: every name with its type, help text, labels
and histogram buckets. The aggregation folds records into these names, the collector exposes
them, ``tools/make_dashboards.py`` and the tests check the dashboards against
:func:`exposed_names`, and docs/metrics.md describes each one.

Labels are bounded: workflow name, planner (as run: ``uniform`` or ``uniform + preload`` when
optimizations were switched on by hand; ``-opt`` planners keep their name), SLA, memory class,
function, status, start kind, optimization name, outcome, state. Never run, task or worker ids.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

# Buckets (upper bounds; +Inf is added).
SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600)
MAKESPAN = (0.5, 1, 1.5, 2, 3, 4, 5, 7.5, 10, 15, 20, 30, 45, 60, 120, 300, 600, 1800, 3600)
RATIOS = (0.01, 0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1, 2, 5)
GB_SECONDS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 50, 100, 250, 1000, 10_000, 100_000)
COUNTS = (0, 1, 2, 3, 4, 5, 7, 10, 15, 20, 30, 50, 100, 250, 1000)
# Powers of two from 64 MiB to 16 GiB: the bounds fall on the usual memory classes, so a
# bucket reads "fits in a class of this size".
MEMORY_BYTES = tuple(float(2**power * 1024 * 1024) for power in range(6, 15))  # 64Mi..16Gi

# Counters a run's history meta may still receive after the run ended: a pre-warm request
# due late, a worker created for the run that exits unused (a pre-warmed one, or one created
# for an invocation another worker took first). Finished runs are re-read for these fields
# (one HMGET each) until a while after they finished (the collector's SETTLE_S).
LATE_FIELDS = {
    "prewarm_requested": "dagkube_prewarm_requests",
    "prewarm_started": "dagkube_prewarm_started",
    "prewarm_wasted": "dagkube_prewarm_wasted",
    "prewarm_wasted_gb_s": "dagkube_prewarm_wasted_gigabyte_seconds",
    "workers_unused": "dagkube_workers_unused",
    "workers_unused_gb_s": "dagkube_workers_unused_gigabyte_seconds",
}

LabelValues = tuple[str, ...]  # one series' label values, in the order of its Spec's labels
Kind = Literal["counter", "histogram", "gauge"]


@dataclass(frozen=True)
class Spec:
    """One metric as exposed: what a dashboard may query and docs/metrics.md describes."""

    name: str  # without the _total of counters
    kind: Kind
    doc: str
    labels: tuple[str, ...]
    buckets: Sequence[float] = ()

    def exposed(self) -> set[str]:
        """Sample names in the exposition."""
        if self.kind == "counter":
            return {f"{self.name}_total"}
        if self.kind == "histogram":
            return {f"{self.name}_bucket", f"{self.name}_sum", f"{self.name}_count"}
        return {self.name}


# Label sets shared by several metrics: per run, per task function, per worker class.
RUN = ("workflow", "planner", "sla")
TASK = ("workflow", "planner", "function")
WORKER = ("planner", "memory_class")

# Folded from the run history: counters and histograms that only grow.
HISTORY_SPECS: tuple[Spec, ...] = (
    # runs
    Spec("dagkube_runs", "counter", "Finished runs by status", (*RUN, "status")),
    Spec(
        "dagkube_run_makespan_seconds",
        "histogram",
        "Measured makespan of succeeded runs (submission to last task completed)",
        RUN,
        MAKESPAN,
    ),
    Spec(
        "dagkube_run_predicted_makespan_seconds",
        "histogram",
        "Makespan the plan predicted at the run's SLA",
        RUN,
        MAKESPAN,
    ),
    Spec(
        "dagkube_run_prediction_error_ratio",
        "histogram",
        "Absolute difference of predicted and measured makespan over measured (succeeded runs)",
        RUN,
        RATIOS,
    ),
    Spec(
        "dagkube_run_sla",
        "counter",
        "Succeeded runs that finished within (met) or after (missed) their predicted makespan",
        (*RUN, "outcome"),
    ),
    Spec(
        "dagkube_run_execution_seconds",
        "histogram",
        "Sum of the execution times of a succeeded run's tasks (duplicates included)",
        RUN,
        MAKESPAN,
    ),
    Spec(
        "dagkube_run_gigabyte_seconds",
        "histogram",
        "Memory held by a run's workers, GB x seconds per run",
        RUN,
        GB_SECONDS,
    ),
    # tasks
    Spec(
        "dagkube_task_duration_seconds",
        "histogram",
        "Execution time of tasks (last attempt; duplicates included)",
        TASK,
        SECONDS,
    ),
    Spec(
        "dagkube_task_input_wait_seconds",
        "histogram",
        "From a task taken by its worker to its inputs in hand",
        TASK,
        SECONDS,
    ),
    Spec(
        "dagkube_task_download_seconds",
        "histogram",
        "Time tasks that downloaded inputs spent downloading them",
        TASK,
        SECONDS,
    ),
    Spec(
        "dagkube_task_upload_seconds",
        "histogram",
        "Time tasks that stored their output spent uploading it",
        TASK,
        SECONDS,
    ),
    Spec("dagkube_task_download_bytes", "counter", "Input bytes tasks downloaded", TASK),
    Spec("dagkube_task_upload_bytes", "counter", "Output bytes tasks stored", TASK),
    Spec("dagkube_task_failures", "counter", "Tasks that raised after their retries", TASK),
    Spec("dagkube_task_retries", "counter", "Task attempts beyond the first", TASK),
    Spec(
        "dagkube_task_peak_memory_bytes",
        "histogram",
        "Peak resident memory of the worker process while a task ran (tasks where measured)",
        TASK,
        MEMORY_BYTES,
    ),
    Spec(
        "dagkube_task_oom_kills",
        "counter",
        "Earlier attempts of tasks whose worker was OOM-killed (the task then ran one class up)",
        TASK,
    ),
    # workers
    Spec(
        "dagkube_worker_starts",
        "counter",
        "Invocations served, by how their worker started: cold, warm, prewarmed",
        (*WORKER, "start"),
    ),
    Spec(
        "dagkube_worker_startup_seconds",
        "histogram",
        "From an invocation queued to its first task started",
        (*WORKER, "start"),
        SECONDS,
    ),
    Spec("dagkube_workers_lost", "counter", "Workers lost mid-invocation (work re-queued)", WORKER),
    Spec(
        "dagkube_workers_unused",
        "counter",
        "Workers created for a run's queued invocation that another worker took first, and "
        "that exited without serving anything",
        RUN,
    ),
    Spec(
        "dagkube_workers_unused_gigabyte_seconds",
        "counter",
        "Lifetime of those unused workers, GB x seconds (charged to the run, not in its GB-s)",
        RUN,
    ),
    Spec(
        "dagkube_workers_oom_killed",
        "counter",
        "Workers killed for exceeding their class's memory limit (runs with enforced limits)",
        RUN,
    ),
    Spec(
        "dagkube_oom_escalations",
        "counter",
        "Work of OOM-killed workers re-queued one memory class up (at the largest class the "
        "run fails instead)",
        RUN,
    ),
    # resources
    Spec(
        "dagkube_gigabyte_seconds",
        "counter",
        "Memory held by workers for runs, GB x seconds (from spawn for cold and pre-warmed "
        "starts, else from taking the invocation, to its end)",
        WORKER,
    ),
    Spec(
        "dagkube_cpu_seconds_allocated",
        "counter",
        "CPU held by workers for runs, allocated CPUs x seconds (same periods as GB-seconds)",
        WORKER,
    ),
    Spec("dagkube_cpu_seconds_used", "counter", "CPU time workers used for runs", WORKER),
    # optimizations
    Spec(
        "dagkube_optimizations_applied",
        "counter",
        "Runs with each optimization switched on in their plan",
        ("planner", "optimization"),
    ),
    Spec(
        "dagkube_run_optimization_marks",
        "histogram",
        "Marks of an optimization in a run's plan, per run that switched it on",
        ("workflow", "planner", "optimization"),
        COUNTS,
    ),
    Spec("dagkube_prewarm_requests", "counter", "Workers asked for by pre-warm requests", RUN),
    Spec(
        "dagkube_prewarm_started",
        "counter",
        "Pre-warm workers the scaler created (within the worker cap)",
        RUN,
    ),
    Spec("dagkube_prewarm_used", "counter", "Pre-warmed workers that served their run", RUN),
    Spec("dagkube_prewarm_wasted", "counter", "Pre-warmed workers that exited unused", RUN),
    Spec(
        "dagkube_prewarm_wasted_gigabyte_seconds",
        "counter",
        "Lifetime of pre-warmed workers that exited unused, GB x seconds",
        RUN,
    ),
    Spec(
        "dagkube_prewarm_lead_seconds",
        "histogram",
        "From a pre-warmed worker ready (registered) to taking the invocation it served",
        WORKER,
        SECONDS,
    ),
    Spec(
        "dagkube_prewarm_trigger_to_start_seconds",
        "histogram",
        "From a pre-warm request due to its target task's start (targets started after it)",
        ("planner",),
        SECONDS,
    ),
    Spec(
        "dagkube_prewarm_targets",
        "counter",
        "Target tasks of pre-warm requests that started after (ahead) or before (late) the "
        "request was due",
        ("planner", "outcome"),
    ),
    Spec(
        "dagkube_preloaded_inputs",
        "counter",
        "Inputs fetched in the background before their fan-in task started (preload)",
        TASK,
    ),
    Spec(
        "dagkube_preload_saved_seconds",
        "counter",
        "Background fetch and deserialize time of pre-loaded inputs: input-wait moved off the "
        "task (an upper bound of the wait saved)",
        TASK,
    ),
    Spec(
        "dagkube_tasks_duplicated",
        "counter",
        "Duplicates of late upstream tasks started by a waiting worker (taskdup)",
        RUN,
    ),
    Spec("dagkube_duplicates_won", "counter", "Duplicates that finished before the original", RUN),
    Spec(
        "dagkube_tasks_stolen",
        "counter",
        "Ready tasks a bound worker with nothing left took from a busier one (work stealing)",
        RUN,
    ),
    Spec(
        "dagkube_taskdup_saved_seconds",
        "counter",
        "Original's end minus its duplicate's end, where both finished and the duplicate was "
        "first: how much sooner consumers had the output",
        RUN,
    ),
    Spec(
        "dagkube_delayed_io_outputs",
        "counter",
        "Outputs under delayed I/O: kept local (upload skipped) or uploaded",
        ("planner", "outcome"),
    ),
)

# Read at each scrape: the live pools and the exporter's own state.
LIVE_SPECS: tuple[Spec, ...] = (
    Spec(
        "dagkube_queue_depth",
        "gauge",
        "Invocations queued for a worker, by class (live pools)",
        ("memory_class",),
    ),
    Spec(
        "dagkube_workers",
        "gauge",
        "Workers by state (live pools): starting, idle, busy, waiting (bound, blocked on inputs)",
        ("state", "memory_class"),
    ),
    Spec("dagkube_exporter_redis_up", "gauge", "1 if the last scrape could read Redis", ()),
    Spec(
        "dagkube_exporter_runs_backlog",
        "gauge",
        "Runs in the history index not folded yet (left for the next scrapes)",
        (),
    ),
    Spec(
        "dagkube_exporter_runs_folded",
        "counter",
        "Runs of the history folded into these metrics since the exporter started",
        (),
    ),
)

SPECS = {spec.name: spec for spec in (*HISTORY_SPECS, *LIVE_SPECS)}
ALLOWED_LABELS = frozenset(label for spec in SPECS.values() for label in spec.labels)
WORKER_STATES = ("starting", "idle", "busy", "waiting")


def exposed_names() -> set[str]:
    """Every sample name the exporter can expose (dashboards may only use these)."""
    return {name for spec in SPECS.values() for name in spec.exposed()}
