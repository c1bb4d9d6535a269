"""Entry point of the worker agent: ``python -m dagkube.worker`` (see dagkube.runtime.worker).

An emulated start-up (``DAGKUBE_STARTUP_DELAY_S``: LocalRuntime's ``startup_delay_s``, which
makes a local cold start cost what a Pod's does) passes here, before the runtime is imported,
as a Pod's scheduling and container start pass before its interpreter runs: the imports'
CPU comes after the wait, not before it, so workers that start together contend for the
cores where their Pods would, not while the run's first worker is still starting. A SIGTERM
during the wait ends it (during the imports, it waits for them), and the runtime then only
reports the worker unused (charged until the signal) and exits.
"""

import os
import signal
import sys
import time

STARTUP_DELAY_ENV = "DAGKUBE_STARTUP_DELAY_S"


def sigterm_held(wait_s: float) -> float | None:
    """With SIGTERM blocked: wait up to ``wait_s`` seconds (0: only look) for one; when it
    came (``time.time()``), else None."""
    if signal.sigtimedwait({signal.SIGTERM}, wait_s) is None:
        return None
    return time.time()


if __name__ == "__main__":
    delay_s = float(os.environ.get(STARTUP_DELAY_ENV) or 0)
    stopped_at: float | None = None
    # SIGTERM is held from here until the runtime can answer it, so a stop during the delay
    # or the imports is reported (without sigtimedwait, macOS, it ends the process at once).
    holding = hasattr(signal, "sigtimedwait")
    if holding:
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
        if delay_s > 0:
            stopped_at = sigterm_held(delay_s)
    elif delay_s > 0:
        time.sleep(delay_s)

    from dagkube.runtime.worker import main

    if holding:
        stopped_at = stopped_at or sigterm_held(0)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
    sys.exit(main(stopped_at=stopped_at))
