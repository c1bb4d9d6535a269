"""A slow workflow that announces its start in $DAGKUBE_TEST_MARKER (Ctrl-C tests)."""

import os
import time
from pathlib import Path

import dagkube


@dagkube.task
def wait(seconds: float, marker: str) -> float:
    Path(marker).write_text(str(os.getpid()))
    time.sleep(seconds)
    return seconds


def build():
    marker = os.environ["DAGKUBE_TEST_MARKER"]
    return dagkube.Workflow([wait(30.0, marker), wait(30.0, marker + ".2")], name="cli-slow")
