"""Resource classes: memory sizes (MiB integers inside, Kubernetes quantities at the edges).

CPU is not chosen separately: it is proportional to memory, ``memory / memory_per_cpu``,
capped by ``max_cpu`` (the Lambda-style rule the planners rely on).
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from dagkube.errors import InvalidOption

DEFAULT_MEMORY_PER_CPU_MIB = 1792
DEFAULT_MAX_CPU = 6.0
DEFAULT_CLASSES_MIB = (512, 1024, 2048)
MAX_CLASS_MIB = 1024 * 1024  # 1Ti: more memory than any worker gets

_QUANTITY = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(Ki|Mi|Gi|Ti)?\s*$")
_FACTOR_TO_MIB = {"Ki": 1 / 1024, "Mi": 1, "Gi": 1024, "Ti": 1024 * 1024, None: 1}
ACCEPTED_FORMS = (
    "a positive size with a binary suffix, e.g. 512Mi, 1.5Gi, 2Gi (plain numbers are MiB)"
)


def parse_memory(value: str | int) -> int:
    """Parse ``512Mi``/``2Gi``/``1536`` into MiB; reject anything else with the accepted forms."""
    if isinstance(value, bool):
        raise InvalidOption(f"Resource class {value!r} is not a memory size: use {ACCEPTED_FORMS}")
    if isinstance(value, int):
        mib = value
    else:
        match = _QUANTITY.match(str(value))
        if not match:
            raise InvalidOption(
                f"Resource class {value!r} is not a memory size: use {ACCEPTED_FORMS}"
            )
        number, suffix = match.groups()
        if len(number) > 20:  # far past any machine; float() would make it inf
            raise InvalidOption(
                f"Resource class {value[:40]!r}... is too large: the largest class is "
                f"{MAX_CLASS_MIB // (1024 * 1024)}Ti"
            )
        exact = float(number) * _FACTOR_TO_MIB[suffix]
        mib = round(exact)
        if abs(exact - mib) > 1e-9:
            raise InvalidOption(
                f"Resource class {value!r} is not a whole number of MiB: use {ACCEPTED_FORMS}"
            )
    if mib > MAX_CLASS_MIB:
        raise InvalidOption(
            f"Resource class {str(value)[:40]!r}{'...' if len(str(value)) > 40 else ''} is too "
            f"large: the largest class is {MAX_CLASS_MIB // (1024 * 1024)}Ti"
        )
    if mib < 128:
        raise InvalidOption(
            f"Resource class {value!r} is too small ({mib} MiB): the smallest class is 128Mi"
        )
    return mib


def parse_classes(values: str | Iterable[str | int] | None) -> list[int]:
    """Parse a comma-separated string or a list of sizes into sorted, distinct MiB classes."""
    if values is None:
        return list(DEFAULT_CLASSES_MIB)
    items = [v for v in values.split(",") if v.strip()] if isinstance(values, str) else list(values)
    if not items:
        raise InvalidOption(f"No resource classes given: use {ACCEPTED_FORMS}, comma-separated")
    return sorted({parse_memory(v) for v in items})


def format_memory(mib: int) -> str:
    """MiB integer to a Kubernetes quantity (``2048`` -> ``2Gi``, ``1536`` -> ``1536Mi``)."""
    return f"{mib // 1024}Gi" if mib % 1024 == 0 else f"{mib}Mi"


def cpu_for_memory(
    memory_mib: int,
    memory_per_cpu_mib: int = DEFAULT_MEMORY_PER_CPU_MIB,
    max_cpu: float = DEFAULT_MAX_CPU,
) -> float:
    """vCPUs allocated to a worker of this memory class."""
    return min(memory_mib / memory_per_cpu_mib, max_cpu)


def cpu_millicores(
    memory_mib: int,
    memory_per_cpu_mib: int = DEFAULT_MEMORY_PER_CPU_MIB,
    max_cpu: float = DEFAULT_MAX_CPU,
) -> int:
    """CPU in millicores, rounded to the nearest (512Mi -> 286m, 2Gi -> 1143m at 1792 MiB/vCPU)."""
    return max(1, round(cpu_for_memory(memory_mib, memory_per_cpu_mib, max_cpu) * 1000))
