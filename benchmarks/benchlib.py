"""Shared by the benchmarks: machine facts, the command line, and their section of
docs/benchmarks.md (each benchmark owns a marked block and rewrites only that)."""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import platform
import re
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import psutil

import dagkube

PAGE_TITLE = "# Benchmarks"


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def machine_info() -> dict[str, Any]:
    """What the numbers were measured on."""
    return {
        "cpu": cpu_model(),
        "cores_logical": os.cpu_count(),
        "cores_physical": psutil.cpu_count(logical=False),
        "ram_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "os": platform.platform(),
        "python": platform.python_version(),
        "dagkube": dagkube.__version__,
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
    }


def command_line(script: str, argv: Sequence[str]) -> str:
    """The command that ran a benchmark (paths relative to the working directory)."""
    executable, path = Path(sys.executable), Path(script)
    with contextlib.suppress(ValueError):
        executable = executable.relative_to(Path.cwd())
    with contextlib.suppress(ValueError):
        path = path.resolve().relative_to(Path.cwd())
    return shlex.join([str(executable), str(path), *argv])


def write_section(page: Path, name: str, markdown: str) -> None:
    """Replace this benchmark's block of ``page`` (or append it), keeping the others."""
    begin, end = f"<!-- begin {name} -->", f"<!-- end {name} -->"
    block = f"{begin}\n{markdown.strip()}\n{end}"
    text = page.read_text() if page.exists() else f"{PAGE_TITLE}\n"
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.S)
    text = (
        pattern.sub(lambda _: block, text)
        if pattern.search(text)
        else (text.rstrip() + "\n\n" + block)
    )
    page.parent.mkdir(parents=True, exist_ok=True)
    page.write_text(text.rstrip() + "\n")


def provenance(script: str, argv: Sequence[str] | None) -> list[str]:
    """The closing lines of a benchmark section: the machine it ran on and the command."""
    machine = machine_info()
    args = sys.argv[1:] if argv is None else argv
    return [
        f"Machine: {machine['cpu']}, {machine['cores_logical']} cores, {machine['ram_gib']} GiB,"
        f" Python {machine['python']}, dagkube {machine['dagkube']}, {machine['date']}.",
        "",
        f"Command: `{command_line(script, args)}`",
    ]
