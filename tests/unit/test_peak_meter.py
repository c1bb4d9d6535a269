"""The worker's peak-memory meter: a task's allocation shows in its peak, and a reset brings
the peak back down to what the process holds now. Measured in a fresh interpreter, as a
worker is: the test process's own heap (hundreds of MiB freed but resident after other tests)
would hide an allocation."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux /proc")

MIB = 1024 * 1024

PROBE = textwrap.dedent(
    """
    import json
    from pathlib import Path
    from dagkube.runtime.memory import PeakMeter

    def resident():
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024

    def allocate(mib):
        block = bytearray(mib * 1024 * 1024)
        for offset in range(0, len(block), 4096):  # touched, so resident
            block[offset] = 1
        return block

    meter = PeakMeter()
    found = {"tasks": []}
    for mib in (150, 0, 60, 60, 60):  # the files stay open across tasks
        meter.reset()
        before = resident()
        block = allocate(mib) if mib else None
        found["tasks"].append({"mib": mib, "resident": before, "peak": meter.peak_bytes()})
        del block
    found["resettable"] = meter.resettable
    print(json.dumps(found))
    """
)


def test_the_peak_of_each_task_is_its_own():
    done = subprocess.run(
        [sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=60, check=True
    )
    found = json.loads(done.stdout)
    assert found["resettable"]
    for task in found["tasks"]:
        # each task's peak: what the process held when it started, plus what it allocated
        grown = task["peak"] - task["resident"]
        assert task["mib"] * MIB - 5 * MIB <= grown <= task["mib"] * MIB + 20 * MIB, task
    first, second = found["tasks"][:2]
    assert second["peak"] < first["peak"] - 100 * MIB  # the 150 MiB task's peak did not carry
