"""Peak memory of the worker process around one task.

Linux keeps a process's resident-set high-water mark (``VmHWM`` in ``/proc/self/status``);
writing ``5`` to ``/proc/self/clear_refs`` resets it to the current resident set. Reset before
a task, read after: the peak the worker reached while the task ran — interpreter, libraries
and the inputs it holds included, which is what a memory limit on the whole worker (a cgroup,
a Pod's container) counts. Works in a container without access to its cgroup.

Where the reset is not allowed (not Linux, or a hardened ``/proc``), the process's lifetime
peak (``getrusage``) is reported instead: never lower than the task's real peak.
"""

from __future__ import annotations

import resource
import sys
from pathlib import Path

STATUS = Path("/proc/self/status")
CLEAR_REFS = Path("/proc/self/clear_refs")


class PeakMeter:
    """``reset()`` before a task, ``peak_bytes()`` after it."""

    def __init__(self) -> None:
        self.resettable = sys.platform.startswith("linux")

    def reset(self) -> None:
        if not self.resettable:
            return
        try:
            CLEAR_REFS.write_text("5")
        except OSError:
            self.resettable = False

    def peak_bytes(self) -> int:
        if self.resettable:
            try:
                for line in STATUS.read_text().splitlines():
                    if line.startswith("VmHWM:"):
                        return int(line.split()[1]) * 1024
            except (OSError, ValueError, IndexError):
                pass
        # ru_maxrss is KiB on Linux, bytes on macOS
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024
