"""Entry point of the worker agent: ``python -m dagkube.worker`` (see dagkube.runtime.worker).

An emulated start-up (``DAGKUBE_STARTUP_DELAY_S``: LocalRuntime's ``startup_delay_s``, which
makes a local cold start cost what a Pod's does) passes here, before the runtime is imported,
as a Pod's scheduling and container start pass before its interpreter runs: the imports'
CPU comes after the wait, not before it, so workers that start together contend for the
cores where their Pods would, not while the run's first worker is still starting. A SIGTERM
during the wait ends it, and the runtime then only reports the worker unused (charged until
the signal) and exits.
"""

import os
import signal
import sys
import time

STARTUP_DELAY_ENV = "DAGKUBE_STARTUP_DELAY_S"  # also dagkube.runtime.worker.main's, not delayed


def emulated_startup(delay_s: float) -> float | None:
    """Wait ``delay_s`` seconds; if a SIGTERM comes meanwhile, the wait ends and its time
    (``time.time()``) is returned."""
    if delay_s <= 0:
        return None
    if not hasattr(signal, "sigtimedwait"):  # macOS: a SIGTERM ends the process unreported
        time.sleep(delay_s)
        return None
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    try:
        if signal.sigtimedwait({signal.SIGTERM}, delay_s) is None:
            return None
        return time.time()
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})


if __name__ == "__main__":
    stopped_at = emulated_startup(float(os.environ.get(STARTUP_DELAY_ENV) or 0))

    from dagkube.runtime.worker import main

    sys.exit(main(delayed=True, stopped_at=stopped_at))
