"""Running a task's function on the worker's task thread: deserialize its inputs, call it
(with retries), serialize its output, and measure it."""

from __future__ import annotations

import pickle
import time
from dataclasses import dataclass
from typing import Any

from dagkube.dag import TaskSpec, resolve
from dagkube.runtime.inputs import RunState, deserialize, serialize
from dagkube.runtime.memory import PeakMeter
from dagkube.sources import format_exception
from dagkube.store.frames import Serialized
from dagkube.store.records import TaskError

RETRY_BACKOFF_S = 0.1  # first pause between attempts of a raising task; doubles each time
RETRY_BACKOFF_MAX_S = 10.0


@dataclass
class Execution:
    """What the task thread hands back to the event loop."""

    output: Serialized | None  # serialized output, when it must be uploaded
    output_bytes: int
    input_bytes: int
    inputs_ready_at: float
    started_at: float
    ended_at: float
    cpu_s: float
    attempts: int
    error: TaskError | None
    peak_bytes: int | None = None


def task_error(exc: BaseException, context: str = "") -> TaskError:
    """A task's exception as it is recorded (TaskError caps its message and traceback)."""
    return TaskError(
        exc_type=type(exc).__qualname__,
        message=context + str(exc),
        traceback=format_exception(exc),
    )


def retry_delay_s(attempt: int) -> float:
    """The pause before retry number ``attempt`` of a raising task: exponential, capped (a
    failing dependency gets time to recover; a retried task does not hammer it)."""
    return float(min(RETRY_BACKOFF_S * 2 ** (attempt - 1), RETRY_BACKOFF_MAX_S))


def run_in_thread(
    state: RunState, spec: TaskSpec, raw: dict[str, bytes], store: bool, meter: PeakMeter
) -> Execution:
    """Deserialize inputs, run the function (with retries), serialize the output; the
    worker's peak memory over all of it (inputs held, output serialized) is the task's.

    Runs on the task thread so the event loop keeps heartbeating and downloading. The output
    is always serialized, so its size is known (the planner's input-size feature), and
    returned for upload only when ``store``.
    """
    meter.reset()
    for key, blob in raw.items():
        if key.startswith("const:"):
            state.constants[key[6:]] = deserialize(blob)
            state.sizes[key] = len(blob)
        else:
            state.values[key] = deserialize(blob)
            state.sizes[key] = len(blob)
    input_bytes = (
        len(spec.args_blob)
        + sum(state.sizes.get(d, 0) for d in spec.deps)
        + sum(state.sizes.get("const:" + k, 0) for k in spec.const_keys)
    )
    inputs_ready_at = time.time()
    attempts = 0
    error: TaskError | None = None
    value: Any = None
    cpu_start = time.thread_time()
    started_at = time.time()
    while True:
        attempts += 1
        try:
            args, kwargs = resolve(pickle.loads(spec.args_blob), state.values, state.constants)
            value = state.function(spec.fn_key)(*args, **kwargs)
            error = None
            break
        # What the user's function raised is data here, reported like any task error:
        # BaseException too (sys.exit(), KeyboardInterrupt raised by the code, a library's
        # own control-flow exception). None of the worker's own stops can arrive here: this
        # is the task thread, while signals and cancellation reach the event loop's thread.
        except BaseException as exc:
            error = task_error(exc)
            if attempts > spec.retries:
                break
            time.sleep(retry_delay_s(attempts))
    ended_at = time.time()
    cpu_s = time.thread_time() - cpu_start
    serialized: Serialized | None = None
    if error is None:
        state.values[spec.id] = value
        try:
            serialized = serialize(value)
            state.sizes[spec.id] = len(serialized)
        except BaseException as exc:  # the output's own pickling code raised (user code too)
            error = task_error(exc, f"the output of {spec.id} cannot be serialized: ")
    return Execution(
        peak_bytes=meter.peak_bytes(),
        output=serialized if store else None,
        output_bytes=len(serialized) if serialized is not None else 0,
        input_bytes=input_bytes,
        inputs_ready_at=inputs_ready_at,
        started_at=started_at,
        ended_at=ended_at,
        cpu_s=cpu_s,
        attempts=attempts,
        error=error,
    )
