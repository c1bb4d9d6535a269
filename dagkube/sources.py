"""Task functions travel with their file names and source lines, so remote tracebacks read
like local ones.

A function pickled by value (defined in a workflow file, a notebook, an inline Workflow source)
reaches the worker as a rebuilt code object. cloudpickle 3.1.3 and later rename every such code
object's file to ``<dynamic-code>`` (for deterministic payloads), and the worker has no copy of
the file anyway, so a traceback would show neither where the error was nor its line.

:func:`dumps_function` pickles a function with cloudpickle, but every code object keeps its real
``co_filename``, and the source lines each code object spans are collected on the way (once
per function, like its code). The worker calls :func:`register_sources` before running tasks:
the lines go into :mod:`linecache` under the original file names, so the standard traceback
machinery prints them. :func:`format_exception` says so explicitly when a frame's source
cannot be shown (code built by ``exec`` of a string has no file to read lines from).
"""

from __future__ import annotations

import linecache
import os
import pickle
import traceback
import types
from collections import ChainMap
from io import BytesIO
from typing import Any

import cloudpickle

# file name -> {line number: line text}: the lines a traceback through these functions can show.
SourceLines = dict[str, dict[int, str]]


def _code_with_filename(build: Any, args: tuple[Any, ...], filename: str) -> types.CodeType:
    """Rebuild a code object the way the serializer would, under its original file name."""
    code = build(*args)
    if code.co_filename != filename:
        code = code.replace(co_filename=filename)
    return code


class _SourcePickler(cloudpickle.Pickler):
    """cloudpickle's pickler, but code objects keep their file name and report their lines."""

    def __init__(self, file: BytesIO, sources: SourceLines) -> None:
        # The C pickler reads dispatch_table when it is initialized: set ours first.
        self.dispatch_table = ChainMap(
            {types.CodeType: self._reduce_code}, cloudpickle.Pickler.dispatch_table
        )
        super().__init__(file, protocol=pickle.HIGHEST_PROTOCOL)
        self._sources = sources

    def _reduce_code(self, code: types.CodeType) -> Any:
        build, args = cloudpickle.Pickler.dispatch_table[types.CodeType](code)
        _collect_lines(code, self._sources)
        return _code_with_filename, (build, args, code.co_filename)


def _collect_lines(code: types.CodeType, sources: SourceLines) -> None:
    """Add the lines ``code`` spans (its ``def`` line to its last line) to ``sources``."""
    filename = code.co_filename
    numbers = [line for _, _, line in code.co_lines() if line is not None]
    if not numbers:
        return
    lines = linecache.getlines(filename)
    if not lines:  # no file (exec of a string, a deleted file): nothing to ship
        return
    first = max(1, min(code.co_firstlineno, *numbers))
    last = min(len(lines), max(numbers))
    taken = sources.setdefault(filename, {})
    for number in range(first, last + 1):
        taken.setdefault(number, lines[number - 1])


def dumps_function(fn: Any) -> tuple[bytes, SourceLines]:
    """Pickle ``fn`` (by value where cloudpickle would) and the source lines its code spans."""
    sources: SourceLines = {}
    buffer = BytesIO()
    _SourcePickler(buffer, sources).dump(fn)
    return buffer.getvalue(), sources


def merge_sources(into: SourceLines, more: SourceLines) -> None:
    for filename, lines in more.items():
        into.setdefault(filename, {}).update(lines)


def register_sources(sources: SourceLines) -> None:
    """Make ``sources`` what :mod:`linecache` answers for their files in this process.

    The shipped lines win over a file of the same name on this machine: they are the lines of
    the code that runs. Entries without a modification time are never invalidated by
    ``linecache.checkcache``.
    """
    for filename, numbered in sources.items():
        if not numbered:
            continue
        size = max(numbered)
        lines = [numbered.get(number, "\n") for number in range(1, size + 1)]
        lines = [line if line.endswith("\n") else line + "\n" for line in lines]
        linecache.cache[filename] = (sum(map(len, lines)), None, lines, filename)


class _Stack(traceback.StackSummary):
    """Frames whose source cannot be shown say why instead of printing a bare location."""

    def format_frame_summary(self, frame_summary: traceback.FrameSummary) -> str:
        text = super().format_frame_summary(frame_summary)
        if frame_summary.line:
            return text
        filename = frame_summary.filename
        if filename.startswith("<") and filename.endswith(">"):
            why = f"{filename} is not a file: the code was built from a string (exec/compile)"
        elif not os.path.exists(filename):
            why = f"{filename} is neither on this worker nor shipped with the task"
        else:
            why = f"line {frame_summary.lineno} is not in {filename}"
        return text + f"    (source not available: {why})\n"


def _annotate(exception: traceback.TracebackException, seen: set[int]) -> None:
    if id(exception) in seen:
        return
    seen.add(id(exception))
    exception.stack = _Stack(exception.stack)
    for linked in (exception.__cause__, exception.__context__):
        if linked is not None:
            _annotate(linked, seen)
    for member in getattr(exception, "exceptions", None) or ():
        _annotate(member, seen)


def format_exception(exc: BaseException) -> str:
    """The traceback of ``exc`` as text, each frame with its source line or a note why not."""
    report = traceback.TracebackException.from_exception(exc)
    _annotate(report, set())
    return "".join(report.format())
