"""Functions pickled with their source lines: file names kept, lines registered, notes shown."""

from __future__ import annotations

import linecache
import pickle

import pytest

from dagkube.sources import dumps_function, format_exception, register_sources

SOURCE = """def outer(n):
    def inner(k):
        return 10 // k
    return [inner(k) for k in range(n)]
"""


def _define(filename: str, *, cached: bool):
    if cached:
        linecache.cache[filename] = (len(SOURCE), None, SOURCE.splitlines(True), filename)
    namespace: dict = {"__name__": "__main__"}
    exec(compile(SOURCE, filename, "exec"), namespace)
    return namespace["outer"]


def test_code_objects_keep_their_file_and_ship_the_lines_they_span():
    filename = "<unit-cell-1>"
    blob, sources = dumps_function(_define(filename, cached=True))
    linecache.cache.pop(filename)
    assert sources == {filename: dict(enumerate(SOURCE.splitlines(True), start=1))}
    fn = pickle.loads(blob)
    assert fn.__code__.co_filename == filename
    nested = [c for c in fn.__code__.co_consts if hasattr(c, "co_filename")]
    assert nested and all(c.co_filename == filename for c in nested)
    register_sources(sources)
    with pytest.raises(ZeroDivisionError) as info:
        fn(2)
    text = format_exception(info.value)
    assert f'File "{filename}", line 3, in inner\n    return 10 // k\n' in text
    assert "source not available" not in text


def test_a_frame_without_source_says_why():
    fn = pickle.loads(dumps_function(_define("<unit-cell-2>", cached=False))[0])
    with pytest.raises(ZeroDivisionError) as info:
        fn(1)
    text = format_exception(info.value)
    assert (
        'File "<unit-cell-2>", line 3, in inner\n'
        "    (source not available: <unit-cell-2> is not a file: the code was built from a "
        "string (exec/compile))\n"
    ) in text


def test_chained_exceptions_are_annotated_too():
    fn = pickle.loads(dumps_function(_define("<unit-cell-3>", cached=False))[0])
    try:
        try:
            fn(1)
        except ZeroDivisionError as exc:
            raise RuntimeError("while dividing") from exc
    except RuntimeError as outer:
        text = format_exception(outer)
    # outer, its list comprehension and inner, in the cause
    assert text.count("(source not available: <unit-cell-3>") == 3
    assert "The above exception was the direct cause" in text
