"""Task errors are stored capped: head and tail around a marker, within the byte limits."""

from __future__ import annotations

import re

import pytest

from dagkube.store.records import (
    ERROR_MESSAGE_MAX_BYTES,
    ERROR_TRACEBACK_MAX_BYTES,
    TaskError,
    cap_text,
)


def test_text_within_the_cap_is_kept_as_it_is():
    assert cap_text("x" * 100, 100) == "x" * 100
    assert cap_text("", 10) == ""


@pytest.mark.parametrize("unit", ["x", "é", "€", "🦀"])
def test_longer_text_keeps_head_and_tail_around_the_dropped_byte_count(unit):
    text = "HEAD" + unit * 50_000 + "TAIL"
    capped = cap_text(text, 1000)
    assert len(capped.encode()) <= 1000
    assert capped.startswith("HEAD" + unit) and capped.endswith(unit + "TAIL")
    (dropped,) = re.findall(r"\n… \[(\d+) bytes truncated\] …\n", capped)
    head, tail = capped.split(f"\n… [{dropped} bytes truncated] …\n")
    assert len(head.encode()) + int(dropped) + len(tail.encode()) == len(text.encode())


def test_a_cap_too_small_for_the_marker_is_refused():
    with pytest.raises(ValueError, match="max_bytes=10 leaves no room"):
        cap_text("x" * 100, 10)


def test_task_errors_are_capped_wherever_they_are_built():
    huge = "y" * 20_000_000
    error = TaskError(exc_type="ValueError", message=huge, traceback=huge)
    assert len(error.message.encode()) <= ERROR_MESSAGE_MAX_BYTES
    assert len(error.traceback.encode()) <= ERROR_TRACEBACK_MAX_BYTES
    again = TaskError.model_validate_json(error.model_dump_json())
    assert again == error
