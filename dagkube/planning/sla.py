"""Service-level agreements: ``avg`` or a percentile ``pNN`` (1 <= NN < 100, decimals allowed)."""

from __future__ import annotations

import re

from dagkube.errors import InvalidOption

_PERCENTILE = re.compile(r"^p(\d{1,2}(?:\.\d+)?)$")
ACCEPTED_SLAS = "'avg', or a percentile 'pNN' with 1 <= NN < 100 (e.g. p90, p95, p99, p99.9)"


def parse_sla(value: str) -> str:
    """Normalize an SLA string, or raise listing the accepted forms."""
    text = str(value).strip().lower()
    if text in {"avg", "average", "mean"}:
        return "avg"
    match = _PERCENTILE.match(text)
    if match:
        number = float(match.group(1))
        if 1 <= number < 100:
            return f"p{match.group(1)}"
    raise InvalidOption(f"SLA {value!r} is not valid: use {ACCEPTED_SLAS}")


def sla_percentile(sla: str) -> float | None:
    """The percentile an SLA asks for, or None for the average."""
    sla = parse_sla(sla)
    return None if sla == "avg" else float(sla[1:])
